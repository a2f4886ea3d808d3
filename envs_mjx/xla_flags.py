"""XLA settings that CPU runs of MJX need (see docs/dependencies.md).

jax 0.10.x's concurrency-optimised CPU scheduler can deadlock jitted, vmapped `mjx.step` (measured with
humanoid and quadruped at batch 64); turning it off costs 0-10% throughput. The flag only concerns the CPU
backend, so it is harmless where a GPU runs the work. It must be in XLA_FLAGS before jax's CPU client starts.
"""

import os

CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def apply() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        name = flag.split("=")[0]
        if name not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    os.environ.setdefault("MUJOCO_GL", "disable")  # headless: no GLFW display error on import


def enable_compilation_cache(path: str | None = None) -> str:
    """Keep compiled XLA programs on disk (default ~/.cache/vecrl/xla, or $VECRL_XLA_CACHE), so a second run
    of the same program (a resumed run, a rerun, the test suite) skips MJX's tens of seconds of compilation.
    VECRL_XLA_CACHE=off leaves it off (returns "")."""
    import jax  # pylint: disable=import-outside-toplevel

    path = path or os.environ.get("VECRL_XLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vecrl", "xla")
    if path == "off":
        return ""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    return path


# Per-program options (a domain's `compiler_options`, applied by `Env.jit`), not process-wide flags. XLA's CPU
# fusion emitters split a fusion into subgraph functions that LLVM inlines at every use; for dog's kinematics that
# turns one kernel's 150 kB of IR into 28 MB, which LLVM's register allocator did not finish in 10 minutes, and
# swimmer's step ran 28x slower at batch 100 than with the legacy emitters (docs/envs/dog.md, swimmer.md). Not
# process-wide: the legacy emitters compiled the quickstart's training program more slowly and ran it ~15% slower.
LEGACY_CPU_FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
