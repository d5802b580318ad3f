"""Extreme eigenpairs of a symmetric operator: Lanczos with Ritz pairs, and power iteration."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import PyTree
from . import _checks, _lanczos

WHICH = ("LA", "SA", "LM")
# `converged`'s relative tolerance, by the operator's bits (16-bit: just above its ε).
_CONVERGED_RTOL = {64: 1e-8, 32: 1e-4, 16: 1e-2}


class EighResult(NamedTuple):
    """Approximate eigenpairs of a symmetric operator, most extreme first.

    Scalars (`eigenvalues`, `residual_norms`) have the operator's dtype, float32 for a
    bfloat16 or float16 operator; eigenvectors have the operator's dtype.
    """

    eigenvalues: jax.Array
    """(k,): the Ritz values, ordered by `which` (LA descending, SA ascending, LM by |λ|)."""
    eigenvectors: PyTree
    """The unit Ritz vectors: the operator's structure with a leading axis k on every leaf."""
    residual_norms: jax.Array
    """(k,): ‖A y - λ y‖ of each pair (the Lanczos estimate |β_m s_{m,i}|, Parlett 1980)."""
    converged: jax.Array
    """(k,) bool: residual ≤ 1e-4·|λ| (float32), 1e-8·|λ| (float64) or 1e-2·|λ| (16-bit)."""
    num_matvecs: jax.Array
    """Operator applications used."""


def _score(theta: jax.Array, which: str) -> jax.Array:
    return {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]


def _select(state: _lanczos.Flat, k: int, which: str) -> tuple[jax.Array, ...]:
    """Returns (theta_k, S_k (m, k), residual estimates (k,)) of the k wanted Ritz pairs."""
    theta, S, valid = _lanczos.ritz(state.alphas, state.betas, state.steps)
    score = jnp.where(valid, _score(theta, which), -jnp.inf)
    _, top = jax.lax.top_k(score, k)
    last = jnp.maximum(state.steps - 1, 0)
    residuals = jnp.abs(state.betas[last] * S[last, top])
    return theta[top], S[:, top], residuals


