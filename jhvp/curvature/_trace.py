"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace, budgets counted in matvecs.

Every method draws Rademacher probe i from `fold_in(key, i)` and applies the operator to its
vectors in vmapped batches (matrix-matrix products), `batch_size` at a time, so `batch_size`
changes the estimate only by rounding.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import Operator, PyTree
from . import _checks, _sketch
from . import _vectors as vec

TraceMethod = Literal["hutchinson", "hutch++", "xtrace"]
_METHODS: tuple[str, ...] = get_args(TraceMethod)


class TraceResult(NamedTuple):
    """The result of `trace`."""

    estimate: jax.Array
    """The estimate of tr(A), a scalar."""
    stderr: jax.Array
    """Its estimated standard error (see `trace` for what it is per method); NaN if not
    estimable (a single stochastic sample)."""
    num_matvecs: jax.Array
    """The matvecs spent (an int32 scalar, as `EighResult.num_matvecs`)."""


def _hutchinson(op, key, m, batch_size):
    dtype = _sketch.work_dtype(op.dtype)

    def sample(i):
        v = vec.rademacher(op, key, i)
        return vec.dot(vec.astype(v, dtype), op.matvec(v), dtype)

    return _sketch.mean_stderr(_sketch.map_probes(op, sample, m, batch_size))


def _hutchpp(op, key, m, batch_size):
    # Meyer, Musco, Musco & Woodruff (2021), Algorithm 1: m/3 matvecs sketch the range,
    # m/3 take tr(QᵀAQ) exactly, m/3 run Hutchinson on the deflated (I − QQᵀ)A(I − QQᵀ).
    k = m // 3
    _, y = _sketch.sketch(op, key, k, batch_size)
    # Any Q with orthonormal columns, built from the sketch alone, keeps the estimate unbiased.
    q = _sketch.range_basis(y).q
    dtype = jax.tree.leaves(q)[0].dtype
    # tr(QᵀAQ) one q_a at a time: the products A q_a are never stored.
    low = jnp.sum(_sketch.apply_rows(op, q, batch_size,
                                     lambda a, qa, aqa: vec.dot(qa, aqa, dtype)))

    def residual(i):
        g = vec.astype(vec.rademacher(op, key, i), dtype)
        # The vector the operator sees, rounded to its dtype, on both sides of the form.
        w = vec.astype(vec.sub(g, vec.combine(vec.coefficients(q, g, dtype), q, dtype)),
                       op.dtype)
        return vec.dot(vec.astype(w, dtype), op.matvec(w), dtype)

    # Probes k..2k-1: independent of the sketch's probes 0..k-1.
    estimate, stderr = _sketch.mean_stderr(_sketch.map_probes(op, residual, k, batch_size, start=k))
    return low + estimate, stderr


