import jax
import numpy as np
import pytest

from envs_mjx import base, make, parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "humanoid"
TASKS = parity.list_tasks(DOMAIN)

# Measured (docs/envs/humanoid.md), 2 lanes per task, states at reset and after 20 random-action steps:
# reset obs <= 1.1e-6, step obs <= 2.9e-4 (joint velocities near impacts), step reward <= 2.1e-7; 200-step mean
# |reward diff| <= 1.9e-8 (the random-action humanoid falls and lies, where rewards are ~0).
OBS_TOL = 1e-3
REWARD_TOL = 1e-6
DIVERGENCE_TOL = 1e-7


def test_one_step_parity():
    # Contacts (floor and self-collision) solved by float32 Newton in MJX against float64 MuJoCo: one control step
    # (5 physics steps) from a copied state. The worst errors are joint velocities (rad/s) near impacts.
    envtest.assert_one_step_parity(DOMAIN, obs_tol=OBS_TOL, reward_tol=REWARD_TOL)


@pytest.mark.xfail(strict=True, reason="a known gap: see the comment")
def test_agent_like_parity():
    """Upright from the standing pose at each task's target speed, at action repeat 1 and 2."""
    # Fails, measured (2 states per task): humanoid-run at 9.8 m/s agrees after one control step (velocity 1.1e-4)
    # and not after two: velocity 1.8, joint_angles 7.3e-2, reward 4.5e-4, where dm_control against itself from
    # 1e-6 away stays within 1.1e-4; humanoid-stand already differs by 5.4e-2 in velocity after one step
    # (dm_control's own: 3.7e-4). The Warp backend, on dm_control's unchanged model, differs the same way at run
    # speed (1.9 after two steps), so the MJX-only edits are not the cause; not yet explained.
    envtest.assert_agent_like_parity(DOMAIN, obs_tol=1e-4, reward_tol=1e-6)


def test_trajectory_divergence():
    # A weak check here: the random-action humanoid falls and lies, where every reward is ~0 (head far below 1.4 m),
    # so rewards agree closely although the states separate after the first impact (docs/envs/humanoid.md).
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=DIVERGENCE_TOL)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


def test_observation_spec_matches_dm_control():
    # Keys in dm_control's order (the flat observation's layout) with its shapes; no compilation needed.
    env = make(f"{DOMAIN}-run")
    dm_spec = parity.load_dm_control(f"{DOMAIN}-run").observation_spec()
    assert [k for k, _ in env.observation_spec] == list(dm_spec)
    for key, shape in env.observation_spec:
        assert int(np.prod(shape)) == int(np.prod(dm_spec[key].shape)), key


# ------------------------------------------------------------------------------ initial-state distribution
_N_RESET_BATCHES = 11  # x 6 lanes (2 per task, the parity batch: no new compilation) = 66 MJX resets
_N_DM_RESETS = 64


def _obs_slices(env):
    slices, start = {}, 0
    for key, shape in env.observation_spec:
        size = int(np.prod(shape))
        slices[key] = slice(start, start + size)
        start += size
    return slices


def _features(obs, slices):
    """head height, the torso's z-axis in world (zx, zy, zz) and every joint angle: one column each."""
    obs = np.atleast_2d(obs)
    return np.concatenate([obs[:, slices["head_height"]], obs[:, slices["torso_vertical"]],
                           obs[:, slices["joint_angles"]]], axis=1)


@pytest.fixture(scope="module")
def resets():
    """MJX resets (the parity harness's compiled batch, several seeds) and dm_control's `initialize_episode`."""
    batches = [parity.sample_states(DOMAIN, TASKS, 2, 0, seed=100 + s) for s in range(_N_RESET_BATCHES)]
    env, mjx_states = batches[0][0], [b[3][0] for b in batches]
    dm_env = parity.load_dm_control(f"{DOMAIN}-stand", seed=7)
    dm_obs = np.stack([parity.flat_dm_observation(dm_env.reset().observation) for _ in range(_N_DM_RESETS)])
    return env, mjx_states, dm_obs


def test_initial_state_distribution(resets):
    env, mjx_states, dm_obs = resets
    slices = _obs_slices(env)
    mjx_obs = np.concatenate([np.asarray(s.obs) for s in mjx_states])
    f_mjx, f_dm = _features(mjx_obs, slices), _features(dm_obs, slices)
    names = ["head_height", "torso_zx", "torso_zy", "torso_zz"] + [f"joint{i}" for i in range(f_mjx.shape[1] - 4)]
    # Two-sample Kolmogorov-Smirnov statistic per feature. Critical value at alpha = 0.001 for 66 vs 64 samples is
    # 0.34; a wrong orientation law (e.g. uniform quaternions instead of dm_control's normalised U[0,1]^4, whose
    # torso zy has mean 0.71) or a wrong joint range gives D > 0.5.
    ks = {n: envtest.ks_statistic(f_mjx[:, i], f_dm[:, i]) for i, n in enumerate(names)}
    worst = max(ks, key=ks.get)
    assert ks[worst] < 0.34, f"initial {worst} distribution differs from dm_control's (KS D = {ks[worst]:.2f})"
    # dm_control's quirk made explicit: the torso's z axis leans towards +y on average.
    zy = names.index("torso_zy")
    assert abs(f_mjx[:, zy].mean() - f_dm[:, zy].mean()) < 0.15 and f_mjx[:, zy].mean() > 0.5
    # Episodes start at rest, the root at its default position.
    assert np.all(mjx_obs[:, slices["velocity"]] == 0) and np.all(mjx_obs[:, slices["com_velocity"]] == 0)
    for s in mjx_states:
        np.testing.assert_allclose(np.asarray(s.data.qpos[:, :3]), np.tile([0.0, 0.0, 1.5], (6, 1)), atol=1e-6)


def test_resets_are_penetration_free(resets):
    env, mjx_states, _ = resets
    for s in mjx_states:
        assert not np.any(np.asarray(jax.vmap(base.is_penetrating)(s.data)))
    # and dm_control (float64 MuJoCo, its own collision code) agrees: no contact in the copied-in start states.
    dm_env = parity.load_dm_control(f"{DOMAIN}-stand")
    dm_env.reset()
    for lane in range(mjx_states[0].obs.shape[0]):
        parity.copy_state_into(dm_env, env, mjx_states[0], lane)
        assert dm_env.physics.data.ncon == 0, f"lane {lane}: dm_control finds {dm_env.physics.data.ncon} contacts"
