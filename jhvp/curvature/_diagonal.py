"""The diagonal of an operator: stochastic (Hutchinson / Bekas, XDiag) and exact (unit basis).

Probe i is Rademacher, drawn from `fold_in(key, i)`, so `batch_size` never changes a result.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import PyTree
from . import _checks, _sketch

DiagonalMethod = Literal["hutchinson", "xdiag"]
_METHODS: tuple[str, ...] = get_args(DiagonalMethod)


class DiagonalResult(NamedTuple):
    """The result of `diagonal` and `diagonal_exact`."""

    estimate: PyTree
    """The estimate of diag(A), with the structure of v."""
    stderr: PyTree
    """Its estimated standard error per entry, with the structure of v (zeros when exact; NaN
    when not estimable, from a single stochastic sample)."""
    num_matvecs: int
    """The matvecs spent."""


def _chunk_stats(flat_op, key, first, size):
    """Count, mean and sum of squared deviations of v ⊙ Av over probes first..first+size-1."""

    def sample(i):
        v = _sketch.rademacher(key, i, flat_op.n, flat_op.dtype)
        return v * flat_op.matvec(v)

    p = jax.vmap(sample)(first + jnp.arange(size, dtype=jnp.int32))
    mean = jnp.mean(p, axis=0)
    return jnp.asarray(size, flat_op.dtype), mean, jnp.sum(jnp.square(p - mean[None, :]), axis=0)


def _merge(a, b):
    # Chan, Golub & LeVeque (1979): merged mean and squared deviations of two samples; keeps
    # memory at batch_size probes (not m × n) without the cancellation of Σx² − m·mean².
    (na, ma, sa), (nb, mb, sb) = a, b
    total = na + nb
    delta = mb - ma
    return total, ma + delta * (nb / total), sa + sb + jnp.square(delta) * (na * nb / total)


def _hutchinson(flat_op, key, m, batch_size):
    # Bekas, Kokiopoulou & Saad (2007): E[v ⊙ Av] = diag(A) for Rademacher v (v ⊙ v = 1).
    size = m if batch_size is None else min(batch_size, m)
    chunks, rem = divmod(m, size)
    stats = _chunk_stats(flat_op, key, jnp.zeros((), jnp.int32), size)
    if chunks > 1:
        def body(acc, c):
            return _merge(acc, _chunk_stats(flat_op, key, c * size, size)), None

        stats, _ = jax.lax.scan(body, stats, jnp.arange(1, chunks, dtype=jnp.int32))
    if rem:
        stats = _merge(stats, _chunk_stats(flat_op, key, jnp.asarray(chunks * size, jnp.int32),
                                           rem))
    _, mean, squares = stats
    if m == 1:
        return mean, jnp.full_like(mean, jnp.nan)
    std = jnp.sqrt(squares / jnp.asarray(m - 1, flat_op.dtype))
    return mean, std / jnp.sqrt(jnp.asarray(m, flat_op.dtype))


def _xdiag(flat_op, key, m, batch_size):
    # Epperly, Tropp & Webber (2024), "XDiag", Section 5: for each probe i, the exact diagonal
    # of the low-rank Q_(i)Q_(i)ᵀA built from the other probes, plus ω_i ⊙ (I − Q_(i)Q_(i)ᵀ)Aω_i,
    # which the downdating identity reduces to (Qs_i)(s_iᵀr_i) ⊙ ω_i.
    s = m // 2
    om, y = _sketch.sketch(flat_op, key, s, batch_size)
    q, r = jnp.linalg.qr(y.T)
    z = _sketch.apply_rows(flat_op, q.T, batch_size)  # rows (A q_j)ᵀ = q_jᵀA: A is symmetric
    low = jnp.sum(q * z.T, axis=1)  # diag(QQᵀA)

    def exact():
        return jnp.broadcast_to(low[None, :], (s, flat_op.n))

    def estimate():
        fs = _sketch.loo_factor(r)
        qs = q @ fs
        zs = z.T @ fs
        sr = jnp.sum(fs * r, axis=0)
        return (low[:, None] - qs * zs + qs * sr[None, :] * om.T).T

    samples = jax.lax.cond(_sketch.rank_deficient(r, flat_op.n), exact, estimate)
    mean, stderr = _sketch.mean_stderr(samples)
    return mean, jnp.where(_sketch.rank_deficient(r, flat_op.n), jnp.zeros_like(stderr), stderr)


_IMPLS = {"hutchinson": _hutchinson, "xdiag": _xdiag}


def _diagonal_impl(flat_op, key, *, method, num_matvecs, batch_size):
    estimate, stderr = _IMPLS[method](flat_op, key, num_matvecs, batch_size)
    return flat_op.unravel(estimate), flat_op.unravel(stderr)


def diagonal(
    op: Any,
    key: jax.Array,
    *,
    num_matvecs: int,
    method: DiagonalMethod = "hutchinson",
    batch_size: int | None = None,
    like: PyTree | None = None,
) -> DiagonalResult:
    """Estimates diag(A) from `num_matvecs` products with Rademacher probes.

    Methods, both unbiased:

    - ``"hutchinson"`` (Bekas, Kokiopoulou & Saad 2007): the mean of v ⊙ Av. With one matvec
      this is Sophia-H's Hessian-diagonal estimate (Liu et al. 2023). `stderr` is the per-entry
      sample standard deviation over the m probes divided by √m. Memory: `batch_size` probes.
    - ``"xdiag"`` (Epperly, Tropp & Webber 2024): m/2 probes, each used both for a low-rank
      approximation QQᵀA and, leave-one-out, for the Hutchinson-Bekas estimate of what it
      misses; exact when rank(A) < m/2. `stderr` is std(ddof=1)/√(m/2) over the m/2
      leave-one-out estimates, per entry (a heuristic, as for XTrace: they are exchangeable,
      not independent). Even num_matvecs; memory m·n.

    Args:
        op: A `jhvp.HessianOperator`, another jhvp operator, or a symmetric linear callable
            v -> A v on pytrees (then pass `like`).
        key: A `jax.random` key; probe i comes from `jax.random.fold_in(key, i)`.
        num_matvecs: The budget m of matvecs, 1 ≤ m ≤ n.
        method: "hutchinson" or "xdiag".
        batch_size: Probes applied at once (vmapped); None: all. Never changes the result.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; required
            for a plain callable, else defaults to `op.in_structure()`.

    Returns:
        A `DiagonalResult`; estimate and stderr have the structure of v.

    Raises:
        TypeError: A non-int `num_matvecs` or `batch_size`; a plain callable without `like`.
        ValueError: An unknown method; num_matvecs < 1, > n, or odd (xdiag); batch_size < 1;
            `like` not matching what op accepts.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jhvp import curvature
        >>> A = jnp.diag(jnp.array([2.0, -1.0, 0.5]))
        >>> result = curvature.diagonal(lambda v: A @ v, jax.random.key(0), num_matvecs=1,
        ...                             like=jnp.zeros(3))
        >>> print(result.estimate)  # exact for a diagonal matrix: v ⊙ Av = v ⊙ v ⊙ diag(A)
        [ 2.  -1.   0.5]
    """
    api = "jhvp.curvature.diagonal"
    m = _checks.check_budget(num_matvecs, method, _METHODS, {"xdiag": 2}, api)
    _checks.check_batch_size(batch_size, api)
    struct = _protocol.structure(op, like, api)
    _checks.check_key(key, api)
    _checks.check_dimension(m, _protocol.size(struct), "curvature.diagonal_exact(op)", api)
    estimate, stderr = _protocol.run(
        _diagonal_impl, op, struct, key, api=api, method=method, num_matvecs=m,
        batch_size=batch_size,
    )
    return DiagonalResult(estimate, stderr, m)


def _exact_impl(flat_op, *, batch_size):
    n, dtype = flat_op.n, flat_op.dtype

    def entry(i):
        e = (jnp.arange(n, dtype=jnp.int32) == i).astype(dtype)
        return flat_op.matvec(e)[i]

    d = _sketch.map_probes(entry, n, batch_size)
    return flat_op.unravel(d), flat_op.unravel(jnp.zeros_like(d))


def diagonal_exact(
    op: Any, *, batch_size: int | None = None, like: PyTree | None = None
) -> DiagonalResult:
    """Computes diag(A) exactly, A_ii = e_iᵀAe_i, from n matvecs over the unit basis.

    For small n or as a reference: n matvecs, `batch_size` of them at once (None: all n, an
    n × n intermediate).

    Args:
        op: A `jhvp.HessianOperator`, another jhvp operator, or a symmetric linear callable
            v -> A v on pytrees (then pass `like`).
        batch_size: Basis vectors applied at once (vmapped); None: all n.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; required
            for a plain callable, else defaults to `op.in_structure()`.

    Returns:
        A `DiagonalResult` with stderr zeros and num_matvecs = n.

    Raises:
        TypeError: A non-int `batch_size`; a plain callable without `like`.
        ValueError: batch_size < 1; `like` not matching what op accepts.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import curvature
        >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
        >>> print(curvature.diagonal_exact(lambda v: A @ v, like=jnp.zeros(2)).estimate)
        [2. 3.]
    """
    api = "jhvp.curvature.diagonal_exact"
    _checks.check_batch_size(batch_size, api)
    struct = _protocol.structure(op, like, api)
    estimate, stderr = _protocol.run(_exact_impl, op, struct, api=api, batch_size=batch_size)
    return DiagonalResult(estimate, stderr, _protocol.size(struct))
