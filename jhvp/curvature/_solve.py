"""Conjugate gradients on (A + λI) x = b, with Steihaug's negative-curvature rule.

One `lax.while_loop` inside one jitted program; derivatives with respect to b by implicit
differentiation (`jax.lax.custom_linear_solve`), so `jax.grad` through a solve costs one more
solve, never a backward pass through the iterations.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import Operator, PyTree
from . import _checks, _flow
from . import _vectors as vec

NegativeCurvature = Literal["ignore", "stop"]
_NEGATIVE_CURVATURE: tuple[str, ...] = get_args(NegativeCurvature)


class SolveResult(NamedTuple):
    """The result of `solve`."""

    x: PyTree
    """The solution, with the structure of b."""
    num_steps: jax.Array
    """CG iterations run; each costs one matvec (one more, uncounted, forms b − A x0)."""
    residual_norm: jax.Array
    """‖b − (A + λI) x‖ as CG's recurrence tracks it (equal to the true one up to rounding)."""
    converged: jax.Array
    """Whether residual_norm ≤ max(rtol‖b‖, atol)."""
    negative_curvature: jax.Array
    """Whether some search direction p had pᵀ(A + λI)p ≤ 0 (the operator is not positive)."""


def _cg(op, matvec, rhs, x0, tols, *, max_steps, stop, has_x0):
    """CG (Hestenes & Stiefel 1952) with Steihaug's (1983) stop on pᵀAp ≤ 0.

    Stops when ‖r‖ ≤ max(rtol‖rhs‖, atol), after max_steps iterations, or (stop=True) at the
    first direction of non-positive curvature: then x is the last iterate, or x0 + r0 (the
    steepest-descent direction of ½xᵀAx − bᵀx) if that happens at the first step
    (Nocedal & Wright 2006, Algorithm 7.1).
    """
    rtol, atol = tols
    dtype = rtol.dtype
    bound = jnp.maximum(rtol * vec.norm(rhs, dtype), atol)
    r0 = vec.sub(rhs, matvec(x0)) if has_x0 else rhs
    rs0 = vec.dot(r0, r0, dtype)

    def cond(state):
        k, _, _, _, rs, _, halted = state
        return (k < max_steps) & (rs > bound * bound) & ~halted

    def body(state):
        k, x, r, p, rs, negative, _ = state
        ap = matvec(p)
        pap = vec.dot(p, ap, dtype)
        curved = pap <= jnp.zeros((), dtype)
        alpha = rs / pap
        x_cg, r_cg = vec.axpy(alpha, p, x), vec.axpy(-alpha, ap, r)
        rs_cg = vec.dot(r_cg, r_cg, dtype)
        p_cg = vec.axpy(rs_cg / rs, p, r_cg)
        if stop:
            first = k == 0
            # At the first step x0 + p0 = x0 + r0 is the steepest-descent step; later, keep x_k.
            x_neg = vec.where(first, vec.add(x, p), x)
            r_neg = vec.where(first, vec.sub(r, ap), r)
            x_new = vec.where(curved, x_neg, x_cg)
            r_new = vec.where(curved, r_neg, r_cg)
            rs_new = jnp.where(curved, vec.dot(r_new, r_new, dtype), rs_cg)
            halted = curved
        else:
            x_new, r_new, rs_new, halted = x_cg, r_cg, rs_cg, jnp.zeros((), bool)
        return k + 1, x_new, r_new, p_cg, rs_new, negative | curved, halted

    state = (jnp.zeros((), jnp.int32), x0, r0, r0, rs0, jnp.zeros((), bool), jnp.zeros((), bool))
    k, x, _, _, rs, negative, _ = _flow.while_loop(op, cond, body, state)
    norm = jnp.sqrt(rs)
    return x, (k, norm, norm <= bound, negative)


