"""`vecrl bench --suite gpu --out DIR`: the figures that decide whether the hard suite fits on one accelerator, in
one prepared run sized for about 8 minutes on an H100/H200 (compiles included), written as JSON lines as they are
measured (`DIR/gpu-bench.jsonl`), so that a run cut short still leaves its data.

1. Physics latency: env agent steps/s of humanoid-run and dog-run at batch 10 and 70 (jitted scan of vmapped steps),
   on MJX and, last, on the Warp backend (MJX on MuJoCo Warp; skipped with a row saying why where warp-lang is
   absent) and the host backend (dm_control's C MuJoCo on the machine's CPU cores, one callback per step).
2. MAD-TD at paper size (512 units, batch 512, 151 bins, UTD 8, MPC off) on humanoid-run, for 1 and for 10 seeds in
   one program: compile time, per-agent-step time of warm-up chunks (env, inserts; no updates) and of update chunks,
   agent steps/s, matmul FLOPs per agent step (`vecrl.flops`, loop trip counts included) and the FLOP/s achieved,
   XLA's own cost analysis of the chunk (loop bodies once), and the device's peak memory.
3. The update's FLOP and bytes per agent step (XLA's cost analysis, `vecrl.bench.update_cost`) and the FLOP/s the
   10-seed program achieves; then the 10-seed program again at each other matmul precision (paper size: bfloat16
   and float32; "default" is TF32 on recent NVIDIA GPUs).
4. The projected wall time of `madtd-hard` (7 tasks x 10 seeds x 1M agent steps, two programs) from those figures.

`--size quickstart` runs the same measurements with the quickstart's networks on cheap tasks (cartpole), which is
what a CPU can do in a few minutes; the tests run it that way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

import envs_mjx
from envs_mjx.bench import mjx_rates
from vecrl import config
from vecrl.bench import bench_spec, compiled_chunk, update_cost
from vecrl.config import RunSpec, validate
from vecrl.flops import traced_matmul_flops, xla_cost_flops

# What each size measures. Paper: the hard suite's figures. Quickstart: the same code paths, cheap enough for a CPU.
SUITES = {
    "paper": dict(physics_tasks=("humanoid-run", "dog-run"), train_task="humanoid-run", batches=(10, 70),
                  physics_steps=100, seeds=(10, 1), chunk_steps=50, update_chunks=3, capacity=1_000_000,
                  precisions=("default", "bfloat16", "float32"), other_physics=("warp", "host")),
    "quickstart": dict(physics_tasks=("cartpole-balance",), train_task="cartpole-balance", batches=(10, 70),
                       physics_steps=50, seeds=(10, 1), chunk_steps=20, update_chunks=2, capacity=10_000,
                       precisions=("default",), other_physics=("host",)),
}
HARD_SUITE = {"humanoid": 3, "dog": 4}  # madtd-hard's programs: tasks per domain (10 seeds each)
HARD_STEPS = 1_000_000


class JsonLines:
    def __init__(self, path: str):
        self.path = path

    def write(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def training_spec(task: str, seeds: int, size: str, chunk_steps: int, capacity: int,
                  precision: str = "default") -> RunSpec:
    """MAD-TD at `size` with MPC off, as `vecrl bench` sizes it (vecrl.bench.bench_spec), with replay `capacity`
    and matmul `precision`."""
    base = config.spec_from_dict({"name": "gpu-bench", "agent": "madtd", "tasks": [task], "madtd": {"mpc": False}})
    spec = bench_spec(base, seeds, size, chunk_steps)
    spec = dataclasses.replace(spec, name=f"gpu-bench-{size}-{seeds}",
                               train=dataclasses.replace(spec.train, capacity=max(capacity, spec.train.capacity),
                                                         matmul_precision=precision))
    validate(spec)
    return spec


def measure_training(spec: RunSpec, update_chunks: int) -> dict:
    state, traced, compiled, compile_s = compiled_chunk(spec)
    k = spec.train.chunk_steps
    lanes = len(spec.seeds) * len(spec.tasks)
    warm_times = []
    while int(state.step) < spec.train.warmup_steps:
        t = time.perf_counter()
        state, _ = compiled(state)
        jax.block_until_ready(state)
        warm_times.append(time.perf_counter() - t)
    state, _ = compiled(state)  # the first update chunk: not timed
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(update_chunks):
        state, out = compiled(state)
    jax.block_until_ready(state)
    update_s = (time.perf_counter() - t) / (update_chunks * k)
    # The first warm-up chunk pays one-time costs (allocation, transfers); the rest are steady.
    warm_s = float(np.median(warm_times[1:] if len(warm_times) > 1 else warm_times)) / k
    flops = traced_matmul_flops(traced) / k
    rejected = int(np.asarray(out["rejected_update"]).sum())
    return {"seeds": len(spec.seeds), "tasks": len(spec.tasks), "lanes": lanes, "compile_s": round(compile_s, 1),
            "warmup_ms_per_agent_step": round(warm_s * 1e3, 3), "update_ms_per_agent_step": round(update_s * 1e3, 3),
            "env_share_of_update_step": round(warm_s / update_s, 3),
            "agent_steps_per_s_per_seed": round(1 / update_s, 2),
            "agent_steps_per_s_total": round(lanes / update_s, 1),
            "matmul_gflop_per_agent_step_per_seed": round(flops / lanes / 1e9, 3),
            "achieved_matmul_tflop_per_s": round(flops / update_s / 1e12, 4),
            "xla_cost_analysis_gflop_per_chunk": (round(xla_cost_flops(compiled) / 1e9, 3)
                                                  if xla_cost_flops(compiled) is not None else None),
            "peak_device_memory_gib": (round(peak_memory_bytes() / 2**30, 2)
                                       if peak_memory_bytes() is not None else None),
            "rejected_updates": rejected}


def project_hard_suite(physics: dict[tuple[str, int], float], training: dict[int, dict]) -> dict | None:
    """Wall time of madtd-hard (MPC off, evaluation excluded) from the measurements: per program and agent step,
    the update part of the 10-seed humanoid chunk (update minus warm-up time) times its number of tasks (the update
    is per lane), plus the physics step at that program's batch, interpolated in log-batch between the measured
    batches 10 and 70 of its domain."""
    if 10 not in training:
        return None
    update_only_s = (training[10]["update_ms_per_agent_step"] - training[10]["warmup_ms_per_agent_step"]) / 1e3
    per_program, total = {}, 0.0
    for domain, tasks in HARD_SUITE.items():
        batch = 10 * tasks
        rates = {b: r for (d, b), r in physics.items() if d == domain}
        if len(rates) < 2:
            return None
        (b0, r0), (b1, r1) = sorted(rates.items())[:2]
        # steps/s summed over the batch, interpolated in log-log between the two measured batches
        rate = float(np.exp(np.interp(np.log(batch), np.log([b0, b1]), np.log([r0, r1]))))
        step_s = update_only_s * tasks + batch / rate
        per_program[domain] = round(step_s * HARD_STEPS / 3600, 2)
        total += step_s * HARD_STEPS
    return {"metric": "projected madtd-hard wall time (h), MPC off, evaluation excluded",
            "hours_per_program": per_program, "hours_one_device_sequential": round(total / 3600, 2)}


def run_gpu_suite(out_dir: str, size: str | None = None) -> str:
    size = size or ("quickstart" if jax.default_backend() == "cpu" else "paper")
    suite = SUITES[size]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu-bench.jsonl")
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: choose another --out (results are never overwritten)")
    out = JsonLines(path)
    device = jax.devices()[0]
    out.write({"kind": "device", "backend": jax.default_backend(), "device": device.device_kind,
               "devices": len(jax.devices()), "jax": jax.__version__, "size": size,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    t_start = time.perf_counter()
    physics: dict[tuple[str, int], float] = {}
    training: dict[int, dict] = {}

    def physics_rows(task, backend="jax"):
        for batch in suite["batches"]:
            row = mjx_rates([task], batch, suite["physics_steps"], action_repeat=2, physics=backend)[0]
            if backend == "jax":  # what the training programs step, and so the projection's
                physics[(task.split("-")[0], batch)] = row["agent_steps_per_s"]
            out.write({"kind": "physics", **row, "ms_per_agent_step": round(1e3 * batch / row["agent_steps_per_s"], 3),
                       "elapsed_s": round(time.perf_counter() - t_start, 1)})

    # Cheapest first and the headline early: whatever is cut off by a time limit, the rest is on disk.
    physics_rows(suite["physics_tasks"][0])
    for seeds in suite["seeds"]:
        spec = training_spec(suite["train_task"], seeds, size, suite["chunk_steps"], suite["capacity"])
        row = measure_training(spec, suite["update_chunks"])
        training[seeds] = row
        out.write({"kind": "madtd", "size": size, "task": suite["train_task"], "mpc": False, "precision": "default",
                   **row, "elapsed_s": round(time.perf_counter() - t_start, 1)})
    if 1 in training and 10 in training:
        out.write({"kind": "seed_scaling", "metric": "time of ten 1-seed runs / one 10-seed run",
                   "value": round(training[10]["agent_steps_per_s_total"] / training[1]["agent_steps_per_s_total"], 2)})
    # The update's cost per lane and agent step (XLA's count; floors), and the FLOP/s the 10-seed program achieved.
    seeds = max(suite["seeds"])
    cost = update_cost(training_spec(suite["train_task"], seeds, size, suite["chunk_steps"], suite["capacity"]))
    out.write({"kind": "madtd_update_cost", "seeds": seeds, **cost,
               "update_tflop_per_s": round(cost["update_gflop_per_agent_step"]
                                           * training[seeds]["agent_steps_per_s_total"] / 1e3, 4),
               "elapsed_s": round(time.perf_counter() - t_start, 1)})
    for precision in suite["precisions"][1:]:  # the other matmul precisions, on the 10-seed program
        row = measure_training(training_spec(suite["train_task"], seeds, size, suite["chunk_steps"],
                                             suite["capacity"], precision), suite["update_chunks"])
        out.write({"kind": "madtd", "size": size, "task": suite["train_task"], "mpc": False, "precision": precision,
                   **row, "elapsed_s": round(time.perf_counter() - t_start, 1)})
    for task in suite["physics_tasks"][1:]:
        physics_rows(task)
    projection = project_hard_suite(physics, training) if size == "paper" else None
    if projection:
        out.write({"kind": "projection", **projection})
    for backend in suite["other_physics"]:
        problem = envs_mjx.backend_problem(backend)
        if problem:  # e.g. a GPU node without warp-lang: the other backends' rows are still worth having
            out.write({"kind": "physics_skipped", "physics": backend, "why": problem})
            continue
        for task in suite["physics_tasks"]:
            physics_rows(task, backend)
    out.write({"kind": "done", "elapsed_s": round(time.perf_counter() - t_start, 1)})
    return path
