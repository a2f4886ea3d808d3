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
