"""The Lanczos iteration (Lanczos 1950) with full or partial reorthogonalisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import Operator, PyTree
from . import _checks, _flow
from . import _vectors as vec

Reortho = Literal["full", "partial", "none"]
REORTHO: tuple[str, ...] = get_args(Reortho)
_HIGHEST = vec.HIGHEST
# A second Gram-Schmidt pass runs when the first removed more than 1 - 1/√2 of the norm
# (Daniel, Gragg, Kaufman & Stewart 1976, the test ARPACK uses): below, one pass is enough.
_DGKS = 0.7071067811865476


def compute_dtype(dtype: Any) -> Any:
    """The dtype of the scalar recurrences and of T for vectors of `dtype` (internal).

    Vectors stay in the operator's dtype (memory); alphas, betas, norms and T's eigenproblem
    run in at least float32: bfloat16 and float16 sums of n products lose all digits past
    their 8 or 11 bits, and `jnp.linalg.eigh` has no kernels for them.
    """
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


class LanczosResult(NamedTuple):
    """The output of `lanczos`: A Q = Q T + betas[m-1] q_m e_mᵀ, T tridiagonal."""

    basis: PyTree
    """The m orthonormal Lanczos vectors q_0..q_{m-1}: the op's structure, leading axis m."""
    alphas: jax.Array
    """(m,): the diagonal of T, alphas[i] = q_iᵀ A q_i; float32 for a bfloat16 or float16
    operator (so are betas), else the operator's dtype."""
    betas: jax.Array
    """(m,): betas[i] couples q_i and q_{i+1}; T's off-diagonal is betas[:m-1] and betas[m-1]
    is the norm of the last residual."""
    num_matvecs: jax.Array
    """Operator applications used (< m when an invariant subspace was found: see `lanczos`)."""


class State(NamedTuple):
    """The iteration's state and result (internal): basis rows at and beyond `steps` are 0."""

    basis: PyTree  # a stack of m vectors (leading axis m on every leaf), the operator's dtype
    alphas: jax.Array  # (m,), compute_dtype from here on
    betas: jax.Array  # (m,)
    steps: jax.Array  # () int32: matvecs done = filled basis rows (when no restart is pending)
    done: jax.Array  # () bool: stopped early (breakdown without restart, or `stop` said so)
    scale: jax.Array  # () running estimate of ‖A‖, for the breakdown test
    omega: jax.Array  # (m,) estimated q_jᵀq_k, k ≤ j, of the newest row j (partial reortho)
    omega_prev: jax.Array  # (m,) the same for row j - 1
    force: jax.Array  # () bool: reorthogonalise the next vector (the second of a pair)
    reorthos: jax.Array  # () int32: steps that reorthogonalised against the basis
    block_start: jax.Array  # () int32: the row where the current Krylov block began
    defect: jax.Array  # (m,) the norm of column j of F = A Q - Q T - β q_m e_mᵀ that T does
    #                     not hold (a coupling a restart set to 0, coefficients a
    #                     reorthogonalisation discarded); residual estimates need it
    seg_start: jax.Array  # () int32: like block_start, near-breakdowns (β ≤ √ε‖T‖) counted
    seg_len: jax.Array  # () int32: the length of the segment before it (0 before any)


def _project_out(basis: PyTree, w: PyTree, dtype: Any) -> tuple[PyTree, jax.Array]:
    c = vec.coefficients(basis, w, dtype)
    return vec.sub(w, vec.combine(c, basis, dtype)), c


