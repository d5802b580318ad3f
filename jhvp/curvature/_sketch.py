"""The randomised-estimation kit: probes, their batching, range sketches and their bases.

Probe i is always drawn from `jax.random.fold_in(key, i)`, so how probes are batched
(`batch_size`) changes a result only by rounding, and memory and speed. The sketch kit (range
sketch, orthonormal bases, leave-one-out and leave-two-out projectors, sample statistics)
serves Hutch++, XTrace and XDiag alike. Vectors stay in the operator's dtype; the small dense
maths runs in `work_dtype` (float32 for 16-bit operators).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._typing import PyTree


def rademacher(key: jax.Array, i: Any, n: int, dtype: Any) -> jax.Array:
    """Returns probe i: n independent ±1 signs of `dtype`, drawn from `fold_in(key, i)`.

    One random 32-bit word gives 32 signs (unpacked with shifts), 32x fewer random bits than
    `jax.random.rademacher`, which was measured 11x slower for 99 probes of size 1e4.
    """
    words = -(-n // 32)
    bits = jax.random.bits(jax.random.fold_in(key, i), (words,), jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    unpacked = (bits[:, None] >> shifts[None, :]) & jnp.uint32(1)
    signs = unpacked.reshape(-1)[:n]
    return jnp.asarray(1, dtype) - jnp.asarray(2, dtype) * signs.astype(dtype)


def map_probes(
    fn: Callable[[jax.Array], PyTree], num: int, batch_size: int | None, *, start: int = 0
) -> PyTree:
    """Returns fn(i) for i in start, ..., start + num - 1, stacked along a leading axis of num.

    `batch_size=None` vmaps over all probes at once (the operator then sees matrix-matrix
    products); `batch_size=b` runs `jax.lax.map` over chunks of b, each chunk vmapped, bounding
    memory to b probes; a remainder of `num % b` probes runs as one last vmapped chunk.
    """
    if batch_size is None or batch_size >= num:
        return jax.vmap(fn)(jnp.arange(start, start + num, dtype=jnp.int32))
    chunks, rem = divmod(num, batch_size)
    idx = jnp.arange(start, start + chunks * batch_size, dtype=jnp.int32)
    main = jax.lax.map(jax.vmap(fn), idx.reshape(chunks, batch_size))
    main = jax.tree.map(lambda x: x.reshape((chunks * batch_size, *x.shape[2:])), main)
    if rem == 0:
        return main
    tail = jax.vmap(fn)(jnp.arange(start + chunks * batch_size, start + num, dtype=jnp.int32))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), main, tail)


def mean_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean over the leading axis and its standard error std(ddof=1)/√m (NaN for m = 1)."""
    m = samples.shape[0]
    std = jnp.std(samples, axis=0, ddof=1) if m > 1 else jnp.full(samples.shape[1:], jnp.nan,
                                                                   samples.dtype)
    return jnp.mean(samples, axis=0), std / jnp.sqrt(jnp.asarray(m, samples.dtype))


def work_dtype(dtype: Any) -> Any:
    """The dtype of the small dense maths for vectors of `dtype`: float32 for 16-bit floats.

    LAPACK has no bfloat16 or float16 kernels (`jnp.linalg.svd` and `eigh` raise "Unsupported
    dtype"), and a basis orthonormal only to ε_bf16 = 2⁻⁷ would leak the dominant eigenvalues
    into the deflated residual. The operator still sees vectors of its own dtype.
    """
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def sketch(flat_op, key, num: int, batch_size: int | None):
    """Rademacher probes Ω (rows ω_i, i < num) and AΩ (rows Aω_i), in the working dtype."""
    dtype = work_dtype(flat_op.dtype)

    def probe(i):
        w = rademacher(key, i, flat_op.n, flat_op.dtype)
        return w.astype(dtype), flat_op.matvec(w).astype(dtype)

    return map_probes(probe, num, batch_size)


def apply_rows(flat_op, rows: jax.Array, batch_size: int | None) -> jax.Array:
    """A applied to each row of `rows` (num, n), vmapped batch_size rows at a time.

    Rows are rounded to the operator's dtype on the way in, the products returned in the
    dtype of `rows` (the working dtype).
    """
    return map_probes(lambda i: flat_op.matvec(rows[i].astype(flat_op.dtype)).astype(rows.dtype),
                      rows.shape[0], batch_size)


