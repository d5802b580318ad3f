"""The randomised-estimation kit: probes, their batching, range sketches and their bases.

Probe i is always drawn from `jax.random.fold_in(key, i)`, so how probes are batched
(`batch_size`) changes a result only by rounding, and memory and speed. The sketch kit (range
sketch, its orthonormal basis, leave-one-out and leave-two-out projectors, sample statistics)
serves Hutch++, XTrace and XDiag alike. Vectors stay in the operator's dtype; the small dense
maths runs in `work_dtype` (float32 for 16-bit operators).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._protocol import TreeOperator
from .._typing import PyTree
from . import _flow, _lanczos
from . import _vectors as vec

DEFAULT_BATCH = 4
"""The probes in flight by default (`batch_size`): more only when the user asks."""


def chunking(num: int, batch_size: int) -> tuple[int, int]:
    """(chunks, size): num probes in equal chunks of at most batch_size, with no remainder.

    A remainder would be a second vmapped copy of the operator in the program: measured 3 s
    more compilation for a Hutch++ trace on an 85k MLP. The size is the largest divisor of num
    up to batch_size when that is at least half of it; otherwise chunks of batch_size, the last
    padded with up to chunks − 1 probes past num, computed and dropped.
    """
    divisor = max(d for d in range(1, batch_size + 1) if num % d == 0)
    if 2 * divisor >= batch_size:
        return num // divisor, divisor
    chunks = -(-num // batch_size)
    return chunks, -(-num // chunks)


def map_probes(
    op: TreeOperator, fn: Callable[[jax.Array], PyTree], num: int, batch_size: int | None, *,
    start: int = 0,
) -> PyTree:
    """Returns fn(i) for i in start, ..., start + num - 1, stacked along a leading axis of num.

    `batch_size=None` vmaps over all probes at once (the operator then sees matrix-matrix
    products); `batch_size=b` runs a loop over equal chunks of at most b (`chunking`), each
    chunk vmapped, bounding memory to b probes in flight (b = 1: `jax.lax.map`, no batch
    axis). Each chunk is written into the stack in place (no reshape or concatenation of the
    stack, either of which XLA may lay out by gathering a sharded stack). Over a streamed `op`
    the chunks run from a Python loop (`_flow.map_chunks`).
    """
    if op.streamed is not None:
        size = num if batch_size is None else min(batch_size, num)
        if 1 < size < num:
            size = chunking(num, size)[1]
        return _flow.map_chunks(op, fn, start, num, size)
    if batch_size is None or batch_size >= num:
        return jax.vmap(fn)(jnp.arange(start, start + num, dtype=jnp.int32))
    if batch_size == 1:  # one at a time: no batch axis for XLA to carry through the loop
        return jax.lax.map(fn, jnp.arange(start, start + num, dtype=jnp.int32))
    chunks, size = chunking(num, batch_size)
    batched = jax.vmap(fn)

    def chunk(first):
        return batched(first + jnp.arange(size, dtype=jnp.int32))

    shapes = jax.eval_shape(chunk, jnp.zeros((), jnp.int32))
    out = jax.tree.map(lambda s: jnp.zeros((chunks * size, *s.shape[1:]), s.dtype), shapes)

    def body(c, out):
        at = c * size
        return jax.tree.map(lambda o, v: jax.lax.dynamic_update_slice_in_dim(o, v, at, 0),
                            out, chunk(start + at))

    out = jax.lax.fori_loop(0, chunks, body, out)
    if chunks * size == num:
        return out
    return jax.tree.map(lambda x: x[:num], out)


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


def sketch(op: TreeOperator, key: jax.Array, num: int, batch_size: int | None):
    """Rademacher probes Ω (a stack of ω_i, i < num) and AΩ (of Aω_i), in the working dtype."""
    dtype = work_dtype(op.dtype)

    def probe(i):
        w = vec.rademacher(op, key, i)
        return vec.astype(w, dtype), vec.astype(op.matvec(w), dtype)

    return map_probes(op, probe, num, batch_size)


def apply_rows(op: TreeOperator, rows: PyTree, batch_size: int | None,
               reduce: Callable | None = None) -> PyTree:
    """A applied to each vector of the stack `rows`, vmapped batch_size vectors at a time.

    Vectors are rounded to the operator's dtype on the way in, the products returned in the
    dtype of `rows` (the working dtype). With `reduce`, returns `reduce(i, row_i, A row_i)`
    stacked instead, and the products are never stored together.
    """
    first = jax.tree.leaves(rows)[0]

    def one(i):
        r = vec.row(rows, i)
        product = vec.astype(op.matvec(vec.astype(r, op.dtype)), first.dtype)
        return product if reduce is None else reduce(i, r, product)

    return map_probes(op, one, first.shape[0], batch_size)


def _qr(y: PyTree) -> tuple[PyTree, jax.Array]:
    """Y = QR for a stack y of s vectors: Q a stack of orthonormal vectors, R (s, s) upper.

    Classical Gram-Schmidt with reorthogonalisation (`_lanczos.orthogonalise`, DGKS), column
    by column, leaf by leaf. A column that the earlier ones span to rounding leaves only
    rounding behind: that is normalised and orthogonalised twice more, so Q stays orthonormal
    to working precision and R holds the tiny diagonal entry the SVD of R then drops.
    """
    leaf = jax.tree.leaves(y)[0]
    s, dtype = leaf.shape[0], leaf.dtype
    eps = jnp.asarray(jnp.finfo(dtype).eps, dtype)

    def body(j, carry):
        q, r = carry
        col = vec.row(y, j)
        small_below = jnp.sqrt(eps) * vec.norm(col, dtype)

        # Pass 0 orthogonalises the column and gives R's column; passes 1 and 2 run only when
        # it left rounding behind (norm ≤ √ε‖col‖, not 0), on the normalised remainder. One
        # loop, so the program holds one orthogonalisation (compilation is most of a first
        # call).
        def one_pass(i, carry):
            unit, c, norm = carry
            w, c_i = _lanczos.orthogonalise(q, unit, eps)
            unit, n = _lanczos.normalise(w, dtype)
            first = i == 0
            return unit, jnp.where(first, c_i, c), jnp.where(first, n, norm)

        def maybe(i, carry):
            run = (i == 0) | ((carry[2] <= small_below) & (carry[2] > 0))
            return jax.lax.cond(run, functools.partial(one_pass, i), lambda c: c, carry)

        unit, c, norm = jax.lax.fori_loop(
            0, 3, maybe, (col, jnp.zeros(s, dtype), jnp.zeros((), dtype)))
        return vec.set_row(q, j, unit), r.at[:, j].set(c.at[j].set(norm))

    q0 = jax.tree.map(jnp.zeros_like, y)
    return jax.lax.fori_loop(0, s, body, (q0, jnp.zeros((s, s), dtype)))


class RangeBasis(NamedTuple):
    """A sketch AΩ = UΣVᵀ: the basis U_K of its range, and Σ, V, K."""

    q: PyTree
    """A stack of s vectors: u_a where a ∈ K, else zero; Σ_a u_a u_aᵀ projects onto
    range(AΩ)."""
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


@jax.jit  # one program when called outside jit (a streamed operator's eager driver)
def range_basis(y: PyTree) -> RangeBasis:
    """The thin SVD of the sketch Y = UΣVᵀ (y a stack of the s columns Aω_i): the basis U_K.

    K keeps the singular values above tol = 10·ε·σ₁. An exact dependency among the columns
    (rank(A) < s, or Rademacher probes that agree on A's support) leaves a singular value at
    rounding level; its direction is defined by rounding, so keeping it would make every
    projector depend on every probe. What the threshold drops of a real, fast-decaying
    spectrum is at rounding level and falls to the Hutchinson part, which stays unbiased.
    Computed as a QR (`_qr`, Gram-Schmidt on the stack: no flat n × s matrix, every vector
    keeps the parameters' layout) and the SVD of the s × s R, U = Q U_R: singular values
    accurate to ε·σ₁, not the √ε·σ₁ of a Gram matrix's eigenvalues, which would lose most of
    a fast-decaying sketch in float32. One small LAPACK call, on purpose: jaxlib splits a
    batched (vmapped) LAPACK call over XLA's CPU thread pool and blocks a pool thread until
    its parts finish, so two independent batched calls in one program can take every thread
    and deadlock, as seen on a 2-core machine.
    """
    q, r = _qr(y)
    u, sig, vt = jnp.linalg.svd(r, full_matrices=False)
    dtype = r.dtype
    tol = jnp.asarray(10.0 * float(jnp.finfo(dtype).eps), dtype) * sig[0]
    keep = sig > tol
    basis = vec.combine((u * keep[None, :].astype(dtype)).T, q, dtype)
    return RangeBasis(basis, sig, vt, keep, tol)


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


@jax.jit  # one program when called outside jit (a streamed operator's eager driver)
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
