import pytest

from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "walker"


def test_one_step_parity():
    # Measured (seed 0, 2 lanes per task, resets and states after 20 random steps, with floor contacts):
    # obs <= 2.3e-5 (velocities), reward <= 1.1e-7.
    envtest.assert_one_step_parity(DOMAIN, obs_tol=7e-5, reward_tol=3e-7)


def test_agent_like_parity():
    """Upright from the standing pose, moving at each task's target speed (run: 4.5 m/s on average after the
    lead-in), at action repeat 1 and 2."""
    # Measured (2 states per task): velocity 3.6e-5, orientations 5.7e-7, height 2.8e-7, reward 1.3e-7.
    envtest.assert_agent_like_parity(DOMAIN, obs_tol=1e-4, reward_tol=5e-7)


def test_trajectory_divergence():
    # Measured mean |reward diff| over 200 random steps: <= 0.0089 (stand). The walker falls under random
    # actions and contact makes that chaotic: dm_control against itself with its initial qpos perturbed by 1e-6
    # diverges by 0.001-0.009 per step, the same size.
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=0.025)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


def test_initial_state_distribution():
    """Joint angles at reset follow dm_control's randomize_limited_and_rotational_joints: limited joints uniform in
    range, the unlimited root hinge uniform in [-pi, pi], the root slides at 0; compared with dm_control's own draws."""
    mjx_q = envtest.reset_qpos(DOMAIN, 2, 40)  # 240 resets
    dm_q, model = envtest.dm_control_reset_qpos("walker-walk", 240)
    envtest.assert_randomized_joints_match(mjx_q, dm_q, model, fixed_joints=("rootz", "rootx"))