def orthonormal_basis(y: jax.Array) -> jax.Array:
    """An n × k matrix Q with orthonormal (or zero) columns whose span is range(yᵀ), y (k, n).

    CholeskyQR (Fukaya et al. 2014) with the Cholesky factor replaced by an eigendecomposition
    of the k × k Gram matrix, whose near-zero eigenvalues (rank deficiency, rounding) give zero
    columns instead of NaNs. One pass leaves ‖QᵀQ − I‖ ≈ ε κ(y)² (Yamamoto et al. 2015), so a
    second pass (CholeskyQR2) runs only when κ(y)² > 100 or y lost rank. Each pass is two
    n × k × k matrix products, which dominate Hutch++ on a cheap operator; XLA:CPU's
    Householder QR forming Q was measured 70x slower than the 99 matvecs of a 1e4-parameter
    Rosenbrock trace. Directions of y below √(10ε) of its largest are dropped: Hutch++ stays
    unbiased for any Q built from the sketch alone, and loses only their share of accuracy.
    """

    def rotate(b):  # b: (n, k) -> columns b v_j / √λ_j, zero where λ_j is at rounding level
        lam, v = jnp.linalg.eigh(jnp.matmul(b.T, b, precision=jax.lax.Precision.HIGHEST))
        tiny = jnp.asarray(10.0 * float(jnp.finfo(b.dtype).eps), b.dtype) * jnp.max(lam)
        keep = lam > tiny
        scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0).astype(b.dtype)
        q = jnp.matmul(b, v * scale[None, :], precision=jax.lax.Precision.HIGHEST)
        ill = ~jnp.all(keep) | (jnp.max(lam) > 100.0 * jnp.min(lam))
        return q, ill

    q, ill = rotate(y.T)
    return jax.lax.cond(ill, lambda q: rotate(q)[0], lambda q: q, q)


class RangeBasis(NamedTuple):
    """A sketch AΩ = UΣVᵀ: the basis U_K of its range, and Σ, V, K."""

    q: jax.Array
    """(n, s): column a is u_a where a ∈ K, else zero; QQᵀ projects onto range(AΩ)."""
    sig: jax.Array
    """(s,): the singular values σ_a of the sketch, descending."""
    vt: jax.Array
    """(s, s): Vᵀ; the sketch's columns have coordinates Σ_K V_Kᵀ in the basis `q`."""
    keep: jax.Array
    """(s,) bool: K, the singular values above `tol`."""
    tol: jax.Array
    """10·ε·σ₁: at or below it a singular value is rounding."""

    @property
    def coords(self) -> jax.Array:
        """(s, s): column i holds the coordinates of Aω_i in the basis `q`."""
        return jnp.where(self.keep, self.sig, 0.0)[:, None] * self.vt


def range_basis(y: jax.Array) -> RangeBasis:
    """The thin SVD of the sketch, yᵀ = UΣVᵀ for y (s, n) with rows Aω_i: the basis U_K.

    K keeps the singular values above tol = 10·ε·σ₁. An exact dependency among the columns
    (rank(A) < s, or Rademacher probes that agree on A's support) leaves a singular value of
    at most 1.6·ε·σ₁ (measured for n up to 1e5, s up to 50, both dtypes); its direction is
    defined by rounding, so keeping it would make every projector depend on every probe. What
    the threshold drops of a real, fast-decaying spectrum is at rounding level and falls to
    the Hutchinson part, which stays unbiased. An SVD (LAPACK's gesdd: a Householder QR, then
    the SVD of R), not CholeskyQR: the Gram matrix would lose every direction below √ε of the
    largest, most of a fast-decaying sketch in float32. One LAPACK call, on purpose: jaxlib
    splits a batched (vmapped) LAPACK call over XLA's CPU thread pool and blocks a pool thread
    until its parts finish, so two independent batched calls in one program (a QR's Q and the
    SVD of its R; a QR and a triangular solve) can take every thread and deadlock, as seen on
    a 2-core machine.
    """
    u, sig, vt = jnp.linalg.svd(y.T, full_matrices=False)
    tol = jnp.asarray(10.0 * float(jnp.finfo(y.dtype).eps), y.dtype) * sig[0]
    keep = sig > tol
    return RangeBasis(u * keep[None, :].astype(u.dtype), sig, vt, keep, tol)


class LeaveOut(NamedTuple):
    """What leaving sketch columns out removes from the basis, in the coordinates of `q`."""

    z: jax.Array
    """(s, s): column i is ẑ_i, the unit pseudo-inverse column Σ_K⁻¹V_Kᵀe_i (zero if that is
    zero): the direction orthogonal to every other column Aω_j."""
    factor: jax.Array
    """(s, s): column f_i is ẑ_i or zero: the projector onto span{Aω_j : j ≠ i} is
    P_i = P − f_i f_iᵀ, P = Σ_{a∈K} e_a e_aᵀ the projector onto the sketch's range."""
    pairs: jax.Array
    """(s, s, 2, 2): [i, j, k] holds the coefficients on (ẑ_i, ẑ_j) of an orthonormal basis
    (unit or zero vectors) of what leaving out both i and j removes from P (i ≠ j)."""