def orthogonalise(basis: PyTree, w: PyTree, eps: jax.Array) -> tuple[PyTree, jax.Array]:
    """W projected off a stack of orthonormal (or zero) vectors, and the coefficients removed."""
    # Classical Gram-Schmidt against every stored row at once (unfilled rows are zero), with a
    # second pass only when the first cancelled (DGKS): "twice is enough" (Parlett 1980, 6.9).
    # Against a basis orthogonal only to √ε (partial reorthogonalisation), one pass leaves
    # about √ε·‖c‖ of the removed components c behind: a second pass also runs when
    # ‖c‖ > √ε‖w‖, so the result is orthogonal to working precision either way.
    # Each pass reads the whole basis twice: the memory traffic of a reorthogonalisation.
    # `eps` is the basis' (storage) precision: a rounded basis is orthogonal to that only.
    # The passes run in a two-step loop, the second only where the first asks for it: the
    # compiled program holds one pass (a few kernels per leaf; compilation is most of a
    # first call).
    dtype = eps.dtype
    norm0 = vec.norm(w, dtype)
    sqrt_eps = jnp.sqrt(eps)
    m = jax.tree.leaves(basis)[0].shape[0]

    def one_pass(i, carry):
        def project(carry):
            w, c, _ = carry
            w1, c1 = _project_out(basis, w, dtype)
            norm1 = vec.norm(w1, dtype)
            again = (norm1 < _DGKS * norm0) | (jnp.linalg.norm(c1) > sqrt_eps * norm1)
            return w1, c + c1, again & (i == 0)

        return jax.lax.cond(carry[2], project, lambda carry: carry, carry)

    w, c, _ = jax.lax.fori_loop(0, 2, one_pass, (w, jnp.zeros(m, dtype), jnp.ones((), bool)))
    return w, c


def orthogonalise_twice(basis: PyTree, w: PyTree, eps: jax.Array) -> PyTree:
    """W orthogonalised against the stack twice over: a random or rounding-only vector.

    A vector that starts (nearly) in the basis' span, or is drawn at random against a long
    basis, keeps a component along it after one DGKS-checked `orthogonalise`; the second makes
    it orthogonal to working precision. The two run as a two-step loop, so the compiled program
    holds the passes once (each is a few kernels per leaf, and compilation is most of a first
    call).
    """
    return jax.lax.fori_loop(0, 2, lambda _, u: orthogonalise(basis, u, eps)[0], w)


def normalise(v: PyTree, dtype: Any) -> tuple[PyTree, jax.Array]:
    """v/‖v‖ (v itself when zero) and ‖v‖, the norm accumulated in `dtype`."""
    norm = vec.norm(v, dtype)
    safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    return vec.scale(1 / safe, v), norm


def _first_unit(v: PyTree, on: jax.Array) -> PyTree:
    """Returns v plus e_0 (1 at the first entry of the first leaf) where the scalar `on` holds.

    Built from iotas inside the elementwise fusion: a vector-sized constant would be folded
    into the compiled program, replicated on every device.
    """
    leaves, tree = jax.tree.flatten(v)
    first = leaves[0]
    corner = on
    for d in range(first.ndim):
        corner = corner & (jax.lax.broadcasted_iota(jnp.int32, first.shape, d) == 0)
    leaves[0] = first + corner.astype(first.dtype)
    return jax.tree.unflatten(tree, leaves)


def init(op: _protocol.TreeOperator, v0: PyTree, num_matvecs: int) -> State:
    """Returns the state before the first step: q_0 = v0/‖v0‖ (a zero v0 gives q_0 = e_0)."""
    dtype = op.dtype
    cdt = compute_dtype(dtype)
    q0, norm = normalise(vec.astype(v0, cdt), cdt)
    q0 = _first_unit(q0, norm == 0)  # normalise leaves a zero v0 zero
    basis = vec.set_row(vec.zeros(op, (num_matvecs,)), jnp.zeros((), jnp.int32), q0)
    zeros = jnp.zeros(num_matvecs, cdt)
    false, zero = jnp.zeros((), bool), jnp.zeros((), jnp.int32)
    return State(basis, zeros, zeros, zero, false, jnp.zeros((), cdt), zeros.at[0].set(1),
                 zeros, false, zero, zero, zeros, zero, zero)


