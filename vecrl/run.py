"""The host loop around the compiled chunks: run folders, metrics, evaluation, checkpoints, resume, signals."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time

import jax
import numpy as np

import envs_mjx
from vecrl import config as config_lib
from vecrl.agents.base import DROPPED
from vecrl.checkpoint import CheckpointError, Checkpoints
from vecrl.config import RunSpec, SpecError
from vecrl.flops import host_matmul_flops_per_s, traced_matmul_flops
from vecrl.metrics import MetricsWriter, Progress
from vecrl.train import DomainProgram, matmul_precision_problem

DEFAULT_OUTPUT_ROOT = "outputs"


class RunError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


# ------------------------------------------------------------------------------------------ run folder
def refuse_existing_run(path: str, resume: bool) -> None:
    path = os.path.abspath(path)
    if not resume and os.path.exists(path) and os.listdir(path):
        raise RunError(f"{path} already holds a run; nothing there is overwritten. Continue it with "
                       f"`vecrl resume {path}` or choose another --out.")


def prepare_run_dir(path: str, resume: bool) -> str:
    refuse_existing_run(path, resume)
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RunError(f"cannot write to the output folder {path}: {e}") from None
    return path


def default_run_dir(spec: RunSpec) -> str:
    return os.path.join(DEFAULT_OUTPUT_ROOT, f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")


# --------------------------------------------------------------------------------------------- memory
def tree_bytes(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
        total += int(np.prod(x.shape)) * itemsize
    return total


def available_memory() -> tuple[int, str]:
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} memory"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host memory"


def memory_shortfall(needed: dict[str, int]) -> str | None:
    """Why a run state of `needed` bytes per domain does not fit on this machine, or None when it does."""
    available, what = available_memory()
    total = sum(needed.values())
    # The chunk updates the donated state in place, but the compiled program needs working space besides.
    if total <= 0.8 * available:
        return None
    detail = ", ".join(f"{d}: {b / 2**30:.2f} GiB" for d, b in needed.items())
    return (f"the run's state needs {total / 2**30:.2f} GiB ({detail}) but only {available / 2**30:.2f} GiB "
            f"of {what} is available: lower the number of seeds, tasks or train.capacity, or run it on a machine "
            "with more memory")


def check_memory(programs: dict[str, DomainProgram]) -> dict[str, int]:
    needed = {d: tree_bytes(p.abstract_state()) for d, p in programs.items()}
    shortfall = memory_shortfall(needed)
    if shortfall:
        raise RunError(shortfall)
    return needed


def check_ported(spec: RunSpec) -> None:
    """The spec's tasks exist on MJX and its matmul precision on this backend; else a RunError, before compiling."""
    problem = matmul_precision_problem(spec, jax.default_backend()) or envs_mjx.backend_problem(spec.train.physics)
    if problem:
        raise RunError(problem)
    available = envs_mjx.available_domains()
    unported = [t for t in spec.tasks if t.split("-")[0] not in available]
    if unported:
        raise RunError(f"{', '.join(unported)}: not ported to MJX yet (see envs_mjx/README.md); available domains: "
                       f"{', '.join(available)}")


def check(spec: RunSpec) -> dict:
    """What a run of `spec` does before compiling, without compiling: every domain's run state shaped, its memory
    set against this machine's, and its training chunk and evaluation programs lowered (traced into XLA). Errors
    in the spec or the programs surface here, in seconds to minutes rather than after a queue wait on a cluster.
    Returns per domain: tasks, state bytes, lowering seconds; and `shortfall`, why it would not fit here (or None)."""
    check_ported(spec)
    domains = {}
    for d, tasks in spec.domains().items():
        t0 = time.perf_counter()
        program = DomainProgram(spec, tasks)
        state = program.abstract_state()
        program.chunk.lower(state)
        program.evaluate.lower(state)
        domains[d] = {"tasks": list(tasks), "state_bytes": tree_bytes(state),
                      "lowered_s": round(time.perf_counter() - t0, 1)}
    return {"domains": domains, "shortfall": memory_shortfall({d: v["state_bytes"] for d, v in domains.items()})}


# ------------------------------------------------------------------------------------- what is happening
def note(text: str) -> None:
    """A line for the person at the terminal (stderr, so that it never mixes with a command's output)."""
    print(f"vecrl: {text}", file=sys.stderr, flush=True)


def device_description() -> str:
    device = jax.devices()[0]
    more = f" (and {len(jax.devices()) - 1} more)" if len(jax.devices()) > 1 else ""
    return f"{jax.default_backend()} device {device.device_kind}{more}, jax {jax.__version__}"


