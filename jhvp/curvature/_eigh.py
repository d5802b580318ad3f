"""Extreme eigenpairs of a symmetric operator: Lanczos with Ritz pairs, and power iteration."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import Operator, PyTree
from . import _checks, _flow, _lanczos
from . import _vectors as vec

Which = Literal["LA", "SA", "LM"]
EighReortho = Literal["partial", "full"]
WHICH: tuple[str, ...] = get_args(Which)
# `converged`'s relative tolerance when `rtol` is None, by the operator's bits: about √ε of
# float32 and float64 (a Ritz value's error is about residual²/gap, Parlett 1980 Thm 11.7.1,
# so these give eigenvalues near working precision), and for the 16-bit types just above ε.
_DEFAULT_RTOL = {64: 1e-8, 32: 1e-4, 16: 1e-2}


class EighResult(NamedTuple):
    """Approximate eigenpairs of a symmetric operator, most extreme first.

    Scalars (`eigenvalues`, `residual_norms`) have the operator's dtype, float32 for a
    bfloat16 or float16 operator; eigenvectors have the operator's dtype. Under `jax.grad` or
    `jax.jvp` only `eigenvalues` carry derivatives (see `eigh`).
    """

    eigenvalues: jax.Array
    """(k,): the Ritz values, ordered by `which` (LA descending, SA ascending, LM by |λ|)."""
    eigenvectors: PyTree
    """The unit Ritz vectors: the operator's structure with a leading axis k on every leaf."""
    residual_norms: jax.Array
    """(k,): a bound on ‖A y - λ y‖ for each pair, r = |β_m s_{m,i}| + ρ_i: the Lanczos estimate
    (Parlett 1980, 13.1; s_i the eigenvector of T), exact only in exact arithmetic (it reads 0
    once the Krylov space is invariant), plus the floor ρ_i the computed Lanczos relation
    carries and more steps do not reduce: 3√m·ε·‖T‖ of rounding (Paige 1976; ε of the
    operator's dtype, ‖T‖ = max |Ritz value| ≤ ‖A‖) and the parts of A Q - Q T that T does
    not hold, up to √ε‖A‖ with partial reorthogonalisation (Ritz vectors from a
    semi-orthogonal basis are accurate to √ε: Simon 1984). From `power_iteration`: the
    computed ‖A v - λ v‖ of its last iterate, no floor."""
    converged: jax.Array
    """(k,) bool: r ≤ rtol·|λ| with `eigh`'s `rtol` (default 1e-4 for float32, 1e-8 for
    float64, 1e-2 for 16-bit operators), or the residual is at its floor (|β_m s_{m,i}| ≤
    ρ_i), where more steps cannot improve it: an eigenvalue with |λ| ≲ ρ/rtol, λ ≈ 0
    included, is then known to about ρ absolutely (|λ - λ_A| ≤ r, Kahan; Parlett 1980, 4.5.1),
    not to rtol relatively. Either way a small residual proves that a pair is near an
    eigenpair of A, never that no eigenvalue was missed (see `eigh`). From `power_iteration`:
    both the last change of λ and the residual are ≤ rtol·|λ| with its `rtol` (1e-4 by
    default, in every dtype)."""
    num_matvecs: jax.Array
    """Operator applications used."""


def _score(theta: jax.Array, which: str) -> jax.Array:
    return {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]


class _Pairs(NamedTuple):
    theta: jax.Array  # (k,) the wanted Ritz values
    S: jax.Array  # (m, k) their eigenvectors of T
    residuals: jax.Array  # (k,) the Krylov part |β s_m| plus the floor
    ok: jax.Array  # (k,) bool: the convergence test


