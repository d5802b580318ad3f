"""The "auto" strategy of `hessian_operator`: store linearization residuals, or recompute.

XLA's cost model counts flops and bytes; a roofline weighs them. 10 flops per byte is a middle
machine balance (CPUs ~5-20, GPUs ~20-100); the choice only has to separate compute-bound programs
(matrix products: storing residuals saves recomputing them) from memory-bound ones (elementwise
maths: reading stored residuals costs more than recomputing them from the primals). It counts
neither kernel launches nor host time, so it is not calibrated for launch-bound GPU problems.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_FLOPS_PER_BYTE = 10.0


def _cost_options() -> dict | None:
    # The cost model reads the HLO after XLA's fusion passes; the machine code is never run.
    # On the CPU backend -O0 code generation gives the same flops and bytes (checked on the
    # MLP and Rosenbrock operators) in about two thirds of the compilation time, which every
    # first `hessian_operator` call on a new shape pays twice.
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def estimated_cost(fn: Callable, *args) -> float | None:
    """Returns XLA's roofline estimate for jit(fn)(*args), or None where no cost model answers."""
    avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args)
    try:
        lowered = jax.jit(fn).lower(*avals)
        analysis = lowered.compile(compiler_options=_cost_options()).cost_analysis()
    except Exception:  # noqa: BLE001 - the cost model is advisory; fall back to linearizing
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis or "bytes accessed" not in analysis:
        return None
    return analysis["flops"] / _FLOPS_PER_BYTE + analysis["bytes accessed"]


def choose(apply_stored: Callable, stored_args: tuple, recompute: Callable,
           recompute_args: tuple) -> str:
    """Returns "recompute" where XLA estimates it cheaper than applying stored residuals."""
    stored = estimated_cost(apply_stored, *stored_args)
    fresh = estimated_cost(recompute, *recompute_args)
    if stored is None or fresh is None:
        return "linearize"
    return "recompute" if fresh < stored else "linearize"
