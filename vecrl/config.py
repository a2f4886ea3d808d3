"""Run specifications: frozen dataclasses, loaded from TOML files in runs/ plus `--set key=value` overrides,
validated once here, before anything is compiled.

A spec file:

    name = "quickstart"
    agent = "madtd"
    tasks = ["cartpole-balance"]
    seeds = 10                 # or an explicit list: [0, 3, 7]
    [train]
    steps = 20_000
    [madtd]
    hidden = 64
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
import types
import typing
from typing import Any, Literal

from vecrl import validation
from vecrl.agents import AGENTS
from vecrl.agents.madtd import MadTDConfig
from vecrl.agents.mbpo import MBPOConfig
from vecrl.agents.sac import SACConfig
from vecrl.agents.svg import SVGConfig
from vecrl.validation import NON_NEGATIVE_INT, POSITIVE_INT, UNIT_RIGHT_OPEN, rule

RUNS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs")
DEFAULT_SPEC = "quickstart"


class SpecError(ValueError):
    """A run specification that cannot be run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = rule(1_000_000, POSITIVE_INT)  # agent steps per seed
    warmup_steps: int = rule(5_000, NON_NEGATIVE_INT)  # uniform random actions, no updates
    action_repeat: int = rule(2, POSITIVE_INT)
    capacity: int = rule(1_000_000, POSITIVE_INT)  # train replay capacity (transitions) per seed and task
    # Of collected transitions, routed to the held-out buffer, never trained on.
    holdout_fraction: float = rule(0.05, UNIT_RIGHT_OPEN)
    chunk_steps: int = rule(1_000, POSITIVE_INT)  # agent steps per compiled chunk (host sync, logging granularity)
    eval_every: int = rule(10_000, NON_NEGATIVE_INT)  # agent steps between deterministic evaluations; 0 disables
    eval_episodes: int = rule(10, POSITIVE_INT)  # per seed and task
    # Held-out rows (and as many training rows) on which each evaluation measures the critic's squared TD error,
    # off- and on-policy (the paper's generalisation gap); 0 turns that diagnostic off.
    diagnostic_rows: int = rule(512, NON_NEGATIVE_INT)
    checkpoint_every: int = rule(50_000, NON_NEGATIVE_INT)  # agent steps; a final checkpoint is always written
    # Every this many agent steps, the agent is re-initialised (MAD-TD and SAC: all networks, optimisers and the
    # temperature; MBPO and SVG: their SAC part, keeping the model) while the replay buffers are kept; 0 never
    # resets (MAD-TD paper Fig. 6: 200,000; "Dyna limits" paper Sec. 5: 20,000). The reset opens step
    # k * reset_every, so the evaluation, checkpoint and training episode at that step are the agent's before it,
    # and none follows the last step.
    reset_every: int = rule(0, NON_NEGATIVE_INT)
    keep_checkpoints: int = rule(3, POSITIVE_INT)
    # The arithmetic of float32 matrix products (every network's): "default" is the backend's own choice (exact
    # float32 on a CPU, TF32 on NVIDIA GPUs since Ampere, as the papers' JAX code ran); "float32", "tf32" and
    # "bfloat16" ask for float32, TF32 or bfloat16 products accumulated in float32 (see `vecrl bench --precision`).
    matmul_precision: Literal["default", "float32", "tf32", "bfloat16"] = "default"
    # Where the physics runs (envs_mjx/README.md compares them): "jax", MJX on the accelerator, in the same program
    # as the agent; "warp", MJX on MuJoCo Warp (NVIDIA GPUs or the CPU; dm_control's models unchanged; needs the
    # `warp` extra); "host", dm_control's own C MuJoCo on the host's CPU cores, called once per agent step for all
    # lanes (the reference physics, dm_control's models unchanged; the fastest on a CPU).
    physics: Literal["jax", "warp", "host"] = "jax"

    def relations(self, section: str):
        if self.steps % self.chunk_steps:
            yield f"{section}.steps ({self.steps}) must be a multiple of {section}.chunk_steps ({self.chunk_steps})"
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) % self.chunk_steps:
                yield (f"{section}.{name} ({getattr(self, name)}) must be a multiple of {section}.chunk_steps "
                       f"({self.chunk_steps}): they run between chunks")


AGENT_CONFIGS = {name: config for name, (config, _) in AGENTS.items()}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    agent: str = "madtd"
    # Which episode return `vecrl report` leads its aggregate scores and regret with (it reports both): "train",
    # the training episodes' (with exploration noise or the MPC sampler), which the MAD-TD paper and its code plot;
    # or "eval", deterministic evaluation episodes', which the "Dyna limits" paper's code logs. Not part of the
    # fingerprint: it changes no training.
    report_return: Literal["train", "eval"] = "eval"
    train: TrainConfig = TrainConfig()
    madtd: MadTDConfig = MadTDConfig()
    sac: SACConfig = SACConfig()
    mbpo: MBPOConfig = MBPOConfig()
    svg: SVGConfig = SVGConfig()

    @property
    def agent_config(self):
        return getattr(self, self.agent)

    def to_dict(self) -> dict:
        """The spec with only its own agent's section (what config.json records and the fingerprint hashes)."""
        out = dataclasses.asdict(self)
        for other in AGENT_CONFIGS:
            if other != self.agent:
                del out[other]
        return out

    def fingerprint(self) -> str:
        """What must not change for a checkpoint to be resumed."""
        trained = {k: v for k, v in self.to_dict().items() if k != "report_return"}
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]

    def domains(self) -> dict[str, list[str]]:
        """Tasks grouped by the compiled program they share: one per domain (finger's spin and turn, whose
        observations differ, form two)."""
        from envs_mjx.registry import program_groups  # pylint: disable=import-outside-toplevel

        return program_groups(self.tasks)