def _select(state: _lanczos.State, k: int, which: str, rtol: float) -> _Pairs:
    """The k wanted Ritz pairs, their residual estimates and the convergence test."""
    theta, S, valid = _lanczos.ritz(state.alphas, state.betas, state.steps)
    dtype = theta.dtype
    score = jnp.where(valid, _score(theta, which), -jnp.inf)
    _, top = jax.lax.top_k(score, k)
    norm_t = jnp.max(jnp.where(valid, jnp.abs(theta), jnp.zeros_like(theta)))
    theta, S = theta[top], S[:, top]
    last = jnp.maximum(state.steps - 1, 0)
    # The computed basis satisfies A Q = Q T + β q_m e_mᵀ + F, so for y = Q s,
    # ‖A y - θ y‖ ≤ |β s_m| + ‖F s‖ (Paige 1976; Parlett 1980, 13.4). More steps shrink the
    # first, the Krylov part; the rest is a floor they cannot: F's rounding, about ε‖A‖ per
    # column so √m ε‖A‖ on a unit s, and forming y = Q s, about √m ε on y so 2√m ε‖A‖ on its
    # residual: 3√m ε‖T‖ (‖T‖ = max |Ritz value| ≤ ‖A‖, ε of the stored vectors); plus what
    # T does not hold (`Flat.defect`: couplings that restarts dropped, coefficients that
    # reorthogonalisations discarded, up to √ε‖A‖ with partial reorthogonalisation, whose
    # Ritz vectors are accurate to √ε only: Simon 1984), bounded by Σ_j |s_j| defect_j.
    eps = jnp.asarray(jnp.finfo(jax.tree.leaves(state.basis)[0].dtype).eps, dtype)
    floor = (3 * jnp.sqrt(state.steps.astype(dtype)) * eps * norm_t
             + jnp.matmul(jnp.abs(S).T, state.defect, precision=_lanczos._HIGHEST))
    krylov = jnp.abs(state.betas[last] * S[last])
    residuals = krylov + floor
    # Converged: the relative tolerance is met, or the residual is at its floor, where more
    # steps cannot improve it (for |θ| ≲ floor/rtol, λ ≈ 0 included, the eigenvalue is then
    # known to about the floor, absolutely: Kahan's |θ - λ| ≤ residual, Parlett 1980, 4.5.1).
    ok = (residuals <= jnp.asarray(rtol, dtype) * jnp.abs(theta)) | (krylov <= floor)
    return _Pairs(theta, S, residuals, ok)


def _differentiable(op: _protocol.TreeOperator) -> tuple[_protocol.TreeOperator, Any]:
    """Splits the operator's traced arrays from its matvec: (frozen matvec, attach).

    `frozen` applies the operator with its arrays cut from autodiff (the iterations are a
    `lax.while_loop`, which reverse mode cannot differentiate, and need no derivatives);
    `attach(theta, Y)` returns the eigenvalues theta with the Hellmann-Feynman derivative
    dθ_i = y_iᵀ (dA) y_i (Magnus 1985) attached as a `jax.custom_jvp` on those arrays, dA·y
    the JVP of the matvec with respect to them at y. The arrays are this program's arguments
    (`_protocol.run`) reached only through the matvec's closure: tracing it once
    (`jax.make_jaxpr`) hoists them into explicit arguments, as `jax.closure_convert` does
    (whose global cache would keep the user's operator alive).
    """
    if op.streamed is not None:  # data on the host: no traced arrays to differentiate
        return op, lambda theta, vectors: theta
    closed, out_shape = jax.make_jaxpr(op.matvec, return_shape=True)(
        jax.tree.map(lambda s: jnp.zeros(s.shape, op.dtype), op.struct))
    out_tree = jax.tree.structure(out_shape)
    consts = list(closed.consts)
    hoist = [i for i, c in enumerate(consts)
             if isinstance(c, jax.core.Tracer) and jnp.issubdtype(c.dtype, jnp.inexact)]

    def matvec(x, arrays):
        bound = list(consts)
        for i, a in zip(hoist, arrays, strict=True):
            bound[i] = a
        out = jax.core.eval_jaxpr(closed.jaxpr, bound, *jax.tree.leaves(x))
        return jax.tree.unflatten(out_tree, out)

    arrays = tuple(consts[i] for i in hoist)
    frozen_arrays = tuple(jax.lax.stop_gradient(a) for a in arrays)

    @jax.custom_jvp
    def eigenvalues(arrays, theta, vectors):
        del arrays, vectors
        return theta

    @eigenvalues.defjvp
    def _(primals, tangents):
        arrays, theta, vectors = primals
        d_arrays = tangents[0]

        def rayleigh(y):
            _, dy = jax.jvp(lambda a: matvec(y, a), (arrays,), (d_arrays,))
            return vec.dot(y, dy, theta.dtype)

        return theta, jax.vmap(rayleigh)(vectors)

    def attach(theta, vectors):
        return eigenvalues(arrays, theta, jax.lax.stop_gradient(vectors))

    return op._replace(matvec=lambda x: matvec(x, frozen_arrays)), attach


