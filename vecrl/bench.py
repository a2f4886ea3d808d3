"""`vecrl bench`: trainer throughput against the number of seeds, and the speed-up of one many-seed program
over one-seed programs run in sequence.

For each seed count the spec's first domain is built as one program; warm-up chunks (random actions, no
updates) fill the buffers, then `--chunks` chunks of updates are timed. Agent steps/s are per seed (each seed
advances that many steps per second); gradient steps/s count critic updates summed over seeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time

import jax
import jax.numpy as jnp

from vecrl.config import RunSpec, SpecError, TrainConfig, validate
from vecrl.flops import traced_matmul_flops
from vecrl.train import MATMUL_ALGORITHMS, DomainProgram, matmul_precision_problem, vmap_leading

SIZES = {
    # Per agent: the quickstart's networks and update sizes, and its paper's.
    "madtd": {"quickstart": dict(hidden=64, model_hidden=64, latent=64, batch_size=64, num_bins=51, utd=1),
              "paper": dict(hidden=512, model_hidden=512, latent=512, batch_size=512, num_bins=151, utd=8)},
    "sac": {"quickstart": dict(hidden=64, batch_size=64, utd=1),
            "paper": dict(hidden=256, batch_size=256, utd=20)},
    # MBPO's retrain interval (250) stays; the warm-up is rounded up to a multiple of it (see bench_spec).
    "mbpo": {"quickstart": dict(hidden=64, model_hidden=64, batch_size=64, model_batch_size=64, utd=1),
             "paper": dict(hidden=256, model_hidden=200, batch_size=256, model_batch_size=256, utd=20)},
    "svg": {"quickstart": dict(hidden=64, model_hidden=64, batch_size=64, model_batch_size=64, utd=1),
            "paper": dict(hidden=512, model_hidden=512, batch_size=512, model_batch_size=1024, utd=1)},
}


def bench_spec(spec: RunSpec, seeds: int, size: str, chunk_steps: int) -> RunSpec:
    agent = dataclasses.replace(spec.agent_config, **SIZES[spec.agent][size])
    # Whole chunks of warm-up that leave a batch to sample, and (MBPO) end on a model-retrain step.
    period = math.lcm(chunk_steps, getattr(agent, "retrain_every", 1))
    warmup = -(-int(agent.batch_size / (1 - spec.train.holdout_fraction) + 1) // period) * period
    train = TrainConfig(steps=100 * warmup + chunk_steps * 100, warmup_steps=warmup,
                        action_repeat=spec.train.action_repeat, capacity=max(4 * warmup, 10_000),
                        holdout_fraction=spec.train.holdout_fraction, chunk_steps=chunk_steps, eval_every=0,
                        checkpoint_every=0)
    out = dataclasses.replace(spec, name=f"bench-{size}-{seeds}", seeds=tuple(range(seeds)),
                              tasks=tuple(next(iter(spec.domains().values()))), train=train, **{spec.agent: agent})
    validate(out)
    return out


def compiled_chunk(spec: RunSpec):
    """The spec's (first) domain program, its initial state, the traced chunk and the compiled chunk, and the seconds
    that tracing, lowering and compiling took."""
    program = DomainProgram(spec, list(spec.tasks))
    state = program.init()
    t0 = time.perf_counter()
    traced = program.chunk.trace(state)
    compiled = traced.lower().compile()
    return state, traced, compiled, time.perf_counter() - t0


def measure(spec: RunSpec, chunks: int) -> dict:
    state, _, chunk, compile_s = compiled_chunk(spec)
    while int(state.step) < spec.train.warmup_steps:
        state, _ = chunk(state)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(chunks):
        state, out = chunk(state)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    agent_steps = chunks * spec.train.chunk_steps
    lanes = len(spec.seeds) * len(spec.tasks)
    return {"seeds": len(spec.seeds), "tasks": len(spec.tasks), "compile_s": round(compile_s, 1),
            "agent_steps_per_s_per_seed": round(agent_steps / seconds, 3),
            "agent_steps_per_s_total": round(agent_steps * lanes / seconds, 3),
            "gradient_steps_per_s": round(agent_steps * lanes * spec.agent_config.utd / seconds, 1)}


# Loops of at most this many iterations (UTD loops) are unrolled when the update's cost is analysed.
UNROLL_MAX = 64


@contextlib.contextmanager
def _unrolled_scans(max_length: int = UNROLL_MAX):
    """While tracing, every `jax.lax.scan` of at most `max_length` iterations is fully unrolled. XLA's cost analysis
    counts a loop's body once, so only an unrolled loop is counted for all its iterations; longer loops (MBPO's
    5,000-step model fits, on one agent step in 250) still count once."""
    scan = jax.lax.scan

    def unrolled(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
        n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
        return scan(f, init, xs, length=length, reverse=reverse, unroll=True if n <= max_length else unroll, **kw)

    jax.lax.scan = unrolled
    try:
        yield
    finally:
        jax.lax.scan = scan


def _update_program(program: DomainProgram):
    """One agent step's learning of every lane, as the trainer runs it (vecrl.train.DomainProgram._update_lane)."""
    def update(lanes, t):
        keys = vmap_leading(lambda k: jax.random.fold_in(k, 3), 2, lanes.key)
        return vmap_leading(lambda a, b, k: program._update_lane(a, b, k, t), 2,  # pylint: disable=protected-access
                            lanes.agent, lanes.buffer, keys)
    return jax.jit(update)