def _omega(state: State, alpha: jax.Array, beta: jax.Array, scale: jax.Array,
           eps: jax.Array) -> jax.Array:
    """Simon's recurrence (1984, eq. 3.6) for ω_{j+1,k} ≈ q_{j+1}ᵀq_k, all k at once.

    Rounding enters each step as ±ε‖A‖, added with the sign of the term (a bound, as PROPACK's
    update does), so the estimate errs towards reorthogonalising early.
    """
    alphas, betas, j, om, om_prev = state.alphas, state.betas, state.steps, state.omega, \
        state.omega_prev
    dtype = om.dtype
    zero = jnp.zeros((1,), dtype)
    beta_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], jnp.zeros((), dtype))
    t = (betas * jnp.concatenate([om[1:], zero]) + (alphas - alpha) * om
         + jnp.concatenate([zero, betas[:-1] * om[:-1]]) - beta_prev * om_prev)
    t = t + jnp.where(t >= 0, eps, -eps) * scale
    safe = jnp.maximum(beta, eps * scale)
    idx = jnp.arange(om.shape[0], dtype=j.dtype)
    local = eps * scale / safe  # ω_{j+1,j}: the three-term recurrence's own rounding
    return jnp.where(idx < j, t / safe, jnp.where(idx == j, local, jnp.zeros_like(t)))


