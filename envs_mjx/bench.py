"""Throughput of envs_mjx tasks: agent steps/s under vmap at several batch sizes on each physics backend, compile
time, and dm_control's own single-environment CPU rate for comparison.

    python -m envs_mjx.bench walker-run humanoid-run --batch 1 10 100 --steps 50 --action-repeat 2 --jsonl out.jsonl
    python -m envs_mjx.bench dog-run --physics jax warp host  # one column per backend and batch size
    python -m envs_mjx.bench --markdown out.jsonl      # the table, one line per task

Agent steps/s counts environment steps summed over the batch (one agent step = `action_repeat` control
steps). Steps run inside one jitted `lax.scan` (as in the trainer), with uniform random actions.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from envs_mjx.registry import BACKENDS, list_tasks, make, program_groups


def mjx_rates(tasks: list[str], batch: int, steps: int, action_repeat: int, seed: int = 0,
              physics: str = "jax") -> list[dict]:
    """Rates of tasks sharing one program (a domain's) on the `physics` backend: compiled once (task parameters are
    data), measured per task."""
    env = make(tasks[0], action_repeat=action_repeat, backend=physics, worlds=batch)

    def rollout(key, params):
        states = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, batch), params)

        def body(states, k):
            actions = jax.random.uniform(k, (batch, env.action_size), minval=-1, maxval=1)
            states = jax.vmap(env.step)(states, actions)
            return states, states.reward

        _, rewards = jax.lax.scan(body, states, jax.random.split(key, steps))
        return rewards

    key = jax.random.key(seed)
    t0 = time.perf_counter()
    compiled = env.jit(rollout).lower(key, env.params).compile()
    compile_s = time.perf_counter() - t0
    rows = []
    for task in tasks:
        params = env.task_params(task.split("-", 1)[1])
        jax.block_until_ready(compiled(key, params))  # warm
        timed_key = jax.block_until_ready(jax.random.fold_in(key, 1))  # eager ops compile on first use: not timed
        t0 = time.perf_counter()
        rewards = jax.block_until_ready(compiled(timed_key, params))
        run_s = time.perf_counter() - t0
        rows.append({"task": task, "physics": physics, "batch": batch, "steps": steps, "action_repeat": action_repeat,
                     "compile_s": round(compile_s, 2), "agent_steps_per_s": round(batch * steps / run_s, 1),
                     "rewards_finite": bool(np.all(np.isfinite(np.asarray(rewards)))),
                     **({"threads": env.threads} if physics == "host" else {})})
    return rows


def dm_control_rate(task: str, steps: int, action_repeat: int, seed: int = 0) -> dict:
    from envs_mjx.parity import load_dm_control  # pylint: disable=import-outside-toplevel

    env = load_dm_control(task, seed)
    spec = env.action_spec()
    rng = np.random.default_rng(seed)
    env.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        action = rng.uniform(spec.minimum, spec.maximum)
        for _ in range(action_repeat):
            ts = env.step(action)
            if ts.last():
                env.reset()
    return {"task": task, "action_repeat": action_repeat,
            "dm_control_agent_steps_per_s": round(steps / (time.perf_counter() - t0), 1)}


def markdown_table(rows: list[dict]) -> str:
    """One line per task: dm_control's rate, then compile time and agent steps/s of each backend at each batch size
    (rows without a "physics" key are MJX-JAX's, as files written before there were other backends)."""
    columns = sorted({(r.get("physics", "jax"), r["batch"]) for r in rows if "batch" in r},
                     key=lambda c: (BACKENDS.index(c[0]), c[1]))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = {"jax": "MJX", "warp": "Warp", "host": "host"}
    head = ["task", "dm_control, 1 env"] + [f"{names[p]} batch {b} (compile s)" for p, b in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        dm = [r for r in rows if r["task"] == task and "dm_control_agent_steps_per_s" in r]
        cells = [task, f"{dm[0]['dm_control_agent_steps_per_s']:,.0f}" if dm else ""]
        for p, b in columns:
            m = [r for r in rows if r["task"] == task and r.get("batch") == b and r.get("physics", "jax") == p]
            cells.append(f"{m[0]['agent_steps_per_s']:,.0f} ({m[0]['compile_s']:.0f})" if m else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="*", help="task names (default: all)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--steps", type=int, default=50, help="agent steps per measured rollout")
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--physics", nargs="+", default=["jax"], choices=BACKENDS, help="physics backends to time")
    parser.add_argument("--dm-control-steps", type=int, default=500)
    parser.add_argument("--jsonl", help="append results to this file")
    parser.add_argument("--markdown", metavar="JSONL", help="print the table of an earlier --jsonl file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table([json.loads(line) for line in f if line.strip()]))
        return
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    for tasks in program_groups(args.tasks or list_tasks()).values():
        rows = [dm_control_rate(task, args.dm_control_steps, args.action_repeat) for task in tasks]
        for physics in args.physics:
            for b in args.batch:
                rows += mjx_rates(tasks, b, args.steps, args.action_repeat, physics=physics)
        for row in rows:
            row["backend"] = jax.default_backend()  # the device the programs ran on
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