def _xla_cost(spec: RunSpec) -> tuple[float, float]:
    program = DomainProgram(spec, list(spec.tasks))
    lanes, step = program.abstract_state().lanes, jax.ShapeDtypeStruct((), jnp.int32)
    with _unrolled_scans(), jax.default_matmul_precision(MATMUL_ALGORITHMS[spec.train.matmul_precision]):
        analysis = _update_program(program).lower(lanes, step).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"]), float(analysis["bytes accessed"])


def update_cost(spec: RunSpec) -> dict:
    """What one agent step's learning costs per lane (seed x task), from XLA's cost analysis of the compiled update:
    FLOP and bytes accessed. The update is compiled with 1 and with 2 gradient steps (UTD loops unrolled) and the
    difference, one gradient step, is scaled to the spec's UTD, which keeps the analysis cheap at UTD 8 or 20.
    Beside them, the analytic floors: the matmul FLOP the step must do (vecrl.flops, loop trip counts included) and
    the bytes of the lanes' agent state, which every step must at least read; bytes over state is how many passes
    over the agent's state a step makes."""
    agent = spec.agent_config
    one, two = (_xla_cost(dataclasses.replace(spec, **{spec.agent: dataclasses.replace(agent, utd=u)}))
                for u in (1, 2))
    flops, bytes_accessed = (a + (agent.utd - 1) * (b - a) for a, b in zip(one, two))
    program = DomainProgram(spec, list(spec.tasks))
    lanes = program.abstract_state().lanes
    matmul = traced_matmul_flops(_update_program(program).trace(lanes, jax.ShapeDtypeStruct((), jnp.int32)))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lanes.agent))
    n = len(spec.seeds) * len(spec.tasks)
    return {"update_gflop_per_agent_step": round(flops / n / 1e9, 3),
            "update_matmul_gflop_per_agent_step": round(matmul / n / 1e9, 3),
            "flop_over_matmul_floor": round(flops / matmul, 3) if matmul else None,
            "update_gbytes_per_agent_step": round(bytes_accessed / n / 1e9, 3),
            "agent_state_gbytes": round(state_bytes / n / 1e9, 4),
            "bytes_over_agent_state": round(bytes_accessed / state_bytes, 2)}


def _refuse_unavailable_precision(spec: RunSpec) -> None:
    problem = matmul_precision_problem(spec, jax.default_backend())
    if problem:
        raise SpecError(problem)