def step(op: _protocol.TreeOperator, state: State, reortho: str,
         restart_key: Any = None) -> State:
    """One Lanczos step: applies the operator once, fills alphas[j], betas[j] and row j + 1."""
    basis, alphas, betas, j = state.basis, state.alphas, state.betas, state.steps
    m = alphas.shape[0]
    store, dtype = op.dtype, alphas.dtype  # the vectors' dtype, the recurrence's
    q = vec.row(basis, j)
    # The three-term recurrence first (two vectors); the basis is read only to reorthogonalise.
    # Its arithmetic runs in `dtype` (float32 for 16-bit operators), rounded once on storing.
    w = vec.astype(op.matvec(q), dtype)
    q = vec.astype(q, dtype)
    alpha = vec.dot(q, w, dtype)
    prev = vec.astype(vec.row(basis, jnp.maximum(j - 1, 0)), dtype)
    beta_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], jnp.zeros((), dtype))
    w = vec.sub(w, vec.add(vec.scale(alpha, q), vec.scale(beta_prev, prev)))
    beta = vec.norm(w, dtype)
    scale = jnp.maximum(state.scale, jnp.abs(alpha) + beta + beta_prev)
    # Rounding is that of the stored vectors: ε of the operator's dtype.
    eps = jnp.asarray(jnp.finfo(store).eps, dtype)
    if reortho == "partial":
        # Partial reorthogonalisation (Simon 1984; Larsen's PROPACK): track the loss of
        # orthogonality with the ω-recurrence and reorthogonalise only once it passes √ε, the
        # new vector and the next one (whose recurrence reads the old, unrepaired q_j).
        # Semi-orthogonality (‖QᵀQ − I‖ ≤ √ε) keeps T's Ritz values accurate to ε‖A‖ and
        # ghost-free (Simon 1984, Theorem 4).
        omega = _omega(state, alpha, beta, scale, eps)
        # After a restart the coupling it dropped (below √ε‖A‖, see below) gives every new
        # A q a component along the old block that the recurrence never subtracts (T holds 0
        # there) and the ω-recurrence does not model: from then on every step
        # reorthogonalises (restarts take few distinct eigenvalues or repeated ones: rare).
        need = (state.force | (jnp.max(jnp.abs(omega)) > jnp.sqrt(eps))
                | (state.block_start > 0))
    else:
        omega = state.omega
        need = jnp.asarray(reortho == "full")
    zero = jnp.zeros((), dtype)
    lost = zero
    if reortho != "none":
        def reorthogonalise(w):
            w, c = orthogonalise(basis, w, eps)
            # The coefficient on q_j refines alpha: T stays QᵀAQ to working precision. The
            # others (on q_{j-1} too: T keeps beta_{j-1}) leave T; the computed relation
            # A Q = Q T + ... carries them in column j, and so must the residual estimates.
            return w, c[j], vec.norm(w, dtype), jnp.linalg.norm(c.at[j].set(0))

        if reortho == "full":
            w, dalpha, beta, lost = reorthogonalise(w)
        else:
            w, dalpha, beta, lost = jax.lax.cond(
                need, reorthogonalise, lambda w: (w, zero, beta, zero), w)
        alpha = alpha + dalpha
    # beta is ‖w‖ already: one pass over w fewer per step.
    w = vec.scale(1 / jnp.where(beta > 0, beta, jnp.ones_like(beta)), w)
    # Breakdown: beta ≈ 0 means span(q_0..q_j) is invariant (Paige 1971). Normalising the
    # leftover rounding noise would still give an orthonormal basis under full
    # reorthogonalisation; only an exact or near-exact zero must not be divided by.
    broken = beta <= eps * scale
    last = j + 1 >= m
    if restart_key is not None:
        # With restarts, a near-breakdown counts too, beta ≤ ε^(3/4)‖T‖: there the next vector
        # would carry more than ε^(1/4) of rounding (ε‖A‖/beta, the ω-recurrence's local term)
        # and span(Q) is invariant to ε^(3/4): exact-arithmetic breakdowns blur in floating
        # point (the blocks of a repeated eigenvalue end at beta ≈ 10 to 10⁵ ε‖A‖, not at 0).
        # Dropping the coupling moves T's eigenvalues by beta²/gap ≤ ε^(3/2)‖A‖²/gap for
        # separated ones, and `defect` keeps it for the residual estimates. Not higher: at
        # √ε‖T‖ (as before) a restart discarded real Krylov directions whenever the wanted
        # eigenvalues lie below √ε‖A‖ (a low-rank GGN's top 30 in float32, notebook 05: the
        # random restart then converged to the near-zero bulk, 0.02 for 0.28-0.5).
        broken = beta <= eps ** jnp.asarray(0.75, dtype) * scale

        def fresh(_):
            r = vec.normal(op, jax.random.fold_in(restart_key, j + 1), dtype)
            return normalise(orthogonalise_twice(basis, r, eps), dtype)[0]

        # A random vector orthogonal to the basis continues the iteration in a new Krylov
        # space; T decouples (beta = 0), and its Ritz pairs stay those of A on span(Q).
        w = jax.lax.cond(broken & ~last, fresh, lambda _: w, None)
        done = state.done
    else:
        w = vec.where(broken, vec.scale(0.0, w), w)
        done = state.done | (broken & ~last)
    restart = broken & ~last & (restart_key is not None)
    # Where the new block starts (partial reorthogonalisation reads it, above).
    block_start = jnp.where(restart, j + 1, state.block_start)
    # Segments: blocks, and also what follows a near-breakdown the iteration runs through
    # (above ε^(3/4)‖T‖ and below √ε‖T‖ the next vector is mostly rounding, a random restart
    # in all but name, and meets the next copies of a repeated eigenvalue as a restarted block
    # would: the repeated eigenvalues of the trust tests end their blocks at β ≈ 1e-5‖T‖ in
    # float32). Where the current one starts and how long the last ran: the new segment
    # explores the complement and first meets other copies of what the last one found, so
    # `eigh`'s stop test waits that long; nothing else reads them.
    near = (beta <= jnp.sqrt(eps) * scale) & ~last
    seg_start = jnp.where(near, j + 1, state.seg_start)
    seg_len = jnp.where(near, j + 1 - state.seg_start, state.seg_len)
    # Column j of A Q - Q T - β q_m e_mᵀ: the coupling a restart dropped plus the coefficients
    # a reorthogonalisation discarded (a bound: the first is orthogonal to the basis, the
    # second in its span).
    defect = state.defect.at[j].set(jnp.where(restart, beta, zero) + lost)
    beta = jnp.where(broken & ~last, jnp.zeros_like(beta), beta)
    idx = jnp.arange(m, dtype=j.dtype)
    # After a reorthogonalisation (or a restart, orthogonal by construction) q_{j+1} is
    # orthogonal to working precision; ω_{j+1,j+1} = 1.
    fresh_omega = jnp.where(idx <= j, eps, jnp.zeros_like(omega))
    omega = jnp.where(need | broken, fresh_omega, omega)
    omega = jnp.where(idx == j + 1, jnp.ones_like(omega), omega)
    # The last step stores nothing (the basis holds m vectors); rewriting row m - 1 with itself
    # keeps the update in place.
    row = jnp.minimum(j + 1, m - 1)
    basis = vec.set_row(basis, row, vec.where(last, vec.row(basis, row), vec.astype(w, store)))
    return State(basis, alphas.at[j].set(alpha), betas.at[j].set(beta), j + 1, done, scale,
                omega, state.omega, need & ~state.force & (reortho == "partial"),
                state.reorthos + need.astype(jnp.int32), block_start, defect, seg_start,
                 seg_len)