def _xtrace(op, key, m, batch_size):
    # Epperly, Tropp & Webber (2024), "XTrace", Section 2 and their reference code (xtrace.m):
    # every probe serves both the low-rank part and the Hutchinson part, leave-one-out.
    # Sample i is tr(AP_i) + ω_iᵀ(I − P_i)A(I − P_i)ω_i, P_i the projector onto
    # span{Aω_j : j ≠ i}: unbiased because P_i does not depend on ω_i, for any rank of the
    # sketch (`_sketch.leave_out`). The residual is written out, ω_iᵀAω_i − 2ω_iᵀAQx_i +
    # x_iᵀHx_i with x_i = QᵀP_iω_i, rather than reduced with Aω_i ∈ range(Q), so that it stays
    # exact for the directions the basis dropped. Rademacher probes, so without the paper's
    # "improved" normalisation (it assumes rotation-invariant probes). Only s × s products of
    # the stacks (`vec.gram`) meet the n-dimensional vectors.
    s = m // 2
    om, y = _sketch.sketch(op, key, s, batch_size)
    dtype = jax.tree.leaves(y)[0].dtype
    omy = vec.row_dots(om, y, dtype)  # ω_iᵀAω_i
    basis = _sketch.range_basis(y)
    q = basis.q

    def rows(a, qa, aqa):  # row a of QᵀAQ and of (AQ)ᵀΩ: the products A q_a are not stored
        return vec.coefficients(q, aqa, dtype), vec.coefficients(om, aqa, dtype)

    h, t = _sketch.apply_rows(op, q, batch_size, rows)  # QᵀAQ; columns QᵀAω_i
    w = vec.gram(q, om, dtype)  # columns Qᵀω_i
    tw = jnp.sum(t * w, axis=0)
    whw = jnp.sum(w * (h @ w), axis=0)
    base = jnp.trace(h) + omy - 2.0 * tw + whw  # P_i = P
    loo = _sketch.leave_out(basis)
    f = loo.factor
    fw, ft, fhw = (jnp.sum(f * v, axis=0) for v in (w, t, h @ w))
    fhf = jnp.sum(f * (h @ f), axis=0)
    # P_i = P − f_i f_iᵀ: x_i = w_i − f_i(f_iᵀw_i).
    samples = base - fhf + 2.0 * fw * ft - 2.0 * fw * fhw + fw * fw * fhf
    if s == 1:
        return samples[0], jnp.full((), jnp.nan, samples.dtype)
    return jnp.mean(samples), _jackknife(loo, h, w, t, base)


def _jackknife(loo, h, w, t, base):
    """The jackknife standard error of XTrace from s probes (Efron & Stein 1981).

    θ_(i) is XTrace from the s − 1 probes other than i; its sample j ≠ i leaves out i and j,
    P_j^(i) = P − Π_ij with Π_ij = u₁u₁ᵀ + u₂u₂ᵀ from `_sketch.leave_out` (O(s³) in all).
    The paper's error estimate, std(samples)/√s, treats the exchangeable samples as
    independent; they are positively correlated (each sample's projector holds the other
    probes), and it was measured to put |estimate − tr| beyond two of them in 9-25% of keys
    (5 to 15 probes, dense, low-rank-plus-noise and decaying spectra; 5% would be honest).
    The jackknife is conservative in expectation (it bounds the variance of θ from s − 1
    probes): measured 1.2-5x the actual spread, the most on fast-decaying spectra, where one
    probe fewer costs the most accuracy.
    """
    s = w.shape[1]
    zh = loo.z
    zw, zt, zhw, zhz = zh.T @ w, zh.T @ t, zh.T @ (h @ w), zh.T @ h @ zh

    def pair(m):  # [i, j] -> the pair (ẑ_iᵀ·_j, ẑ_jᵀ·_j) of sample j's vector
        return jnp.stack([m, jnp.broadcast_to(jnp.diagonal(m)[None, :], m.shape)], -1)

    u = loo.pairs  # [i, j, k, :]
    alpha = jnp.einsum("ijkc,ijc->ijk", u, pair(zw))
    tau = jnp.einsum("ijkc,ijc->ijk", u, pair(zt))
    eta = jnp.einsum("ijkc,ijc->ijk", u, pair(zhw))
    diag = jnp.diagonal(zhz)
    block = jnp.stack([jnp.stack([jnp.broadcast_to(diag[:, None], zhz.shape), zhz], -1),
                       jnp.stack([zhz, jnp.broadcast_to(diag[None, :], zhz.shape)], -1)], -2)
    hu = jnp.einsum("ijkc,ijcd,ijld->ijkl", u, block, u)  # u_kᵀ Ĥ u_l
    # Sample j of θ_(i): x = w_j − Σ_k u_k α_k, as for the leave-one-out samples.
    samples = (base[None, :] - jnp.trace(hu, axis1=-2, axis2=-1)
               + 2.0 * jnp.sum(alpha * tau, -1) - 2.0 * jnp.sum(alpha * eta, -1)
               + jnp.einsum("ijk,ijkl,ijl->ij", alpha, hu, alpha))
    off = 1.0 - jnp.eye(s, dtype=samples.dtype)
    thetas = jnp.sum(samples * off, axis=1) / (s - 1)
    spread = jnp.sum(jnp.square(thetas - jnp.mean(thetas)))
    return jnp.sqrt(spread * ((s - 1) / s))


