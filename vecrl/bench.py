"""`vecrl bench`: trainer throughput against the number of seeds, and the speed-up of one many-seed program
over one-seed programs run in sequence.

For each seed count the spec's first domain is built as one program; warm-up chunks (random actions, no
updates) fill the buffers, then `--chunks` chunks of updates are timed. Agent steps/s are per seed (each seed
advances that many steps per second); gradient steps/s count critic updates summed over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax

from vecrl.config import RunSpec, TrainConfig, validate
from vecrl.train import DomainProgram

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
            "agent_steps_per_s_per_seed": round(agent_steps / seconds, 2),
            "agent_steps_per_s_total": round(agent_steps * lanes / seconds, 1),
            "gradient_steps_per_s": round(agent_steps * lanes * spec.agent_config.utd / seconds, 1)}


def run_bench(spec: RunSpec, seeds: list[int], sizes: list[str], chunks: int, chunk_steps: int, jsonl: str | None):
    device = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    results = []
    for size in sizes:
        rows = {}
        for n in seeds:
            row = {"agent": spec.agent, "size": size, "task": ",".join(bench_spec(spec, n, size, chunk_steps).tasks),
                   "device": device,
                   **measure(bench_spec(spec, n, size, chunk_steps), chunks)}
            rows[n] = row
            print(json.dumps(row), flush=True)
            results.append(row)
        if 1 in rows and 10 in rows:
            ratio = {"size": size, "device": device, "metric": "time of ten 1-seed runs / one 10-seed run",
                     "value": round(rows[10]["agent_steps_per_s_total"] / rows[1]["agent_steps_per_s_total"], 2)}
            print(json.dumps(ratio), flush=True)
            results.append(ratio)
    if jsonl:
        with open(jsonl, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results