def run(
    op: _protocol.TreeOperator,
    v0: PyTree,
    num_matvecs: int,
    *,
    reortho: str = "full",
    restart_key: Any = None,
    stop: Callable[[State], jax.Array] | None = None,
    check_every: int = 1,
    fixed: bool = False,
) -> State:
    """Runs up to num_matvecs steps in one `lax.while_loop` (internal).

    `fixed=True` runs exactly num_matvecs steps in a `lax.fori_loop` instead (steps after a
    breakdown apply the operator to zero and change nothing): under `jax.vmap` a while loop's
    predicate is batched, and XLA then selects between the old and the new state each step,
    keeping two copies of every basis alive; a fixed trip count keeps one, updated in place.

    Without `restart_key`, a breakdown stops the iteration (rows beyond stay zero, T decouples);
    with it, the iteration restarts from a random vector orthogonal to the basis. `stop(state)`,
    checked every `check_every` steps, ends the loop early when it returns True.
    """

    def cond(state):
        return (state.steps < num_matvecs) & ~state.done

    def body(state):
        state = step(op, state, reortho, restart_key)
        if stop is None:
            return state
        check = (state.steps % check_every == 0) & (state.steps < num_matvecs)
        halt = jax.lax.cond(check, stop, lambda _: jnp.zeros((), bool), state)
        return state._replace(done=state.done | halt)

    if fixed:
        assert stop is None and restart_key is None
        return _flow.fori_loop(op, 0, num_matvecs, lambda _, state: body(state),
                               init(op, v0, num_matvecs))
    return _flow.while_loop(op, cond, body, init(op, v0, num_matvecs))


def _impl(op, v0, *, num_matvecs, reortho):
    v0 = vec.constrain(op, vec.astype(v0, op.dtype))
    out = run(op, v0, num_matvecs, reortho=reortho)
    return LanczosResult(op.to_struct(out.basis), out.alphas, out.betas, out.steps)


