"""Task names -> environments. Names are `domain-task` with dm_control's own spelling inside."""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util

from envs_mjx.base import Domain, Env

# The 30 DMC tasks this package provides, in the order of the MAD-TD / TD-MPC2 papers' tables.
TASKS = (
    "acrobot-swingup", "ball_in_cup-catch", "cartpole-balance", "cartpole-balance_sparse", "cartpole-swingup",
    "cartpole-swingup_sparse", "cheetah-run", "finger-spin", "finger-turn_easy", "finger-turn_hard", "fish-swim",
    "hopper-stand", "hopper-hop", "pendulum-swingup", "point_mass-easy", "reacher-easy", "reacher-hard",
    "swimmer-swimmer6", "walker-stand", "walker-walk", "walker-run", "quadruped-walk", "quadruped-run",
    "humanoid-stand", "humanoid-walk", "humanoid-run", "dog-stand", "dog-walk", "dog-trot", "dog-run",
)
DOMAINS = tuple(dict.fromkeys(t.split("-")[0] for t in TASKS))


def list_tasks(domain: str | None = None) -> list[str]:
    """All task names, or those of one domain."""
    if domain is None:
        return list(TASKS)
    if domain not in DOMAINS:
        raise ValueError(_unknown("domain", domain, DOMAINS))
    return [t for t in TASKS if t.split("-")[0] == domain]


def _unknown(kind: str, name: str, valid) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(valid)}."


def split_name(name: str) -> tuple[str, str]:
    """'walker-run' -> ('walker', 'run'), failing with the closest valid names."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string like 'walker-run', got {type(name).__name__}")
    if name not in TASKS:
        raise ValueError(_unknown("task", name, TASKS))
    domain, task = name.split("-", 1)
    return domain, task


def get_domain(domain: str, task: str | None = None) -> Domain:
    """The Domain serving `domain`'s tasks; where a module splits its tasks over several Domains (their
    observation keys differ, as finger's spin and turn), the one serving `task` (its `DOMAINS_BY_TASK`)."""
    if domain not in DOMAINS:
        raise ValueError(_unknown("domain", domain, DOMAINS))
    try:
        module = importlib.import_module(f"envs_mjx.{domain}")
    except ModuleNotFoundError as e:
        if e.name != f"envs_mjx.{domain}":
            raise
        raise NotImplementedError(f"the {domain} domain is not ported to MJX yet; available domains: "
                                  f"{', '.join(available_domains())}") from None
    return getattr(module, "DOMAINS_BY_TASK", {}).get(task, module.DOMAIN)


def program_groups(tasks) -> dict[str, list[str]]:
    """`tasks` grouped by the compiled model and step they can share (one vmapped program each): one group
    per domain, named after it, except where a domain splits its tasks over several Domains (finger: spin
    and turn observe different keys), whose further groups are named `domain-<first task>`."""
    groups: dict[str, list[str]] = {}
    for name in tasks:
        domain, task = split_name(name)
        try:
            served_by = get_domain(domain, task)
        except NotImplementedError:  # not ported: `make` will say so
            groups.setdefault(domain, []).append(name)
            continue
        key = domain if served_by is get_domain(domain) else f"{domain}-{next(iter(served_by.tasks))}"
        groups.setdefault(key, []).append(name)
    return groups


def available_domains() -> list[str]:
    """Domains whose MJX port is present (all of DOMAINS once the port is complete)."""
    return [d for d in DOMAINS if importlib.util.find_spec(f"envs_mjx.{d}") is not None]


# Where the physics runs (envs_mjx/README.md says which to choose): "jax", MJX's pure-JAX backend, on any
# accelerator; "warp", MJX on MuJoCo Warp with dm_control's models unchanged (NVIDIA GPUs and the CPU; needs the
# warp-lang package, the `warp` extra); "host", dm_control's own C MuJoCo on the host's cores, called from the
# jitted program.
BACKENDS = ("jax", "warp", "host")


def backend_problem(backend: str) -> str | None:
    """Why `backend` cannot run in this Python, or None."""
    if backend not in BACKENDS:
        return _unknown("backend", str(backend), BACKENDS)
    if backend == "warp" and importlib.util.find_spec("warp") is None:
        return ("the warp physics backend needs the warp-lang package, which is not installed: "
                "pip install 'vecrl[warp]' (or warp-lang 1.19)")
    return None


def make(name: str, action_repeat: int = 1, backend: str = "jax", *, worlds: int = 64) -> Env:
    """The named task as an `Env` (see `envs_mjx.base.Env`) whose physics runs on `backend`. Envs of one domain
    share their compiled model, so their `reset`/`step` can be vmapped over tasks: reset each lane with
    `env.task_params(task)`. An Env holds only static things, so one is made per (task, action repeat, backend)
    and shared, with its traced functions. `worlds`: the most lanes one vmapped call of the env runs; Warp sizes
    the contact pool that such a call shares by it (the other backends take any batch and ignore it)."""
    domain, task = split_name(name)
    if not isinstance(action_repeat, int) or isinstance(action_repeat, bool) or action_repeat < 1:
        raise ValueError(f"action_repeat must be a positive int, got {action_repeat!r}")
    problem = backend_problem(backend)
    if problem:
        raise ValueError(problem)
    if backend == "host":
        from envs_mjx.host import make_host  # pylint: disable=import-outside-toplevel

        get_domain(domain, task)  # an unported domain fails here, as on the other backends
        return make_host(name, action_repeat)
    if backend == "warp":
        from envs_mjx.warp import make_warp  # pylint: disable=import-outside-toplevel

        return make_warp(name, action_repeat, worlds=worlds)
    return _make(get_domain(domain, task), task, action_repeat)


@functools.lru_cache(maxsize=None)
def _make(domain: Domain, task: str, action_repeat: int) -> Env:
    return Env(domain, task, action_repeat=action_repeat)