# ---------------------------------------------------------------------------------------------- loading
def _closest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a dataclass field's type (int, float, bool, str, Literal, tuple, Optional)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise SpecError(f"{where} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint} at {where}")


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise SpecError(f"unknown key {where}{key!r}.{_closest(key, fields)} Valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=1000' -> (['train', 'steps'], 1000); values are TOML literals, bare words are strings."""
    if "=" not in text:
        raise SpecError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def shipped_specs() -> list[str]:
    """The names of the specs in runs/."""
    return sorted(f[:-5] for f in os.listdir(RUNS_DIR) if f.endswith(".toml")) if os.path.isdir(RUNS_DIR) else []


def spec_path(name_or_path: str) -> str:
    if os.path.exists(name_or_path):
        return name_or_path
    candidate = os.path.join(RUNS_DIR, f"{name_or_path}.toml")
    if os.path.exists(candidate):
        return candidate
    known = shipped_specs()
    raise SpecError(f"no spec {name_or_path!r} (not a file, not in runs/).{_closest(name_or_path, known)} "
                    f"Specs in runs/: {', '.join(known)}")


def load_spec(name_or_path: str | None = None, overrides: list[str] = ()) -> RunSpec:
    path = spec_path(name_or_path or DEFAULT_SPEC)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {text}: {k!r} is not a section")
        node[keys[-1]] = value
    return spec_from_dict(raw)


def spec_from_dict(raw: dict) -> RunSpec:
    import envs_mjx  # pylint: disable=import-outside-toplevel

    raw = dict(raw)
    top = {f.name for f in dataclasses.fields(RunSpec)}
    for key in raw:
        if key not in top:
            raise SpecError(f"unknown key {key!r}.{_closest(key, top)} Valid keys: {', '.join(sorted(top))}")
    agent = raw.get("agent", "madtd")
    if agent not in AGENT_CONFIGS:
        raise SpecError(f"unknown agent {agent!r}.{_closest(str(agent), AGENT_CONFIGS)} Agents: {', '.join(AGENT_CONFIGS)}")
    tasks = raw.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks or not isinstance(tasks, list):
        raise SpecError("tasks must be a non-empty list of task names, e.g. [\"walker-run\"]")
    for t in tasks:
        if t not in envs_mjx.TASKS:
            raise SpecError(f"unknown task {t!r}.{_closest(str(t), envs_mjx.TASKS)} See `vecrl tasks`.")
    if len(set(tasks)) != len(tasks):
        raise SpecError(f"tasks has duplicates: {tasks}")
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise SpecError(f"seeds must be >= 1 (or a list of seeds), got {seeds}")
        seeds = list(range(seeds))
    if (not isinstance(seeds, list) or not seeds or
            any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds)):
        raise SpecError(f"seeds must be a count or a list of distinct non-negative integers, got {seeds!r}")
    for section in ("train", *AGENT_CONFIGS):
        if section in raw and not isinstance(raw[section], dict):
            raise SpecError(f"[{section}] must be a table of keys")
        if section in AGENT_CONFIGS and section != agent and raw.get(section):
            raise SpecError(f"the spec sets [{section}] keys but its agent is {agent!r}: set agent = \"{section}\" "
                            f"or move the keys to [{agent}]")
    train = _build(TrainConfig, raw.get("train", {}), "train.")
    agent_values = dict(raw.get(agent, {}))
    if agent == "madtd" and "vmax" not in agent_values:
        agent_values["vmax"] = 150.0 * train.action_repeat  # the paper's support scales with the action repeat
    agent_cfg = _build(AGENT_CONFIGS[agent], agent_values, f"{agent}.")
    name = raw.get("name", "run")
    if not isinstance(name, str) or not name or "/" in name:
        raise SpecError(f"name must be a non-empty string without '/', got {name!r}")
    report_return = _coerce(raw.get("report_return", "eval"), typing.get_type_hints(RunSpec)["report_return"],
                            "report_return")
    spec = RunSpec(name=name, tasks=tuple(tasks), seeds=tuple(seeds), agent=agent, report_return=report_return,
                   train=train, **{agent: agent_cfg})
    validate(spec)
    return spec


def validate(spec: RunSpec) -> None:
    try:
        validation.validate(spec.train, "train")
        validation.validate(spec.agent_config, spec.agent)
    except ValueError as e:
        raise SpecError(str(e)) from None
    train, agent = spec.train, spec.agent_config
    if train.warmup_steps >= train.steps:
        raise SpecError(f"train.warmup_steps ({train.warmup_steps}) must be below train.steps ({train.steps}): "
                        "no update would ever run")
    sampleable_at_start = int(train.warmup_steps * (1 - train.holdout_fraction))
    if agent.batch_size > min(train.capacity, max(sampleable_at_start, 1)):
        raise SpecError(f"{spec.agent}.batch_size ({agent.batch_size}) is larger than the replay buffer can hold "
                        f"when updates start (~{sampleable_at_start} transitions after {train.warmup_steps} warm-up "
                        f"steps, capacity {train.capacity}): raise train.warmup_steps or lower the batch size")
    if spec.agent == "mbpo" and train.warmup_steps % agent.retrain_every:
        # The first update (at step warmup_steps) must retrain the ensemble, or SAC would learn from rollouts of an
        # untrained model until the next retrain. (A reset keeps the model: see MBPO's `reset`.)
        raise SpecError(f"train.warmup_steps ({train.warmup_steps}) must be a multiple of mbpo.retrain_every "
                        f"({agent.retrain_every}): MBPO's first update must retrain its model")
    if 1000 % train.action_repeat:
        raise SpecError(f"train.action_repeat ({train.action_repeat}) must divide the 1000 control steps of an episode")
