"""The `vecrl` command line: train, resume, report, bench, memory, spec, tasks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _print_summary(summary: dict) -> None:
    print(f"\n{summary['name']}: {summary['status']} at step {summary['step']}/{summary['steps']} "
          f"({summary['wall_time_s']:.0f} s, {summary['device']})")
    for task, s in summary["tasks"].items():
        ev, tr = s["final_eval_return_mean"], s["final_train_return_mean"]
        ev = f"{ev:.1f} +- {s['final_eval_return_std']:.1f}" if ev is not None else "-"
        tr = f"{tr:.1f}" if tr is not None else "-"
        flagged = f"  flagged seeds: {s['flagged_seeds']}" if s["flagged_seeds"] else ""
        print(f"  {task:26s} eval return {ev:>18s}   train return {tr:>8s}{flagged}")
    print(f"run folder: {summary['run_dir']}")


def _exit_code(summary: dict) -> int:
    return 128 + summary["signal"] if summary.get("signal") else 0


def _cmd_train(args) -> int:
    from vecrl import config, run  # pylint: disable=import-outside-toplevel

    spec = config.load_spec(args.spec, args.set or [])
    summary = run.train(spec, args.out, progress=not args.no_progress)
    _print_summary(summary)
    return _exit_code(summary)


def _cmd_resume(args) -> int:
    from vecrl import config, run  # pylint: disable=import-outside-toplevel

    spec = config.load_spec(args.spec, args.set or []) if (args.spec or args.set) else None
    summary = run.resume(args.run_dir, progress=not args.no_progress, spec=spec)
    _print_summary(summary)
    return _exit_code(summary)


def _cmd_tasks(args) -> int:
    import envs_mjx  # pylint: disable=import-outside-toplevel

    for domain in envs_mjx.DOMAINS:
        print(f"{domain:12s} " + " ".join(t.split("-", 1)[1] for t in envs_mjx.list_tasks(domain)))
    return 0


def _cmd_spec(args) -> int:
    from vecrl import config  # pylint: disable=import-outside-toplevel

    print(json.dumps(config.load_spec(args.spec, args.set or []).to_dict(), indent=2))
    return 0


def _cmd_bench(args) -> int:
    from vecrl import bench, config  # pylint: disable=import-outside-toplevel

    if args.suite == "gpu":
        from vecrl import gpubench  # pylint: disable=import-outside-toplevel

        if not args.out:
            raise config.SpecError("--suite gpu needs --out DIR (results are written there as they are measured)")
        if args.size and len(args.size) > 1:
            raise config.SpecError("--suite gpu takes one --size (default: paper on an accelerator, quickstart on a CPU)")
        try:
            path = gpubench.run_gpu_suite(args.out, args.size[0] if args.size else None)
        except FileExistsError as e:
            raise config.SpecError(str(e)) from None
        print(f"results: {path}")
        return 0
    spec = config.load_spec(args.spec, args.set or [])
    if args.suite == "project":
        import tempfile  # pylint: disable=import-outside-toplevel

        from vecrl.run import format_duration  # pylint: disable=import-outside-toplevel

        with tempfile.TemporaryDirectory(prefix="vecrl-bench-") as directory:
            result = bench.project_spec(spec, directory)
        print(json.dumps(result), flush=True)
        print(f"{spec.name}: projected {format_duration(result['projected_total_s'])} on this device "
              f"({result['compile_s']:.0f} s compiling), evaluation and checkpoints included")
        return 0
    bench.run_bench(spec, args.seeds, args.size or ["quickstart", "paper"], args.chunks, args.chunk_steps, args.jsonl,
                    tuple(args.precision))
    return 0


def _cmd_memory(args) -> int:
    from vecrl import config, run  # pylint: disable=import-outside-toplevel
    from vecrl.train import DomainProgram  # pylint: disable=import-outside-toplevel

    spec = config.load_spec(args.spec, args.set or [])
    total = 0
    for domain, tasks in spec.domains().items():
        state = DomainProgram(spec, tasks).abstract_state()
        buffers = run.tree_bytes(state.lanes.buffer) + run.tree_bytes(state.lanes.held_out)
        n = run.tree_bytes(state)
        total += n
        print(f"{domain:10s} {len(spec.seeds)} seeds x {len(tasks)} tasks: {n / 2**30:7.2f} GiB "
              f"(replay {buffers / 2**30:.2f} GiB, agents {run.tree_bytes(state.lanes.agent) / 2**30:.3f} GiB)")
    available, what = run.available_memory()
    print(f"total      {total / 2**30:7.2f} GiB of run state; {available / 2**30:.1f} GiB of {what} available")
    return 0


def _cmd_check(args) -> int:
    from vecrl import config, run  # pylint: disable=import-outside-toplevel

    names = args.specs or [config.DEFAULT_SPEC]
    if names == ["all"]:
        names = config.shipped_specs()
    specs = [config.load_spec(n, args.set or []) for n in names]  # every spec valid before any tracing
    failed = 0
    for spec in specs:
        try:
            result = run.check(spec)
        except Exception as e:  # pylint: disable=broad-except  (a checker reports every spec's failure and goes on)
            print(f"{spec.name}: FAILS: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            failed += 1
            continue
        parts = [f"{d} ({len(v['tasks'])} task(s) x {len(spec.seeds)} seed(s)) {v['state_bytes'] / 2**30:.2f} GiB, "
                 f"lowered in {v['lowered_s']:.0f} s" for d, v in result["domains"].items()]
        fits = f"; does not fit here: {result['shortfall']}" if result["shortfall"] else "; fits here"
        print(f"{spec.name}: starts: " + "; ".join(parts) + fits, flush=True)
    return 1 if failed else 0


def _cmd_report(args) -> int:
    from vecrl import report  # pylint: disable=import-outside-toplevel

    out = args.out or (os.path.join(args.run_dirs[0], "report") if len(args.run_dirs) == 1
                       else os.path.join("outputs", f"report-{time.strftime('%Y%m%d-%H%M%S')}"))
    try:
        result = report.make_report(args.run_dirs, out, reps=args.reps)
    except report.ReportError as e:
        print(f"vecrl report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {result['report']} ({len(result['figures'])} figures)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vecrl", description="Many-seed model-based off-policy RL on MJX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a spec (default: the built-in quickstart)")
    p.add_argument("spec", nargs="?", help="a spec name in runs/ or a path to a .toml file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key, e.g. train.steps=20000")
    p.add_argument("--out", help="run folder (default: outputs/<name>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("spec", nargs="?", help="optional: refuse unless the run was started with this spec")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("spec", help="print a spec fully resolved (defaults and overrides applied)")
    p.add_argument("spec", nargs="?")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_spec)

    p = sub.add_parser("bench", help="trainer throughput vs number of seeds (quickstart and paper network sizes)")
    p.add_argument("spec", nargs="?", help="spec whose first domain, agent and action repeat are used")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    p.add_argument("--suite", choices=["seeds", "gpu", "project"], default="seeds",
                   help="seeds: throughput vs number of seeds, with the update's FLOP and bytes per agent step "
                        "(default); gpu: the prepared accelerator benchmark (physics latency, paper-size MAD-TD for 1 "
                        "and 10 seeds, FLOP/s, memory, hard-suite projection); project: the wall time of a whole run "
                        "of the spec on this device, from its programs' measured chunks, evaluation and checkpoint")
    p.add_argument("--precision", nargs="+", default=["default"], choices=["default", "float32", "tf32", "bfloat16"],
                   help="--suite seeds: matmul precisions to measure (train.matmul_precision)")
    p.add_argument("--out", help="--suite gpu: folder for gpu-bench.jsonl")
    p.add_argument("--size", nargs="+", choices=["quickstart", "paper"],
                   help="network and update sizes (default: both; --suite gpu: paper on an accelerator, else quickstart)")
    p.add_argument("--chunks", type=int, default=3, help="timed chunks of updates per measurement")
    p.add_argument("--chunk-steps", type=int, default=50)
    p.add_argument("--jsonl", help="append the results to this file")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("memory", help="memory a spec's run state takes, per domain (computed, nothing compiled)")
    p.add_argument("spec", nargs="?")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("check", help="check that specs start: state shaped, memory, programs lowered (no compiling)")
    p.add_argument("specs", nargs="*", metavar="SPEC", help="spec names or .toml paths, or `all` for every spec in runs/")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("report", help="curves, aggregate scores, regret and diagnostics of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (in progress, stopped or complete)")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report for one run, else outputs/report-<time>)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap replicates per interval")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("tasks", help="list the DMC tasks available on MJX")
    p.set_defaults(func=_cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from envs_mjx.xla_flags import enable_compilation_cache  # pylint: disable=import-outside-toplevel
    from vecrl.config import SpecError  # pylint: disable=import-outside-toplevel
    from vecrl.run import RunError  # pylint: disable=import-outside-toplevel

    enable_compilation_cache()
    try:
        return args.func(args)
    except (SpecError, RunError) as e:
        print(f"vecrl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
