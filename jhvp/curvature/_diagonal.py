"""The diagonal of an operator: stochastic (Hutchinson / Bekas, XDiag) and exact (unit basis).

Probe i is Rademacher, drawn from `fold_in(key, i)`, so `batch_size` changes a result only by
rounding (batched and unbatched products round differently).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

from .. import _protocol
from .._typing import Operator, PyTree
from . import _checks, _flow, _sketch
from . import _vectors as vec

DiagonalMethod = Literal["hutchinson", "xdiag"]
_METHODS: tuple[str, ...] = get_args(DiagonalMethod)


class DiagonalResult(NamedTuple):
    """The result of `diagonal` and `diagonal_exact`."""

    estimate: PyTree
    """The estimate of diag(A), with the structure of v."""
    stderr: PyTree
    """Its estimated standard error per entry, with the structure of v (zeros when exact; NaN
    when not estimable, from a single stochastic sample)."""
    num_matvecs: jax.Array
    """The matvecs spent (an int32 scalar, as `EighResult.num_matvecs`)."""


def _chunk_stats(op, key, first, size):
    """Count, mean and sum of squared deviations of v ⊙ Av over probes first..first+size-1."""
    dtype = _sketch.work_dtype(op.dtype)

    def sample(i):
        v = vec.rademacher(op, key, i)
        return vec.mul(vec.astype(v, dtype), vec.astype(op.matvec(v), dtype))

    p = jax.vmap(sample)(first + jnp.arange(size, dtype=jnp.int32))
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), p)
    squares = jax.tree.map(lambda x, mu: jnp.sum(jnp.square(x - mu[None]), axis=0), p, mean)
    return jnp.asarray(size, dtype), mean, squares


def _merge(a, b):
    # Chan, Golub & LeVeque (1979): merged mean and squared deviations of two samples; keeps
    # memory at batch_size probes (not m × n) without the cancellation of Σx² − m·mean².
    (na, ma, sa), (nb, mb, sb) = a, b
    total = na + nb
    delta = vec.sub(mb, ma)
    mean = vec.axpy(nb / total, delta, ma)
    squares = jax.tree.map(lambda x, y, d: x + y + jnp.square(d) * (na * nb / total), sa, sb,
                           delta)
    return total, mean, squares


def _hutchinson(op, key, m, batch_size):
    # Bekas, Kokiopoulou & Saad (2007): E[v ⊙ Av] = diag(A) for Rademacher v (v ⊙ v = 1).
    size = m if batch_size is None else min(batch_size, m)
    if size < m:  # equal chunks where a divisor allows: a remainder is one more program copy
        chunks, even = _sketch.chunking(m, size)
        if chunks * even == m:
            size = even
    chunks, rem = divmod(m, size)
    stats = _chunk_stats(op, key, jnp.zeros((), jnp.int32), size)
    if chunks > 1:
        def body(acc, c):
            return _merge(acc, _chunk_stats(op, key, c * size, size)), None

        stats, _ = _flow.scan(op, body, stats, jnp.arange(1, chunks, dtype=jnp.int32))
    if rem:
        stats = _merge(stats, _chunk_stats(op, key, jnp.asarray(chunks * size, jnp.int32), rem))
    _, mean, squares = stats
    if m == 1:
        return mean, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), mean)
    return mean, jax.tree.map(
        lambda x: jnp.sqrt(x / jnp.asarray(m - 1, x.dtype)) / jnp.sqrt(jnp.asarray(m, x.dtype)),
        squares)


def _xdiag(op, key, m, batch_size):
    # Epperly, Tropp & Webber (2024), "XDiag", Section 5 and their xdiag.m: sample i is the
    # exact diagonal of P_iA, P_i the projector onto span{Aω_j : j ≠ i}, plus the
    # Hutchinson-Bekas term ω_i ⊙ (I − P_i)Aω_i. Unbiased because P_i does not depend on ω_i,
    # for any rank of the sketch (`_sketch.leave_out`). In the paper's notation the n × s
    # matrices Q, AQ, Ω have columns; here they are stacks of s vectors (leaf by leaf, the
    # parameters' layout): Q c is `vec.combine(c.T, q)`, a column scaling `vec.scale_rows`.
    s = m // 2
    om, y = _sketch.sketch(op, key, s, batch_size)
    basis = _sketch.range_basis(y)
    q, c = basis.q, basis.coords
    dtype = c.dtype
    loo = _sketch.leave_out(basis)
    f = loo.factor
    z = _sketch.apply_rows(op, q, batch_size)  # the stack A q_a
    # With P = QQᵀ: sample i = diag(PA) + ω_i ⊙ (I − P)Aω_i (`base`, what P_i = P gives)
    # − Qf_i ⊙ AQf_i + ω_i ⊙ Qf_i (f_iᵀQᵀAω_i). (I − P)Aω_i is written out rather than taken
    # as zero, so that the sample stays exact for the directions the basis dropped.
    diag_pa = jax.tree.map(lambda a, b: jnp.sum(a * b, axis=0), q, z)
    base = jax.tree.map(lambda d, o, r: d[None] + o * r, diag_pa, om,
                        vec.sub(y, vec.combine(c.T, q, dtype)))
    qf, zf = vec.combine(f.T, q, dtype), vec.combine(f.T, z, dtype)
    samples = vec.add(vec.sub(base, vec.mul(qf, zf)),
                      vec.scale_rows(vec.mul(om, qf), jnp.sum(f * c, axis=0)))
    if s == 1:
        return (jax.tree.map(lambda x: x[0], samples),
                jax.tree.map(lambda x: jnp.full_like(x[0], jnp.nan), samples))
    return (jax.tree.map(lambda x: jnp.mean(x, axis=0), samples),
            _jackknife(loo, q, z, om, c, base))


def _jackknife(loo, q, z, om, c, base):
    """Per entry, the jackknife standard error of XDiag from s probes (Efron & Stein 1981).

    θ_(i), XDiag from the s − 1 probes other than i, has samples j ≠ i with projectors
    P − Σ_k u_k u_kᵀ, u_k = a_k ẑ_i + b_k ẑ_j (`_sketch.leave_out`); summed over j, their
    terms are n × s × s products, O(n s²) like the estimate. The leave-one-out samples'
    std/√s, which treats the exchangeable samples as independent, was measured 10-25% low
    (|estimate − diag| beyond two of it in 11-12% of entries and keys on a dense matrix);
    the jackknife is conservative in expectation: measured 1.3-4.5x the actual spread, the
    most on fast-decaying spectra.
    """
    s = c.shape[1]
    dtype = c.dtype
    u = loo.pairs  # [i, j, k, (a, b)]
    off = 1.0 - jnp.eye(s, dtype=dtype)
    zb, za = vec.combine(loo.z.T, q, dtype), vec.combine(loo.z.T, z, dtype)  # Qẑ_a, AQẑ_a
    zc = loo.z.T @ c  # [a, j] = ẑ_aᵀ(coordinates of Aω_j)
    g = u[..., 0] * zc[:, :, None] + u[..., 1] * jnp.diagonal(zc)[None, :, None]  # u_kᵀc_j
    aa = jnp.sum(u[..., 0] ** 2, -1) * off
    ab = jnp.sum(u[..., 0] * u[..., 1], -1) * off
    bb = jnp.sum(u[..., 1] ** 2, -1) * off
    ga = jnp.sum(u[..., 0] * g, -1) * off
    gb = jnp.sum(u[..., 1] * g, -1) * off
    prod = vec.mul(zb, za)
    # Σ_{j≠i} of −Qu_k ⊙ AQu_k + ω_j ⊙ Qu_k (u_kᵀc_j), vector i of the stack.
    removed = vec.sub(
        vec.add(vec.mul(zb, vec.combine(ga, om, dtype)),
                vec.combine(gb, vec.mul(om, zb), dtype)),
        vec.add(vec.add(vec.scale_rows(prod, jnp.sum(aa, axis=1)),
                        vec.mul(zb, vec.combine(ab, za, dtype))),
                vec.add(vec.mul(za, vec.combine(ab, zb, dtype)), vec.combine(bb, prod, dtype))))

    def spread(b, r):
        thetas = (jnp.sum(b, axis=0)[None] - b + r) / (s - 1)
        dev = jnp.sum(jnp.square(thetas - jnp.mean(thetas, axis=0, keepdims=True)), axis=0)
        return jnp.sqrt(dev * ((s - 1) / s))

    return jax.tree.map(spread, base, removed)


_IMPLS = {"hutchinson": _hutchinson, "xdiag": _xdiag}


def _diagonal_impl(op, key, *, method, num_matvecs, batch_size):
    estimate, stderr = _IMPLS[method](op, key, num_matvecs, batch_size)
    return op.to_struct(estimate), op.to_struct(stderr)


def diagonal(
    op: Operator,
    key: jax.Array,
    *,
    num_matvecs: int,
    method: DiagonalMethod = "hutchinson",
    batch_size: int | None = _sketch.DEFAULT_BATCH,
    like: PyTree | None = None,
    progress: bool = False,
) -> DiagonalResult:
    """Estimates diag(A) from `num_matvecs` products with Rademacher probes.

    Both methods are unbiased, for every operator: E[estimate] = diag(A) over keys. `stderr`
    estimates, per entry, the standard deviation of the estimate over keys, so that
    |estimate − diag(A)| exceeds 2·stderr in about 5-10% of entries and keys (measured over
    400 keys on dense, low-rank-plus-noise and fast-decaying spectra, float32 and float64):

    - ``"hutchinson"`` (Bekas, Kokiopoulou & Saad 2007): the mean of v ⊙ Av. With one matvec
      this is Sophia-H's Hessian-diagonal estimate (Liu et al. 2023). `stderr`: the per-entry
      sample standard deviation over the m probes divided by √m (NaN for m = 1). Exact (stderr
      0 up to rounding) when A is diagonal. Memory: 2·batch_size + 2 vectors beyond what the
      operator needs for `batch_size` products at once.
    - ``"xdiag"`` (Epperly, Tropp & Webber 2024): m/2 probes, each used both for a low-rank
      approximation P_iA (P_i projecting onto the other probes' Aω_j) and, leave-one-out, for
      the Hutchinson-Bekas estimate ω_i ⊙ (I − P_i)Aω_i of what it misses; the estimate is
      the mean of the m/2 leave-one-out estimates. `stderr`: per entry, their jackknife
      (Efron & Stein 1981), the spread of the m/2 estimates from m/2 − 1 probes. The
      leave-one-out estimates' own std/√(m/2) treats them as independent; they are
      correlated, and it was measured 10-25% small (|error| > 2 of it in 11-15% of entries
      on dense and decaying spectra). The jackknife is conservative instead: measured
      1.3-2x the actual spread on dense and noisy spectra, up to 5x on fast-decaying ones.
      Exact when every leave-one-out sketch spans range(A), so rank(A) < m/2; its stderr is
      0 (up to rounding) from rank(A) < m/2 − 1. Even num_matvecs; memory 5m + 2·batch_size + 4
      vectors (probes, sketch, basis, A times it, the jackknife's stacks), and O(n m²) flops
      beyond the matvecs (the sketch's Gram-Schmidt, the jackknife's products).

    Vectors keep the parameters' layout, leaf by leaf: on d devices each costs 1/d of a vector
    per device (`tests/test_curvature_memory.py` checks the memory stated here).

    "Spans" is almost sure for a dense A. With Rademacher probes, an A supported on a few
    coordinates sees few distinct probes there; when they agree on its support the sketch
    misses part of range(A), which costs accuracy, never unbiasedness, and the stderr covers
    it, except when every probe of a run agrees there: the samples are then identical and
    the stderr 0 while the estimate is not exact (a chance of about 2^(−(k−1)(p−1)) for k
    coordinates and p probes).

    16-bit operators (bfloat16, float16): the probes and every vector the operator sees are
    in its dtype; the small dense maths and the statistics run in float32; estimate and
    stderr are returned in the operator's dtype.

    Args:
        op: A `jhvp.HessianOperator`, another jhvp operator, or a symmetric linear callable
            v -> A v on pytrees (then pass `like`).
        key: A `jax.random` key; probe i comes from `jax.random.fold_in(key, i)`.
        num_matvecs: The budget m of matvecs, 1 ≤ m ≤ n.
        method: "hutchinson" or "xdiag".
        batch_size: Probes applied at once (vmapped): at most 4 by default; None: all at
            once. Changes the result only by rounding.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; required
            for a plain callable, else defaults to `op.in_structure()`.

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

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
        >>> import numpy as np
        >>> u = jnp.asarray(np.random.default_rng(0).normal(size=(50, 3)))
        >>> B = u @ u.T + 0.01 * jnp.eye(50)  # rank 3 plus a little of everything
        >>> result = curvature.diagonal(lambda v: B @ v, jax.random.key(0), num_matvecs=12,
        ...                             method="xdiag", like=jnp.zeros(50))
        >>> error = jnp.abs(result.estimate - jnp.diagonal(B))
        >>> print(f"largest error {float(error.max()):.3f}, largest stderr "
        ...       f"{float(result.stderr.max()):.3f}")
        largest error 0.020, largest stderr 0.034
    """
    api = "jhvp.curvature.diagonal"
    m = _checks.check_budget(num_matvecs, method, _METHODS, {"xdiag": 2}, api)
    _checks.check_batch_size(batch_size, api)
    struct = _protocol.structure(op, like, api)
    _checks.check_key(key, api)
    _checks.check_dimension(m, _protocol.size(struct), "curvature.diagonal_exact(op)", api)
    estimate, stderr = _protocol.run(
        _diagonal_impl, op, struct, key, api=api, progress=progress, budget=m, method=method,
        num_matvecs=m,
        batch_size=batch_size,
    )
    return DiagonalResult(estimate, stderr, jnp.asarray(m, jnp.int32))


def _exact_impl(op, *, batch_size):
    # Entry i of the whole vector (ravel_pytree order) is entry i - offset_l of leaf l: probe i
    # is the unit vector there, built and read leaf by leaf (no flat vector of n).
    sizes = [int(np.prod(s.shape, dtype=np.int64)) for s in jax.tree.leaves(op.struct)]
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    tree = jax.tree.structure(op.struct)

    def entry(i):
        masks = [jnp.arange(size, dtype=jnp.int32).reshape(s.shape) == i - offset
                 for size, offset, s in zip(sizes, offsets, jax.tree.leaves(op.struct),
                                            strict=True)]
        e = jax.tree.unflatten(tree, [mask.astype(op.dtype) for mask in masks])
        out = jax.tree.leaves(op.matvec(e))
        return sum(jnp.sum(jnp.where(mask, x, jnp.zeros_like(x)))
                   for mask, x in zip(masks, out, strict=True))

    d = _sketch.map_probes(op, entry, op.n, batch_size)
    leaves = [d[o : o + size].reshape(s.shape)
              for o, size, s in zip(offsets, sizes, jax.tree.leaves(op.struct), strict=True)]
    estimate = vec.constrain(op, jax.tree.unflatten(tree, leaves))
    return op.to_struct(estimate), op.to_struct(jax.tree.map(jnp.zeros_like, estimate))


def diagonal_exact(
    op: Operator, *, batch_size: int | None = _sketch.DEFAULT_BATCH, like: PyTree | None = None,
    progress: bool = False,
) -> DiagonalResult:
    """Computes diag(A) exactly, A_ii = e_iᵀAe_i, from n matvecs over the unit basis.

    For small n or as a reference: n matvecs, `batch_size` of them at once (4 by default;
    None: all n, an n × n intermediate).

    Args:
        op: A `jhvp.HessianOperator`, another jhvp operator, or a symmetric linear callable
            v -> A v on pytrees (then pass `like`).
        batch_size: Basis vectors applied at once (vmapped): 4 by default; None: all n.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; required
            for a plain callable, else defaults to `op.in_structure()`.

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

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
    estimate, stderr = _protocol.run(_exact_impl, op, struct, api=api, progress=progress,
                                     budget=_protocol.size(struct), batch_size=batch_size)
    return DiagonalResult(estimate, stderr, jnp.asarray(_protocol.size(struct), jnp.int32))
