"""Matrix-multiply FLOPs of a traced program, with loop trip counts.

XLA's cost analysis (`compiled.cost_analysis()["flops"]`) counts the body of every loop once, so for a chunk (a scan
over agent steps holding a scan over UTD updates) it reports about one critic update, not one agent step. This
counter walks the jaxpr instead: every `dot_general` costs 2 * (output elements) * (contracted size), multiplied by
the trip counts of the scans around it (a `fori_loop` with static bounds is a scan). A `cond` counts its costliest
branch; a `while_loop` (MJX's constraint solver) has no static trip count and counts its body once, so the total is
a lower bound where one is involved. Matmuls are what an accelerator's peak is quoted for; the rest of a step (MJX's
kinematics, elementwise work) adds little arithmetic but much latency, which the timings show.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jax_core


def _dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    contracted = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2 * math.prod(out.shape) * contracted


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        if isinstance(value, jax_core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax_core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                if isinstance(v, jax_core.ClosedJaxpr):
                    yield v.jaxpr
                elif isinstance(v, jax_core.Jaxpr):
                    yield v


def jaxpr_matmul_flops(jaxpr) -> int:
    """Matmul FLOPs of one evaluation of `jaxpr` (a Jaxpr or ClosedJaxpr), loops counted as described above."""
    if isinstance(jaxpr, jax_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_matmul_flops(b) for b in eqn.params["branches"])
        else:  # while (body once), pjit, custom_jvp/vjp, remat, ...: each sub-jaxpr once
            total += sum(jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn))
    return total


def traced_matmul_flops(traced) -> int:
    """Matmul FLOPs of a `jax.jit(f).trace(...)` result."""
    return jaxpr_matmul_flops(traced.jaxpr)


def xla_cost_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled program (loop bodies once), where the backend reports one."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if isinstance(analysis, dict) else None
    return float(flops) if flops is not None and flops >= 0 else None


def host_matmul_flops_per_s(size: int = 1024, repeats: int = 5) -> float:
    """This device's float32 matmul rate, measured on a square matmul (the best of `repeats`)."""
    import time  # pylint: disable=import-outside-toplevel

    x = jax.numpy.ones((size, size), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