def lanczos(op: Operator, v0: PyTree, num_matvecs: int, *, reortho: Reortho = "full",
            progress: bool = False) -> LanczosResult:
    """Runs m = num_matvecs Lanczos steps: A Q = Q T + β q_m e_mᵀ with Q orthonormal.

    The Lanczos iteration (Lanczos 1950) builds an orthonormal basis Q of the Krylov space
    span(v0, A v0, ..., A^{m-1} v0) in which A is the tridiagonal T = tridiag(betas[:m-1],
    alphas, betas[:m-1]); T's eigenvalues (Ritz values) approximate A's extreme eigenvalues.
    In floating point, the plain three-term recurrence loses orthogonality as Ritz values
    converge and produces spurious copies ("ghosts") of them (Paige 1971); `reortho="full"`
    orthogonalises each new vector against the whole basis by matrix products (classical
    Gram-Schmidt, a second pass only when the first cancelled: "twice is enough", Parlett
    1980): O(m n) extra work and memory traffic per step; memory: the m basis vectors it
    returns and 4 more (each with the parameters' layout, leaf by leaf: 1/d of a vector per
    device on d devices).
    `reortho="partial"` (Simon 1984) estimates the loss of orthogonality with the
    ω-recurrence (O(m) work per step) and reorthogonalises only the steps where it would
    pass √ε, and the step after each: the basis stays orthogonal to about √ε, which keeps
    the Ritz values accurate to working precision and free of ghosts, for a fraction of the
    traffic (how small a fraction depends on how fast Ritz values converge).

    If an invariant subspace is found after j < m steps (beta ≈ 0), the iteration stops there:
    `num_matvecs` reports j, `betas[j-1]` is 0 and the rows and entries beyond j are zero.

    A bfloat16 or float16 operator keeps the basis in its dtype (memory); the recurrence's
    arithmetic, dot products and norms run in float32 and round each new vector once, so the
    basis is orthonormal to the dtype's ε and T is QᵀAQ to a few ε‖A‖.

    Args:
        op: A `jhvp.HessianOperator` (or any jhvp operator), or a symmetric linear callable on
            pytrees.
        v0: The start vector, a pytree with the operator's input structure (need not be
            normalised).
        num_matvecs: m, the number of operator applications and of basis vectors, 1 ≤ m ≤ n.
        reortho: "full" (default: orthogonal to working precision), "partial" (orthogonal
            to about √ε, cheaper) or "none" (the plain recurrence: cheapest, loses
            orthogonality).

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

    Returns:
        A `LanczosResult(basis, alphas, betas, num_matvecs)`.

    Raises:
        TypeError: `v0` has non-floating leaves; `num_matvecs` is not an int.
        ValueError: `num_matvecs` outside [1, n]; an unknown `reortho`; `op` does not return
            vectors of `v0`'s structure.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> A = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
        >>> out = jhvp.curvature.lanczos(lambda v: A @ v, jnp.ones(3), 3)
        >>> T = jnp.diag(out.alphas) + jnp.diag(out.betas[:2], 1) + jnp.diag(out.betas[:2], -1)
        >>> print(jnp.round(jnp.linalg.eigvalsh(T), 4))
        [1. 2. 3.]
    """
    api = "jhvp.curvature.lanczos"
    v0 = _protocol.gradient_form(op, v0)
    struct = _protocol.structure(op, v0, api, name="v0")
    n = _protocol.size(struct)
    num_matvecs = _checks.check_int(
        num_matvecs, "num_matvecs", api, high=n, why=f" (n = {n}, the dimension of v0)"
    )
    _checks.check_choice(reortho, REORTHO, "`reortho`", api)
    return _protocol.run(
        _impl, op, struct, v0, api=api, progress=progress, budget=num_matvecs, name="v0",
        num_matvecs=num_matvecs, reortho=reortho,
    )


@jax.jit  # one program when called outside jit (a streamed operator's eager driver)
def ritz(alphas: jax.Array, betas: jax.Array, steps: jax.Array) -> tuple[jax.Array, ...]:
    """Returns T's eigenpairs for the first `steps` rows of a padded m×m T (internal).

    Returns (theta (m,), S (m, m) with eigenvectors as columns, valid (m,) bool): the padded
    rows get a diagonal entry past T's Gershgorin bound, so their eigenpairs separate exactly
    from T's and `valid` marks T's own.
    """
    m = alphas.shape[0]
    idx = jnp.arange(m, dtype=jnp.int32)
    used = idx < steps
    diag = jnp.where(used, alphas, jnp.zeros_like(alphas))
    off = jnp.where(idx[:-1] < steps - 1, betas[:-1], jnp.zeros_like(betas[:-1]))
    bound = jnp.max(jnp.abs(diag)) + 2 * jnp.max(jnp.abs(off), initial=0)
    sentinel = 2 * bound + 1
    diag = jnp.where(used, diag, sentinel)
    T = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, S = jnp.linalg.eigh(T)
    mass = jnp.sum(jnp.where(used[:, None], S * S, jnp.zeros_like(S)), axis=0)
    return theta, S, mass > 0.5