def compile_programs(programs: dict[str, DomainProgram], states: dict, say=note):
    """Each domain's chunk and evaluation programs compiled, saying what compiles and how long it took; also the
    matmul FLOPs of one agent step of each domain's chunk (all lanes; see `vecrl.flops`)."""
    compiled, flops = {}, {}
    cache = jax.config.jax_compilation_cache_dir
    for d, p in programs.items():
        say(f"compiling {d} ({len(p.tasks)} task(s) x {p.num_seeds} seed(s)): training chunk and evaluation ...")
        t0 = time.perf_counter()
        traced = p.chunk.trace(states[d])
        flops[d] = traced_matmul_flops(traced) / p.train.chunk_steps
        compiled[d] = (traced.lower().compile(), p.evaluate.lower(states[d]).compile())
        say(f"compiled {d} in {time.perf_counter() - t0:.0f} s")
    if cache:
        say(f"compiled programs are kept in {cache}: the next start of the same programs on this machine (a resume, "
            "a rerun) loads them instead of compiling")
    return compiled, flops


# A CPU run whose lower-bound time exceeds this is warned about before its first chunk (nothing is refused).
CPU_WARNING_SECONDS = 24 * 3600


def warn_if_accelerator_sized(spec: RunSpec, flops_per_step: float, step: int, say=note) -> None:
    """On a CPU, a lower bound of the run's time from its matmul FLOPs and this CPU's measured matmul rate, said
    when it exceeds a day: a spec sized for an accelerator then starts with a warning, not silently."""
    rate = host_matmul_flops_per_s()
    seconds = flops_per_step * (spec.train.steps - step) / rate
    if seconds > CPU_WARNING_SECONDS:
        say(f"WARNING: this spec is sized for an accelerator. One agent step of all seeds is "
            f"{flops_per_step / 1e9:,.1f} GFLOP of matmuls, and this CPU multiplies at {rate / 1e9:,.0f} GFLOP/s: "
            f"the run would take at least {format_duration(seconds)} here. Stop it (Ctrl-C saves a checkpoint) and "
            "run it on a GPU (README: On a GPU), or lower the sizes with --set.")


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


class Projection:
    """The projected wall time of the rest of the run, said after the first chunk with updates (the steady rate;
    warm-up chunks take random actions and do not update), and again when the rate changes by a factor of 2."""

    def __init__(self, spec: RunSpec):
        self.spec, self.said_rate = spec, None

    def chunk_done(self, step: int, seconds: float, say=note) -> None:
        train = self.spec.train
        if step - train.chunk_steps < train.warmup_steps or step >= train.steps:
            return
        rate = train.chunk_steps / seconds
        if self.said_rate is not None and 0.5 < rate / self.said_rate < 2:
            return
        self.said_rate = rate
        remaining = (train.steps - step) / rate
        where = " on a CPU: this spec is sized for an accelerator" if (
            jax.default_backend() == "cpu" and remaining > CPU_WARNING_SECONDS) else ""
        say(f"{rate:,.2f} agent steps/s per seed with updates; projected time to step {train.steps:,}: "
            f"{format_duration(remaining)}{where}")


# ---------------------------------------------------------------------------------------------- run
class _Stop:
    """SIGINT/SIGTERM request a clean stop after the current chunk (checkpoint, then exit)."""

    def __init__(self):
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, _frame):
            self.signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _chunk_records(spec: RunSpec, program: DomainProgram, outputs: dict, start_step: int) -> list[dict]:
    """Per (seed, task) summaries of one chunk's per-step outputs [K, seed, task]."""
    k = spec.train.chunk_steps
    steps = start_step + np.arange(k)
    updated = steps >= spec.train.warmup_steps
    records = []
    for si, seed in enumerate(spec.seeds):
        for ti, task in enumerate(program.tasks):
            returns = outputs["return"][:, si, ti]
            finished = returns[~np.isnan(returns)]
            rejected = outputs["rejected_update"][:, si, ti]
            use = updated & ~rejected
            rec = {"seed": seed, "task": task,
                   "train_return": float(finished.mean()) if finished.size else None,
                   "train_episodes": int(finished.size),
                   "env_nan": bool(outputs["env_nan"][:, si, ti].any()),
                   "rejected_updates": int(rejected.sum())}
            for name, values in outputs["metrics"].items():
                if name == DROPPED:  # optimiser steps dropped in the chunk, rejected agent steps included
                    rec[name] = float(values[:, si, ti][updated].sum()) if updated.any() else None
                else:
                    rec[name] = float(values[:, si, ti][use].mean()) if use.any() else None
            records.append(rec)
    return records