def _eigh_impl(flat_op, key, *, k, which, num_matvecs, rtol, reortho):
    store = flat_op.dtype
    cdt = _lanczos.compute_dtype(store)
    v0 = jax.random.normal(jax.random.fold_in(key, 0), (flat_op.n,), cdt).astype(store)
    stop = None
    if rtol is not None:

        def stop(state):
            theta, _, residuals = _select(state, k, which)
            ok = residuals <= jnp.asarray(rtol, cdt) * jnp.abs(theta)
            return (state.steps >= k) & jnp.all(ok)

    state = _lanczos.lanczos_flat(
        flat_op.matvec, v0, num_matvecs, reortho=reortho, restart_key=jax.random.fold_in(key, 1),
        stop=stop, check_every=max(2, num_matvecs // 8),
    )
    theta, S_k, residuals = _select(state, k, which)
    vectors = _lanczos.dot(S_k.T.astype(store), state.basis, cdt).astype(store)
    tol = jnp.asarray(_CONVERGED_RTOL[jnp.finfo(store).bits], cdt)
    converged = residuals <= tol * jnp.abs(theta)
    return EighResult(theta, jax.vmap(flat_op.unravel)(vectors), residuals, converged, state.steps)


def eigh(
    op: Any,
    key: jax.Array,
    k: int = 1,
    *,
    which: str = "LA",
    num_matvecs: int | None = None,
    rtol: float | None = None,
    reortho: str = "partial",
    like: PyTree = None,
) -> EighResult:
    """Computes k extreme eigenpairs A y = λ y of a symmetric operator by the Lanczos method.

    Runs the Lanczos iteration from a random start vector (drawn from `key`) with partial
    reorthogonalisation (see `lanczos`: the basis stays orthogonal to √ε, which keeps the
    Ritz values accurate and ghost-free), then takes the Ritz pairs of the tridiagonal T
    (`jnp.linalg.eigh` of an m×m matrix). Extreme eigenvalues converge first, fastest where they
    are well separated from the rest of the spectrum (Kaniel-Paige-Saad bounds; Saad 2011,
    ch. 6). The residual of each pair is the standard estimate |β_m s_{m,i}| (s_{m,i} the last
    component of T's eigenvector), equal to ‖A y - λ y‖ up to rounding. Cost: m operator
    applications, the m×n basis in memory and two passes over it per reorthogonalising step
    (every step with `reortho="full"`; with "partial", those where the ω-recurrence says
    orthogonality would fall below √ε, and the step after each).

    16-bit operators (bfloat16, float16): vectors stay in the operator's dtype; the scalar
    recurrences, norms, dot products and T's eigenproblem run in float32, and `eigenvalues`
    and `residual_norms` are float32. Accuracy is that of the dtype: about ε·‖A‖ per step.

    Args:
        op: A `jhvp.HessianOperator` (or any jhvp operator), or a symmetric linear callable on
            pytrees (then pass `like`).
        key: A PRNG key for the start vector.
        k: How many eigenpairs, 1 ≤ k ≤ num_matvecs.
        which: "LA" (largest algebraic, default), "SA" (smallest algebraic) or "LM" (largest
            magnitude).
        num_matvecs: The number of operator applications, at most n; default
            min(n, max(4k, 32)). With `rtol`, the cap.
        rtol: Stop early, once the k wanted pairs have residual ≤ rtol·|λ| (checked every
            max(2, num_matvecs // 8) steps); default None runs all num_matvecs steps.
        reortho: "partial" (default: eigenvectors orthogonal to about √ε) or "full"
            (orthogonal to working precision, a reorthogonalisation every step); see
            `lanczos`.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; needed for
            a plain callable `op`.

    Returns:
        An `EighResult(eigenvalues, eigenvectors, residual_norms, converged, num_matvecs)`.

    Raises:
        TypeError: `op` is a plain callable and `like` is missing; `key` is not a PRNG key; a
            non-int `k` or `num_matvecs`.
        ValueError: `num_matvecs` > n; `k` > num_matvecs; an unknown `which`; a non-positive
            `rtol`; an unknown `reortho`; `like` does not match what `op` returns.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> A = jnp.diag(jnp.arange(1.0, 11.0))
        >>> out = jhvp.curvature.eigh(lambda v: A @ v, jax.random.key(0), k=2, like=jnp.ones(10))
        >>> print(jnp.round(out.eigenvalues, 3))
        [10.  9.]
        >>> out.eigenvectors.shape
        (2, 10)
    """
    api = "jhvp.curvature.eigh"
    struct = _protocol.structure(op, like, api)
    _checks.check_key(key, api)
    n = _protocol.size(struct)
    k = _checks.check_int(k, "k", api, high=n, why=f" (n = {n}, the operator's dimension)")
    _checks.check_choice(which, WHICH, "`which`", api)
    if num_matvecs is None:
        num_matvecs = min(n, max(4 * k, 32))
    num_matvecs = _checks.check_int(
        num_matvecs, "num_matvecs", api, high=n, why=f" (n = {n}, the operator's dimension)"
    )
    if k > num_matvecs:
        raise ValueError(
            f"jhvp.curvature.eigh: `k` = {k} eigenpairs need at least k Lanczos steps, but "
            f"`num_matvecs` = {num_matvecs}; raise num_matvecs (about 4k or more is typical)."
        )
    rtol = _checks.check_positive(rtol, "rtol", api)
    _checks.check_choice(reortho, ("partial", "full"), "`reortho`", api)
    return _protocol.run(
        _eigh_impl, op, struct, key, api=api, k=k, which=which, num_matvecs=num_matvecs,
        rtol=rtol, reortho=reortho,
    )


def _power_impl(flat_op, key, *, max_iters, rtol):
    store = flat_op.dtype
    dtype = _lanczos.compute_dtype(store)
    tol = jnp.asarray(rtol, dtype)

    def apply(v):
        # The Rayleigh quotient and the residual of v come with its application: no extra cost.
        # Vectors are stored in the operator's dtype, the arithmetic runs in `dtype`.
        w = flat_op.matvec(v.astype(store)).astype(dtype)
        lam = jnp.vdot(v, w)
        return w, lam, jnp.linalg.norm(w - lam * v)

    def ok(change, residual, lam):
        return (change <= tol * jnp.abs(lam)) & (residual <= tol * jnp.abs(lam))

    def cond(carry):
        i, _, _, change, residual, lam = carry
        return (i < max_iters) & ~ok(change, residual, lam)

    def body(carry):
        i, _, w, _, _, lam_prev = carry
        v, _ = _lanczos._normalise(w)
        v = v.astype(store).astype(dtype)  # the vector the operator sees
        w, lam, residual = apply(v)
        return i + 1, v, w, jnp.abs(lam - lam_prev), residual, lam

    v, _ = _lanczos._normalise(jax.random.normal(jax.random.fold_in(key, 0), (flat_op.n,), dtype))
    v = v.astype(store).astype(dtype)
    w, lam, residual = apply(v)
    carry = (jnp.ones((), jnp.int32), v, w, jnp.asarray(jnp.inf, dtype), residual, lam)
    i, v, _, change, residual, lam = jax.lax.while_loop(cond, body, carry)
    vectors = v[None, :].astype(store)
    return EighResult(lam[None], jax.vmap(flat_op.unravel)(vectors), residual[None],
                      ok(change, residual, lam)[None], i)


def power_iteration(
    op: Any,
    key: jax.Array,
    *,
    max_iters: int = 100,
    rtol: float = 1e-4,
    like: PyTree = None,
) -> EighResult:
    """Computes the eigenpair of largest |λ| by power iteration: v ← A v / ‖A v‖.

    One operator application per iteration and O(n) memory, but convergence at the rate
    |λ₂/λ₁| per step (Golub & Van Loan 2013, 7.3.1): prefer `eigh`, whose Lanczos basis
    converges much faster for the same number of applications, unless memory is the limit.
    Stops when both the relative change of λ and the relative residual ‖A v - λ v‖/|λ| are
    ≤ rtol, or after `max_iters` applications. 16-bit operators work as for `eigh`.

    Args:
        op: A `jhvp.HessianOperator` (or any jhvp operator), or a symmetric linear callable on
            pytrees (then pass `like`).
        key: A PRNG key for the start vector.
        max_iters: The most operator applications, ≥ 1.
        rtol: The relative tolerance on λ's change and on the residual.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; needed for
            a plain callable `op`.

    Returns:
        An `EighResult` with k = 1 (leading axes of size 1) and `num_matvecs` = applications
        used.

    Raises:
        TypeError: `op` is a plain callable and `like` is missing; `key` is not a PRNG key.
        ValueError: `max_iters` < 1; a non-positive `rtol`; `like` does not match `op`.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> A = jnp.diag(jnp.array([1.0, -5.0, 2.0]))
        >>> out = jhvp.curvature.power_iteration(lambda v: A @ v, jax.random.key(0),
        ...                                      like=jnp.ones(3))
        >>> print(jnp.round(out.eigenvalues, 3), bool(out.converged[0]))
        [-5.] True
    """
    api = "jhvp.curvature.power_iteration"
    struct = _protocol.structure(op, like, api)
    _checks.check_key(key, api)
    max_iters = _checks.check_int(max_iters, "max_iters", api)
    rtol = _checks.check_positive(rtol, "rtol", api, optional=False)
    return _protocol.run(_power_impl, op, struct, key, api=api, max_iters=max_iters, rtol=rtol)