def _solve_impl(op, b, x0, damping, rtol, atol, *, max_steps, stop):
    dtype, n = op.dtype, op.n
    lam = jnp.asarray(damping, dtype)

    def matvec(v):
        return vec.axpy(lam, v, op.matvec(v))

    rhs = vec.constrain(op, vec.astype(b, dtype))
    has_x0 = x0 is not None
    start = vec.constrain(op, vec.astype(x0, dtype)) if has_x0 else vec.zeros(op)
    steps = 10 * n if max_steps is None else max_steps
    tols = (jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype))

    def cg(mv, r):
        return _cg(op, mv, r, start, tols, max_steps=steps, stop=stop, has_x0=has_x0)

    if op.streamed is not None:  # data on the host: CG from a Python loop, no derivatives
        x, (k, norm, converged, negative) = cg(matvec, rhs)
        return SolveResult(op.to_struct(x), k, norm, converged, negative)

    # Implicit differentiation: d x = (A + λI)⁻¹ d b, one more (symmetric) solve per tangent.
    x, (k, norm, converged, negative) = jax.lax.custom_linear_solve(
        matvec, rhs, cg, symmetric=True, has_aux=True
    )
    return SolveResult(op.to_struct(x), k, norm, converged, negative)


def solve(
    op: Operator,
    b: PyTree,
    *,
    damping: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_steps: int | None = None,
    x0: PyTree | None = None,
    negative_curvature: NegativeCurvature = "ignore",
    progress: bool = False,
) -> SolveResult:
    """Solves (A + λI) x = b by conjugate gradients, λ = `damping`.

    CG (Hestenes & Stiefel 1952) runs in one `jax.lax.while_loop` until
    ‖b − (A + λI)x‖ ≤ max(rtol‖b‖, atol) or `max_steps` iterations, one matvec each. With
    ``negative_curvature="stop"`` it follows Steihaug (1983), the rule of Newton-CG and trust
    regions: at the first direction p with pᵀ(A + λI)p ≤ 0 it stops, sets the flag and returns
    the last iterate, or x0 + r0 (b itself when x0 is None: the steepest-descent direction)
    when that happens at the first step. With ``"ignore"`` CG carries on as if A + λI were
    positive definite (it may still converge for an indefinite, nonsingular one) and only
    reports the flag. Memory: 4 vectors beyond b (x, r, p and A p; each with the parameters'
    layout, leaf by leaf: 1/d of a vector per device on d devices).

    The result is differentiable with respect to b by implicit differentiation
    (`jax.lax.custom_linear_solve`): a JVP or VJP costs one more solve. `jax.vmap` over a stack
    of right-hand sides works (influence functions); the loop then runs until all have converged.

    Args:
        op: A `jhvp.HessianOperator`, another jhvp operator, or a symmetric linear callable
            v -> A v on pytrees (b gives its structure).
        b: The right-hand side, with the structure of the vectors op applies to.
        damping: λ ≥ 0, added to the diagonal (Levenberg-Marquardt / Tikhonov). Traced, so
            changing it does not recompile.
        rtol: Relative tolerance on the residual norm.
        atol: Absolute tolerance on the residual norm.
        max_steps: The most CG iterations; None means 10·n.
        x0: An initial guess with b's structure (None: zeros). Costs one extra matvec.
        negative_curvature: "ignore" or "stop" (Steihaug's rule), see above.

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

    Returns:
        A `SolveResult` (x, num_steps, residual_norm, converged, negative_curvature).

    Raises:
        TypeError: `max_steps` is not an int.
        ValueError: Negative `damping`, `rtol` or `atol`; `max_steps` < 1; an unknown
            `negative_curvature`; b or x0 without the operator's structure.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import curvature
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> result = curvature.solve(lambda v: A @ v, jnp.array([1.0, 2.0]), rtol=1e-6)
        >>> print(jnp.round(result.x, 4), bool(result.converged))
        [0.0909 0.6364] True
    """
    api = "jhvp.curvature.solve"
    _checks.check_choice(negative_curvature, _NEGATIVE_CURVATURE, "negative_curvature", api)
    for name, value in (("damping", damping), ("rtol", rtol), ("atol", atol)):
        _checks.check_scalar_option(value, name, api)
    steps = _checks.check_int(max_steps, "max_steps", api, optional=True,
                              why=" (or None for the default 10·n)")
    b = _protocol.gradient_form(op, b)
    if hasattr(op, "in_structure"):
        struct, name = _protocol.structure(op, None, api), "like"
    else:  # a plain callable: b gives the structure
        struct, name = _protocol.structure(op, b, api, name="b"), "b"
    b = _checks.check_vector(b, struct, "b", api)
    if x0 is not None:
        x0 = _checks.check_vector(_protocol.gradient_form(op, x0), struct, "x0", api)
    return _protocol.run(
        _solve_impl, op, struct, b, x0, damping, rtol, atol, api=api, progress=progress,
        budget=steps, name=name,
        max_steps=steps, stop=negative_curvature == "stop",
    )