def state_layout(abstract_state) -> str:
    """A digest of the run state's structure (every leaf's path, shape and dtype): a checkpoint restores only into
    the layout it was written from."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    text = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype}" for path, x in leaves)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _closing(ckpt: Checkpoints):
    """Whatever ends the loop, the checkpoint being written in the background is finished (a failed one raises
    RunError naming the last good one) before the run returns."""
    try:
        yield
    except CheckpointError as e:
        raise RunError(str(e)) from None
    finally:
        try:
            ckpt.close()
        except CheckpointError as e:
            raise RunError(str(e)) from None


def _finite_or_none(value) -> float | None:
    """A scalar, or the mean of an array (evaluation episodes), for JSON; None where it is not finite."""
    value = float(np.mean(value))
    return value if np.isfinite(value) else None


def execute(spec: RunSpec, run_dir: str, resume: bool = False, progress: bool = True,
            stop_after_chunks: int | None = None) -> dict:
    """Train `spec` in `run_dir` (fresh, or resumed from its last checkpoint). Returns the summary.
    `stop_after_chunks` interrupts after that many chunks as a signal would (for tests of resume)."""
    check_ported(spec)
    refuse_existing_run(run_dir, resume)
    physics = "" if spec.train.physics == "jax" else f", physics on the {spec.train.physics} backend"
    note(f"{spec.name}: {len(spec.seeds)} seed(s) x {len(spec.tasks)} task(s), {spec.train.steps:,} agent steps, on "
         f"{device_description()}{physics}")
    programs = {d: DomainProgram(spec, tasks) for d, tasks in spec.domains().items()}
    memory = check_memory(programs)  # before the run folder is made: a run that cannot fit leaves nothing behind
    run_dir = prepare_run_dir(run_dir, resume)
    ckpt = Checkpoints(os.path.join(run_dir, "checkpoints"), spec.train.keep_checkpoints)
    metrics = MetricsWriter(os.path.join(run_dir, "metrics.jsonl"))
    config_path = os.path.join(run_dir, "config.json")

    if resume:
        step = ckpt.latest_step()
        if step is None:
            raise RunError(f"{run_dir} has no complete checkpoint to resume from")
        abstract = {"domains": {d: p.abstract_state() for d, p in programs.items()}}
        with open(config_path) as f:
            saved_layout = json.load(f).get("state_layout")
        layout_error = RunError(f"{run_dir} was written by a version of vecrl whose run state is laid out differently "
                                "(agents' networks or buffers changed since): this version cannot resume it. Finish "
                                "it with the vecrl it was started with, or start a new run.")
        if saved_layout is not None and saved_layout != state_layout(abstract):
            raise layout_error
        try:
            states = ckpt.restore(step, abstract)["domains"]
        except (ValueError, KeyError, TypeError):
            if saved_layout is None:  # a run folder from before layouts were recorded
                raise layout_error from None
            raise
        wall_offset = metrics.truncate_after(step)
    else:
        with open(config_path, "w") as f:
            abstract = {"domains": {d: p.abstract_state() for d, p in programs.items()}}
            json.dump({"spec": spec.to_dict(), "fingerprint": spec.fingerprint(),
                       "state_layout": state_layout(abstract), "state_bytes": memory, "jax": jax.__version__, "backend": jax.default_backend(),
                       "device": str(jax.devices()[0].device_kind)}, f, indent=2)
        states = {d: p.init() for d, p in programs.items()}
        step, wall_offset = 0, 0.0
    # Orbax restores committed arrays and a fresh init gives uncommitted ones; the argument shardings are part of
    # the compilation cache key, so without one placement for both a resumed run recompiles every program.
    states = jax.device_put(states, jax.sharding.SingleDeviceSharding(jax.devices()[0]))

    t0 = time.perf_counter()
    compiled, flops = compile_programs(programs, states, note)
    compile_s = time.perf_counter() - t0
    note(f"compiled {len(programs)} domain program(s) in {compile_s:.0f} s; run folder {run_dir}")
    if jax.default_backend() == "cpu":
        warn_if_accelerator_sized(spec, sum(flops.values()), step, note)
    projection = Projection(spec)
    bar = Progress(spec, step, enabled=progress)
    stop, chunks_done = _Stop(), 0
    status = "complete"
    eval_s = checkpoint_s = 0.0  # host time spent evaluating, and blocked on checkpoints
    with stop.installed(), _closing(ckpt):
        while step < spec.train.steps:
            t_chunk = time.perf_counter()
            records = []
            # Every domain's chunk is dispatched before any output is fetched, so on an accelerator the domains'
            # programs run back to back instead of each waiting for the previous one's host round-trip.
            results = {d: compiled[d][0](states[d]) for d in programs}
            states = {d: r[0] for d, r in results.items()}
            outputs = jax.device_get({d: r[1] for d, r in results.items()})
            for d, p in programs.items():
                records.extend(_chunk_records(spec, p, outputs[d], step))
            step += spec.train.chunk_steps
            evaluate = (spec.train.eval_every and step % spec.train.eval_every == 0) or step == spec.train.steps
            evaluation = {}  # (seed, task) -> eval return and diagnostics
            if evaluate:
                t_eval = time.perf_counter()
                evaluations = jax.device_get({d: compiled[d][1](states[d]) for d in programs})  # dispatched alike
                eval_s += time.perf_counter() - t_eval
                for d, p in programs.items():
                    out = evaluations[d]  # [seed, task] (eval_return: [.., episodes])
                    for si, seed in enumerate(spec.seeds):
                        for ti, task in enumerate(p.tasks):
                            evaluation[(seed, task)] = {k: _finite_or_none(v[si, ti]) for k, v in out.items()}
            dt = time.perf_counter() - t_chunk
            wall = wall_offset + time.perf_counter() - t0
            for rec in records:
                rec.update({"step": step, "frames": step * spec.train.action_repeat, "eval_return": None,
                            "steps_per_s": spec.train.chunk_steps / dt, "wall_time": wall})
                if evaluate:
                    rec.update(evaluation[(rec["seed"], rec["task"])])
            metrics.write(records)
            bar.update(spec.train.chunk_steps, records, dt)
            projection.chunk_done(step, dt, bar.note)
            chunks_done += 1
            interrupted = stop.signal is not None or (stop_after_chunks is not None and chunks_done >= stop_after_chunks)
            due = spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0
            if due or interrupted or step == spec.train.steps:
                t_save = time.perf_counter()
                ckpt.save(step, {"domains": states})  # written in the background while the next chunk runs
                checkpoint_s += time.perf_counter() - t_save
            if interrupted and step < spec.train.steps:
                status = "interrupted"
                ckpt.wait()
                bar.note(f"stopped at step {step} (checkpoint saved); continue with `vecrl resume {run_dir}`")
                break
    bar.close()
    run_s = time.perf_counter() - t0 - compile_s
    note(f"evaluation took {eval_s:.0f} s and checkpoints blocked training for {checkpoint_s:.0f} s, of "
         f"{run_s:.0f} s after compiling ({100 * eval_s / max(run_s, 1e-9):.0f}% and "
         f"{100 * checkpoint_s / max(run_s, 1e-9):.0f}%)")
    summary = _summary(spec, run_dir, step, status, metrics, compile_s)
    summary["time_s"] = {"run": round(run_s, 1), "evaluation": round(eval_s, 1),
                         "checkpoint_blocking": round(checkpoint_s, 1)}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    summary["signal"] = stop.signal
    return summary


def _summary(spec: RunSpec, run_dir: str, step: int, status: str, metrics: MetricsWriter, compile_s: float) -> dict:
    rows = metrics.read()
    last = {}
    for r in rows:
        last[(r["seed"], r["task"])] = r
    tasks = {}
    for task in spec.tasks:
        evals = [r["eval_return"] for (s, t), r in last.items() if t == task and r.get("eval_return") is not None]
        trains = [r["train_return"] for (s, t), r in last.items() if t == task and r.get("train_return") is not None]
        flagged = sorted({r["seed"] for r in rows if r["task"] == task and (r["env_nan"] or r["rejected_updates"])})
        tasks[task] = {"final_eval_return_mean": float(np.mean(evals)) if evals else None,
                       "final_eval_return_std": float(np.std(evals)) if evals else None,
                       "final_train_return_mean": float(np.mean(trains)) if trains else None,
                       "flagged_seeds": flagged}
    return {"name": spec.name, "status": status, "step": step, "steps": spec.train.steps, "seeds": list(spec.seeds),
            "tasks": tasks, "wall_time_s": rows[-1]["wall_time"] if rows else 0.0, "compile_s": compile_s,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "run_dir": run_dir}


def train(spec: RunSpec, out: str | None = None, progress: bool = True, **kw) -> dict:
    return execute(spec, out or default_run_dir(spec), resume=False, progress=progress, **kw)


def resume(run_dir: str, progress: bool = True, spec: RunSpec | None = None, **kw) -> dict:
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise RunError(f"{run_dir} is not a vecrl run folder (no config.json)")
    with open(config_path) as f:
        saved = json.load(f)
    saved_spec = config_lib.spec_from_dict(_spec_dict_for_loading(saved["spec"]))
    if spec is not None and spec.fingerprint() != saved["fingerprint"]:
        raise RunError(f"{run_dir} was started with a different spec (fingerprint {saved['fingerprint']}, "
                       f"given {spec.fingerprint()}); resume it without changes, or start a new run")
    if saved_spec.fingerprint() != saved["fingerprint"]:
        raise RunError(f"{run_dir}/config.json does not match its fingerprint: it was edited, or written by another "
                       "version of vecrl whose spec fields differ; refusing to resume")
    return execute(saved_spec, run_dir, resume=True, progress=progress, **kw)


def _spec_dict_for_loading(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


__all__ = ["RunError", "SpecError", "execute", "resume", "train"]