def leave_out(basis: RangeBasis) -> LeaveOut:
    """The leave-one-out and leave-two-out projectors of a sketch, for any rank.

    P_i must be the projector onto span{Aω_j : j ≠ i}, a function of the other probes only:
    that is what makes each leave-one-out sample of XTrace and XDiag unbiased (Epperly, Tropp
    & Webber 2024, Section 2.1). Their downdating takes the unit i-th column of R⁻ᵀ (Section
    2.2), which needs a sketch of full rank. In general, the directions leaving out a set S
    of columns removes are Σ_K⁻¹V_Kᵀa for the a ∈ span{e_i : i ∈ S} in the row space, that
    is with P_N a = 0, P_N = V_D V_Dᵀ the projector onto the null space (the dropped
    directions D). Numerically a counts as in the row space when the dropped part of Σ⁻¹Vᵀa,
    at least ‖P_N a‖ / tol, is below its kept part, ‖Σ_K⁻¹V_Kᵀa‖: aᵀP_N a < tol²·aᵀZᵀZa. An
    exact dependency (P_N entries of order 1/s) and an independent column (at rounding level)
    are never close to that boundary. For one column that is a comparison of numbers; for a
    pair, of the 2 × 2 blocks of P_N and ZᵀZ, along the eigenvectors of the first. O(s³).
    """
    s = basis.sig.shape[0]
    dtype = basis.vt.dtype
    inv = jnp.where(basis.keep, 1.0 / jnp.where(basis.keep, basis.sig, 1.0), 0.0)
    z = inv[:, None] * basis.vt  # column i: Σ_K⁻¹V_Kᵀe_i
    hi = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(z.T, z, precision=hi)  # ZᵀZ
    dropped = jnp.where(basis.keep, 0.0, 1.0).astype(dtype)[:, None] * basis.vt
    null = jnp.matmul(dropped.T, dropped, precision=hi)  # P_N
    tau = jnp.square(basis.tol)
    norm2 = jnp.diagonal(gram)
    norm = jnp.sqrt(norm2)
    zhat = z / jnp.where(norm > 0, norm, 1.0)[None, :]
    one = jnp.diagonal(null) < tau * norm2
    factor = jnp.where(one[None, :], zhat, 0.0)

    # Pairs: the eigenvectors of the 2 × 2 block [[d_i, p_ij], [p_ij, d_j]] of P_N, the angle
    # θ = atan2(2p, d_i − d_j)/2. The larger eigenvalue passes the test above only when both
    # d_i and d_j do; the smaller one, an exact zero when the pair shares a dependency (the
    # other columns then miss a direction), is computed to within ε of the larger.
    d = jnp.diagonal(null)
    di, dj = d[:, None], d[None, :]
    theta = 0.5 * jnp.arctan2(2.0 * null, di - dj)
    c, sn = jnp.cos(theta), jnp.sin(theta)
    vecs = jnp.stack([jnp.stack([-sn, c], -1), jnp.stack([c, sn], -1)], -2)  # [i, j, k, :]
    ni, nj = norm[:, None], norm[None, :]
    cos_ij = jnp.matmul(zhat.T, zhat, precision=hi)  # ẑ_iᵀẑ_j
    kq = (vecs[..., 0] ** 2 * (ni * ni)[..., None] + 2 * vecs[..., 0] * vecs[..., 1]
          * gram[..., None] + vecs[..., 1] ** 2 * (nj * nj)[..., None])  # vᵀ(ZᵀZ)v
    mid, half = 0.5 * (di + dj), jnp.hypot(0.5 * (di - dj), null)
    big = mid + half
    eps = float(jnp.finfo(dtype).eps)
    kept_big = big < tau * kq[..., 1]
    kept_small = kept_big | (mid - half < tau * kq[..., 0] + 100.0 * eps * big)
    kept = jnp.stack([kept_small, kept_big], -1)  # [i, j, k]
    # In the unit coordinates (ẑ_i, ẑ_j): coefficients v ⊙ (‖z_i‖, ‖z_j‖), then Gram-Schmidt
    # with the inner product [[1, cos], [cos, 1]].
    scale = jnp.stack([jnp.broadcast_to(ni, (s, s)), jnp.broadcast_to(nj, (s, s))], -1)
    coef = jnp.where(kept[..., None], vecs * scale[:, :, None, :], 0.0)

    def inner(a, b):
        return (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]
                + cos_ij * (a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]))

    def unit(a):
        n2 = inner(a, a)
        return jnp.where((n2 > 0)[..., None], a / jnp.sqrt(jnp.where(n2 > 0, n2, 1.0))[..., None],
                         0.0)

    u1 = unit(coef[:, :, 0])
    b = coef[:, :, 1]
    u2 = unit(b - inner(u1, b)[..., None] * u1)
    return LeaveOut(zhat, factor, jnp.stack([u1, u2], -2))