def _eigh_impl(op, key, *, k, which, num_matvecs, rtol, reortho):
    store = op.dtype
    cdt = _lanczos.compute_dtype(store)
    tol = _DEFAULT_RTOL[jnp.finfo(store).bits] if rtol is None else rtol
    frozen, attach = _differentiable(op)
    v0 = vec.astype(vec.normal(op, jax.random.fold_in(key, 0), cdt), store)
    stop = None
    if rtol is not None:

        def stop(state):
            # After a breakdown the restarted block first meets more copies of the eigenvalues
            # the last block found (a repeated eigenvalue shows one copy per Krylov block), and
            # the test would pass with those copies still unseen. So the new block first runs
            # as long as the last: its random start sees what is left of A's spectrum in the
            # complement, a subset of what the last block saw, and the Kaniel-Paige-Saad
            # bounds (Saad 2011, 6.6) depend on that spectrum, so its copies of the wanted
            # eigenvalues have then had the chance the last block's had. Running as long is
            # not enough: the new block may have found a copy and left more for the next one.
            # So the test also waits until the wanted pairs owe nothing to the current block
            # (their Ritz vectors' weight on its rows counts the wanted eigenvalues it
            # supplied; a copy tied with older ones mixes across blocks, but the cluster's
            # weight there stays one per copy). Blocks here are segments: near-breakdowns
            # the iteration runs through count (`_lanczos.State.seg_start`).
            explored = state.steps - state.seg_start >= state.seg_len
            pairs = _select(state, k, which, tol)
            rows = jnp.arange(num_matvecs, dtype=state.steps.dtype)
            current = (rows >= state.seg_start) & (rows < state.steps)
            supplied = jnp.sum(jnp.where(current[:, None], pairs.S * pairs.S, 0))
            owed = (state.seg_start > 0) & (supplied > 0.5)
            return (state.steps >= k) & explored & jnp.all(pairs.ok) & ~owed

    state = _lanczos.run(
        frozen, v0, num_matvecs, reortho=reortho, restart_key=jax.random.fold_in(key, 1),
        stop=stop, check_every=max(2, num_matvecs // 8),
    )
    pairs = _select(state, k, which, tol)
    vectors = vec.astype(vec.combine(pairs.S.T, state.basis, cdt), store)
    # `done` is set by the stop test alone here (breakdowns restart): it passed on this state,
    # and recomputing T's eigenpairs outside the loop may round a borderline pair differently.
    converged = pairs.ok | state.done
    theta = attach(pairs.theta, vectors)
    return EighResult(theta, op.to_struct(vectors), pairs.residuals, converged, state.steps)


def eigh(
    op: Operator,
    key: jax.Array,
    k: int = 1,
    *,
    which: Which = "LA",
    num_matvecs: int | None = None,
    rtol: float | None = None,
    reortho: EighReortho = "partial",
    like: PyTree = None,
    progress: bool = False,
) -> EighResult:
    """Computes k extreme eigenpairs A y = λ y of a symmetric operator by the Lanczos method.

    Runs the Lanczos iteration from a random start vector (drawn from `key`) with partial
    reorthogonalisation (see `lanczos`: the basis stays orthogonal to √ε, which keeps the
    Ritz values accurate and ghost-free), then takes the Ritz pairs of the tridiagonal T
    (`jnp.linalg.eigh` of an m×m matrix). Extreme eigenvalues converge first, fastest where they
    are well separated from the rest of the spectrum (Kaniel-Paige-Saad bounds; Saad 2011,
    ch. 6). The residual of each pair is the standard estimate |β_m s_{m,i}| (s_{m,i} the last
    component of T's eigenvector), floored by the rounding of the iteration (see
    `EighResult.residual_norms`). Cost: m operator applications, m + 8 vectors of memory (the
    basis and the recurrence's; each with the parameters' layout, leaf by leaf, so 1/d of a
    vector per device on d devices) and two passes over the basis per reorthogonalising step
    (every step with `reortho="full"`; with "partial", those where the ω-recurrence says
    orthogonality would fall below √ε, and the step after each).

    What a residual cannot tell: a Krylov space holds one copy of each eigenvalue its start
    vector touches, so a repeated eigenvalue shows once until the space is exhausted (a
    breakdown: the iteration then restarts from a random vector orthogonal to the basis and
    finds the next copy), and an eigenvalue whose eigenvector the start vector barely touches
    converges late. Small residuals prove that each returned pair is near an eigenpair of A,
    never that none was missed or that the multiplicities are complete: give `num_matvecs`
    room, and compare runs from different keys when that matters.

    Derivatives: `jax.grad` and `jax.jvp` of `eigenvalues` with respect to the arrays inside
    `op` (a `jhvp.HessianOperator` built inside the differentiated function, its parameters
    and batch; the arrays of a `jax.tree_util.Partial` or an Equinox module) use the
    Hellmann-Feynman formula dλ_i = y_iᵀ (dA) y_i (Magnus 1985), exact for a simple eigenvalue
    whose pair has converged (the error grows with the residual), at the cost of one JVP of
    the operator per eigenvalue; no derivative flows through the iterations. A repeated
    eigenvalue has no derivative; the formula then returns the Rayleigh quotient of dA at the
    returned vector y_i, a point in the range of the eigenvalues of dA restricted to the
    eigenspace (for the largest eigenvalue, a convex function of A, it is a subgradient:
    Overton 1992). `eigenvectors` and `residual_norms` carry no derivative
    (`jax.lax.stop_gradient`). Arrays a plain closure captures are constants, as under
    `jax.jit`, and get no derivative.

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
        rtol: Stop early, once the k wanted pairs pass `converged`'s test with this tolerance
            (see `EighResult.converged`; checked every max(2, num_matvecs // 8) steps) and,
            after a restart or a near-breakdown (β ≤ √ε‖T‖), once the new Krylov block has
            run as many steps as the one before it and supplies none of the wanted pairs (so
            the copies of a repeated eigenvalue get their chance); default None runs all
            num_matvecs steps. `converged` uses it too.
        reortho: "partial" (default: eigenvectors orthogonal to about √ε) or "full"
            (orthogonal to working precision, a reorthogonalisation every step); see
            `lanczos`.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; needed for
            a plain callable `op`.

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

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

        The sharpness λ_max(∇²f) differentiated with respect to the parameters:

        >>> f = lambda w: jnp.sum(jnp.arange(1.0, 4.0) * w ** 4) / 12  # H = diag(i·w_i²)
        >>> top = lambda w: jhvp.curvature.eigh(jhvp.hessian_operator(f, (w,)),
        ...                                     jax.random.key(0), num_matvecs=3).eigenvalues[0]
        >>> grad = jax.grad(top)(jnp.ones(3))  # λ_max = 3·w_3², so d/dw_3 = 6·w_3
        >>> print([round(float(g), 3) for g in grad])
        [0.0, 0.0, 6.0]
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
    _checks.check_choice(reortho, get_args(EighReortho), "`reortho`", api)
    return _protocol.run(
        _eigh_impl, op, struct, key, api=api, progress=progress, budget=num_matvecs, k=k,
        which=which,
        num_matvecs=num_matvecs,
        rtol=rtol, reortho=reortho,
    )


def _power_impl(op, key, *, max_iters, rtol):
    store = op.dtype
    dtype = _lanczos.compute_dtype(store)
    tol = jnp.asarray(rtol, dtype)
    frozen, attach = _differentiable(op)

    def apply(v):
        # The Rayleigh quotient and the residual of v come with its application: no extra cost.
        # Vectors are stored in the operator's dtype, the arithmetic runs in `dtype`.
        w = vec.astype(frozen.matvec(vec.astype(v, store)), dtype)
        lam = vec.dot(v, w, dtype)
        return w, lam, vec.norm(vec.sub(w, vec.scale(lam, v)), dtype)

    def ok(change, residual, lam):
        return (change <= tol * jnp.abs(lam)) & (residual <= tol * jnp.abs(lam))

    def cond(carry):
        i, _, _, change, residual, lam = carry
        return (i < max_iters) & ~ok(change, residual, lam)

    def body(carry):
        i, _, w, _, _, lam_prev = carry
        v, _ = _lanczos.normalise(w, dtype)
        v = vec.astype(vec.astype(v, store), dtype)  # the vector the operator sees
        w, lam, residual = apply(v)
        return i + 1, v, w, jnp.abs(lam - lam_prev), residual, lam

    v, _ = _lanczos.normalise(vec.normal(op, jax.random.fold_in(key, 0), dtype), dtype)
    v = vec.astype(vec.astype(v, store), dtype)
    w, lam, residual = apply(v)
    carry = (jnp.ones((), jnp.int32), v, w, jnp.asarray(jnp.inf, dtype), residual, lam)
    i, v, _, change, residual, lam = _flow.while_loop(op, cond, body, carry)
    vectors = jax.tree.map(lambda x: x[None].astype(store), v)
    return EighResult(attach(lam[None], vectors), op.to_struct(vectors),
                      residual[None], ok(change, residual, lam)[None], i)


def power_iteration(
    op: Operator,
    key: jax.Array,
    *,
    max_iters: int = 100,
    rtol: float = 1e-4,
    like: PyTree = None,
    progress: bool = False,
) -> EighResult:
    """Computes the eigenpair of largest |λ| by power iteration: v ← A v / ‖A v‖.

    One operator application per iteration and 3 vectors of memory, but convergence at the rate
    |λ₂/λ₁| per step (Golub & Van Loan 2013, 7.3.1): prefer `eigh`, whose Lanczos basis
    converges much faster for the same number of applications, unless memory is the limit.
    Stops when both the relative change of λ and the relative residual ‖A v - λ v‖/|λ| are
    ≤ rtol, or after `max_iters` applications. Derivatives of the eigenvalue with respect to
    the operator's arrays, and 16-bit operators, work as for `eigh`.

    Args:
        op: A `jhvp.HessianOperator` (or any jhvp operator), or a symmetric linear callable on
            pytrees (then pass `like`).
        key: A PRNG key for the start vector.
        max_iters: The most operator applications, ≥ 1.
        rtol: The relative tolerance on λ's change and on the residual.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; needed for
            a plain callable `op`.

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

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
    return _protocol.run(_power_impl, op, struct, key, api=api, progress=progress,
                         budget=max_iters, max_iters=max_iters, rtol=rtol)