def run_bench(spec: RunSpec, seeds: list[int], sizes: list[str], chunks: int, chunk_steps: int, jsonl: str | None,
              precisions: tuple[str, ...] = ("default",)):
    """Per size, precision and seed count: throughput (`measure`), and the update's cost per agent step
    (`update_cost`, per lane) with the FLOP/s it achieves. FLOP and bytes are per lane and agent step."""
    device = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    results = []
    for size, precision in itertools.product(sizes, precisions):
        rows = {}
        for n in seeds:
            bench = bench_spec(spec, n, size, chunk_steps)
            bench = dataclasses.replace(bench, train=dataclasses.replace(bench.train, matmul_precision=precision))
            _refuse_unavailable_precision(bench)
            row = {"agent": spec.agent, "size": size, "precision": precision, "task": ",".join(bench.tasks),
                   "device": device, **measure(bench, chunks), **update_cost(bench)}
            row["update_tflop_per_s"] = round(row["update_gflop_per_agent_step"] * row["agent_steps_per_s_total"]
                                              / 1e3, 4)
            rows[n] = row
            print(json.dumps(row), flush=True)
            results.append(row)
        if 1 in rows and 10 in rows:
            ratio = {"size": size, "precision": precision, "device": device,
                     "metric": "time of ten 1-seed runs / one 10-seed run",
                     "value": round(rows[10]["agent_steps_per_s_total"] / rows[1]["agent_steps_per_s_total"], 2)}
            print(json.dumps(ratio), flush=True)
            results.append(ratio)
    if jsonl:
        with open(jsonl, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


# ------------------------------------------------------------------------------------------ projection
def spec_schedule(spec: RunSpec) -> dict[str, int]:
    """How many of each timed event a whole run of `spec` has: warm-up chunks (random actions, no updates), update
    chunks, evaluations and checkpoints (the run's loop in vecrl.run: evaluations every eval_every steps and at the
    end, checkpoints every checkpoint_every steps and at the end)."""
    t = spec.train
    chunks = t.steps // t.chunk_steps
    warm = min(chunks, t.warmup_steps // t.chunk_steps)  # a chunk with any update step is an update chunk
    ends = range(t.chunk_steps, t.steps + 1, t.chunk_steps)
    evals = sum(1 for s in ends if (t.eval_every and s % t.eval_every == 0) or s == t.steps)
    checkpoints = sum(1 for s in ends if (t.checkpoint_every and s % t.checkpoint_every == 0) or s == t.steps)
    return {"warmup_chunks": warm, "update_chunks": chunks - warm, "evaluations": evals, "checkpoints": checkpoints}


def projected_seconds(schedule: dict[str, int], per_domain: dict[str, dict[str, float]],
                      checkpoint_s: float) -> float:
    """The whole run's time on one device: every domain's program runs its chunks and evaluations one after another
    (the run dispatches them together, so the device never waits on the host between them), and checkpoints block
    for the time their save takes to copy the state off the device."""
    total = schedule["checkpoints"] * checkpoint_s
    for t in per_domain.values():
        total += (schedule["warmup_chunks"] * t["warmup_chunk_s"] + schedule["update_chunks"] * t["update_chunk_s"]
                  + schedule["evaluations"] * t["evaluation_s"])
    return total


def project_spec(spec: RunSpec, directory: str) -> dict:
    """Measure every program of `spec` as the run builds it (its seeds, tasks, sizes and chunk length): the compile,
    a warm-up chunk, an update chunk and an evaluation, and one checkpoint of the whole run state written into
    `directory`; project the whole run's wall time from them (`projected_seconds`)."""
    from vecrl.checkpoint import Checkpoints  # pylint: disable=import-outside-toplevel

    _refuse_unavailable_precision(spec)
    schedule = spec_schedule(spec)
    t = spec.train
    per_domain, states = {}, {}
    compile_s = 0.0
    for domain, tasks in spec.domains().items():
        program = DomainProgram(spec, tasks)
        # Placed as `vecrl train` places it, so that the programs it compiled (in the compilation cache) serve here.
        state = jax.device_put(program.init(), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        t0 = time.perf_counter()
        chunk = program.chunk.lower(state).compile()
        evaluate = program.evaluate.lower(state).compile()
        compile_s += time.perf_counter() - t0
        times = {"warmup_chunk_s": [], "update_chunk_s": []}
        # Warm-up chunks until the updates start, then two update chunks. The first chunk run pays one-off costs
        # (allocation, transfers): a kind's time is the mean of its chunks after the first, or the first if alone.
        while len(times["update_chunk_s"]) < 2 and int(state.step) < t.steps:
            updating = int(state.step) + t.chunk_steps > t.warmup_steps
            t0 = time.perf_counter()
            state, _ = chunk(state)
            jax.block_until_ready(state)
            times["update_chunk_s" if updating else "warmup_chunk_s"].append(time.perf_counter() - t0)
        first_kind = "warmup_chunk_s" if times["warmup_chunk_s"] else "update_chunk_s"
        if len(times[first_kind]) > 1:
            times[first_kind].pop(0)
        t0 = time.perf_counter()
        jax.block_until_ready(evaluate(state))
        per_domain[domain] = {**{k: sum(v) / len(v) if v else 0.0 for k, v in times.items()},
                              "evaluation_s": time.perf_counter() - t0}
        states[domain] = state
    ckpt = Checkpoints(directory, keep=1)
    t0 = time.perf_counter()
    ckpt.save(1, {"domains": states})
    checkpoint_s = time.perf_counter() - t0
    ckpt.close()
    write_s = time.perf_counter() - t0
    seconds = projected_seconds(schedule, per_domain, checkpoint_s)
    return {"spec": spec.name, "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
            **schedule, "compile_s": round(compile_s, 1),
            "per_domain": {d: {k: round(v, 3) for k, v in x.items()} for d, x in per_domain.items()},
            "checkpoint_blocking_s": round(checkpoint_s, 3), "checkpoint_write_s": round(write_s, 3),
            "projected_run_s": round(seconds, 1), "projected_total_s": round(seconds + compile_s, 1)}