_IMPLS = {"hutchinson": _hutchinson, "hutch++": _hutchpp, "xtrace": _xtrace}


def _trace_impl(op, key, *, method, num_matvecs, batch_size):
    estimate, stderr = _IMPLS[method](op, key, num_matvecs, batch_size)
    return estimate.astype(op.dtype), stderr.astype(op.dtype)


def trace(
    op: Operator,
    key: jax.Array,
    *,
    num_matvecs: int,
    method: TraceMethod = "hutch++",
    batch_size: int | None = _sketch.DEFAULT_BATCH,
    like: PyTree | None = None,
    progress: bool = False,
) -> TraceResult:
    """Estimates tr(A) from `num_matvecs` products with Rademacher probes.

    Every method is unbiased, for every operator: E[estimate] = tr(A) over keys. `stderr`
    estimates the standard deviation of the estimate over keys, so that |estimate − tr(A)|
    exceeds 2·stderr in about 5-10% of keys (measured over 400 keys on dense,
    low-rank-plus-noise and fast-decaying spectra, in float32 and float64):

    - ``"hutchinson"`` (Hutchinson 1989): the mean of vᵢᵀAvᵢ. `stderr`: the sample standard
      deviation over the m probes divided by √m. Error O(‖A‖_F/√m); exact (stderr 0 up to
      rounding) when A is diagonal.
    - ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): m/3 probes sketch A's range Q, m/3
      matvecs give tr(QᵀAQ) exactly, m/3 further probes run Hutchinson on
      (I − QQᵀ)A(I − QQᵀ). Error O(‖A‖_*/m): far better on a fast-decaying spectrum. `stderr`:
      the standard error of that Hutchinson part, the only random term given Q. Exact (stderr
      0 up to rounding) when the sketch spans range(A), so rank(A) ≤ m/3. num_matvecs
      divisible by 3.
    - ``"xtrace"`` (Epperly, Tropp & Webber 2024): m/2 probes, each used both for the
      low-rank part and, leave-one-out, as a Hutchinson probe of what the others miss; the
      estimate is the mean of the m/2 leave-one-out estimates. `stderr`: their jackknife
      (Efron & Stein 1981), the spread of the m/2 estimates from m/2 − 1 probes. The paper's
      std/√(m/2) of the leave-one-out estimates treats them as independent; they are
      correlated, and it was measured too small (|error| > 2 of it in 9-25% of keys). The
      jackknife is conservative instead: measured 1.2-2x the actual spread on dense and
      noisy spectra, up to 5x on fast-decaying ones (where one probe fewer costs the most).
      Exact when every leave-one-out sketch spans range(A), so rank(A) < m/2; its stderr is
      0 (up to rounding) from rank(A) < m/2 − 1. Even num_matvecs.

    "Spans" above is almost sure for a dense A. With Rademacher probes, an A supported on a
    few coordinates sees few distinct probes there (2^(k−1) up to sign, for k coordinates):
    when the probes agree on its support the sketch misses part of range(A). That costs
    accuracy, never unbiasedness, and the stderr covers it, except when every probe of a run
    agrees there (with a chance of about 2^(−(k−1)(p−1)) for p probes): the samples are then
    identical, and the stderr 0 while the estimate is not exact.

    16-bit operators (bfloat16, float16): the probes and every vector the operator sees are
    in its dtype; the small dense maths (eigendecomposition, SVD, projections, statistics)
    runs in float32; estimate and stderr are returned in the operator's dtype, so they carry
    its rounding (about 2⁻⁸ of the trace for bfloat16).

    Memory (working vectors beyond what the operator needs for `batch_size` products at once;
    `tests/test_curvature_memory.py` checks it): hutchinson 2·batch_size + 1; hutch++
    2m/3 + 2·batch_size + 4 (sketch and basis); xtrace 5m/2 + 2·batch_size + 4 (probes,
    sketch, basis and their Gram-Schmidt). Vectors keep the parameters' layout, leaf by leaf:
    on d devices each costs 1/d of a vector per device. Beyond the matvecs, hutch++ and xtrace cost
    O(n m²) flops (an eigendecomposition or an SVD of the sketch) and xtrace O(m³) more for
    the leave-one-out and jackknife projectors.

    Probe i is drawn from `jax.random.fold_in(key, i)`, so `batch_size` (how many probes the
    operator sees at once: None = all) changes memory and speed, and the result only by
    rounding (batched and unbatched products round differently). The whole
    estimate is one jitted program, the operator's arrays passed in as arguments.

    Args:
        op: A `jhvp.HessianOperator`, another jhvp operator, or a symmetric linear callable
            v -> A v on pytrees (then pass `like`).
        key: A `jax.random` key.
        num_matvecs: The budget m of matvecs, 1 ≤ m ≤ n.
        method: "hutchinson", "hutch++" or "xtrace".
        batch_size: Probes applied at once (vmapped, in a loop over batches): 4 by
            default; None: all at once.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; required
            for a plain callable, else defaults to `op.in_structure()`.

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

    Returns:
        A `TraceResult` (estimate, stderr, num_matvecs).

    Raises:
        TypeError: A non-int `num_matvecs` or `batch_size`; a plain callable without `like`.
        ValueError: An unknown method; num_matvecs < 1, > n, or not divisible by 3 (hutch++)
            or 2 (xtrace); batch_size < 1; `like` not matching what op accepts.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jhvp import curvature
        >>> u = jnp.array([[1.0, 2.0, 0.5, -1.0, 0.3, 0.7], [0.2, -0.4, 1.0, 0.8, -1.1, 0.6]])
        >>> A = u.T @ u  # rank 2, trace 10.24
        >>> result = curvature.trace(lambda v: A @ v, jax.random.key(0), num_matvecs=6,
        ...                          like=jnp.zeros(6))
        >>> # hutch++ (the default) is exact when rank(A) <= num_matvecs / 3
        >>> print(f"{float(result.estimate):.3f} from {result.num_matvecs} matvecs")
        10.240 from 6 matvecs
        >>> import numpy as np
        >>> u = jnp.asarray(np.random.default_rng(0).normal(size=(50, 3)))
        >>> B = u @ u.T + 0.01 * jnp.eye(50)  # rank 3 plus a little of everything
        >>> result = curvature.trace(lambda v: B @ v, jax.random.key(0), num_matvecs=12,
        ...                          method="xtrace", like=jnp.zeros(50))
        >>> error = abs(float(result.estimate) - float(jnp.trace(B)))
        >>> print(f"error {error:.3f}, stderr {float(result.stderr):.3f}")
        error 0.004, stderr 0.014
    """
    api = "jhvp.curvature.trace"
    m = _checks.check_budget(num_matvecs, method, _METHODS, {"hutch++": 3, "xtrace": 2}, api)
    _checks.check_batch_size(batch_size, api)
    struct = _protocol.structure(op, like, api)
    _checks.check_key(key, api)
    _checks.check_dimension(m, _protocol.size(struct), "jnp.trace(op.as_matrix())", api)
    estimate, stderr = _protocol.run(
        _trace_impl, op, struct, key, api=api, progress=progress, budget=m, method=method,
        num_matvecs=m,
        batch_size=batch_size,
    )
    return TraceResult(estimate, stderr, jnp.asarray(m, jnp.int32))
