"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace, budgets counted in matvecs.

Every method draws Rademacher probe i from `fold_in(key, i)` and applies the operator to its
vectors in vmapped batches (matrix-matrix products), `batch_size` at a time, so the estimate
does not depend on `batch_size`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from .._typing import PyTree
from . import _probes, _protocol

TraceMethod = Literal["hutchinson", "hutch++", "xtrace"]
_METHODS: tuple[str, ...] = get_args(TraceMethod)


class TraceResult(NamedTuple):
    """The result of `trace`."""

    estimate: jax.Array
    """The estimate of tr(A), a scalar."""
    stderr: jax.Array
    """Its estimated standard error (see `trace` for what it is per method); NaN if not
    estimable (a single stochastic sample)."""
    num_matvecs: int
    """The matvecs spent."""


def check_budget(
    num_matvecs: Any, method: Any, methods: tuple[str, ...], multiple: dict[str, int], api: str
) -> int:
    """Checks `method` and `num_matvecs` (before n is known); returns num_matvecs as an int."""
    if not isinstance(method, str) or method not in methods:
        listed = ", ".join(repr(m) for m in methods)
        raise ValueError(
            f"jhvp.curvature.{api}: unknown method {method!r}; valid methods are {listed}."
        )
    if isinstance(num_matvecs, bool):
        raise TypeError(f"jhvp.curvature.{api}: `num_matvecs` must be an int, got {num_matvecs!r}.")
    try:
        m = operator.index(num_matvecs)
    except TypeError:
        raise TypeError(
            f"jhvp.curvature.{api}: `num_matvecs` must be an int, got "
            f"{type(num_matvecs).__name__} ({num_matvecs!r})."
        ) from None
    if m < 1:
        raise ValueError(f"jhvp.curvature.{api}: `num_matvecs` must be at least 1, got {m}.")
    k = multiple.get(method, 1)
    if m % k:
        lower, upper = k * (m // k), k * (m // k + 1)
        suggest = f"{upper}" if lower == 0 else f"{lower} or {upper}"
        raise ValueError(
            f"jhvp.curvature.{api}: method {method!r} needs `num_matvecs` divisible by {k}, got "
            f"{m}; use {suggest}."
        )
    return m


def check_dimension(m: int, n: int, exact: str, api: str) -> None:
    """Raises ValueError if the budget m exceeds the dimension n, which buys the exact answer."""
    if m > n:
        raise ValueError(
            f"jhvp.curvature.{api}: `num_matvecs` ({m}) exceeds the operator's dimension n = {n}; "
            f"n matvecs already give the exact answer: use {exact}, or num_matvecs <= {n}."
        )


def dimension(struct: PyTree) -> int:
    """The number n of scalar entries of a vector of `struct`."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(struct))


def mean_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean over the leading axis and its standard error std(ddof=1)/√m (NaN for m = 1)."""
    m = samples.shape[0]
    std = jnp.std(samples, axis=0, ddof=1) if m > 1 else jnp.full(samples.shape[1:], jnp.nan,
                                                                   samples.dtype)
    return jnp.mean(samples, axis=0), std / jnp.sqrt(jnp.asarray(m, samples.dtype))


def sketch(flat_op, key, num: int, batch_size: int | None):
    """Rademacher probes Ω (rows ω_i, i < num) and AΩ (rows Aω_i): the range sketch."""

    def probe(i):
        w = _probes.rademacher(key, i, flat_op.n, flat_op.dtype)
        return w, flat_op.matvec(w)

    return _probes.map_probes(probe, num, batch_size)


def apply_rows(flat_op, rows: jax.Array, batch_size: int | None) -> jax.Array:
    """A applied to each row of `rows` (num, n), vmapped batch_size rows at a time."""
    return _probes.map_probes(lambda i: flat_op.matvec(rows[i]), rows.shape[0], batch_size)


def orthonormal_basis(y: jax.Array) -> jax.Array:
    """An n × k matrix Q with orthonormal (or zero) columns whose span is range(yᵀ), y (k, n).

    CholeskyQR (Fukaya et al. 2014) with the Cholesky factor replaced by an eigendecomposition
    of the k × k Gram matrix, whose near-zero eigenvalues (rank deficiency, rounding) give zero
    columns instead of NaNs. One pass leaves ‖QᵀQ − I‖ ≈ ε κ(y)² (Yamamoto et al. 2015), so a
    second pass (CholeskyQR2) runs only when κ(y)² > 100 or y lost rank. Each pass is two
    n × k × k matrix products, which dominate Hutch++ on a cheap operator; XLA:CPU's
    Householder QR forming Q was measured 70x slower than the 99 matvecs of a 1e4-parameter
    Rosenbrock trace.
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


def loo_factor(r: jax.Array) -> jax.Array:
    """S = R⁻ᵀ with unit columns: Q_(i)Q_(i)ᵀ = Q(I − s_i s_iᵀ)Qᵀ, Q_(i) spanning AΩ without ω_i.

    The downdating identity of Epperly, Tropp & Webber (2024), Section 2.2.
    """
    eye = jnp.eye(r.shape[0], dtype=r.dtype)
    s = jax.scipy.linalg.solve_triangular(r, eye, trans="T", lower=False)
    return s / jnp.linalg.norm(s, axis=0, keepdims=True)


def rank_deficient(r: jax.Array, n: int) -> jax.Array:
    """Whether AΩ = QR lost rank (A has rank < the number of probes): then QQᵀA = A exactly.

    The threshold is a rounding-level multiple of the largest |R_jj|.
    """
    d = jnp.abs(jnp.diagonal(r))
    eps = jnp.asarray(10.0 * math.sqrt(n) * float(jnp.finfo(r.dtype).eps), r.dtype)
    return jnp.any(d <= eps * jnp.max(d))


def _hutchinson(flat_op, key, m, batch_size):
    def sample(i):
        v = _probes.rademacher(key, i, flat_op.n, flat_op.dtype)
        return jnp.vdot(v, flat_op.matvec(v))

    return mean_stderr(_probes.map_probes(sample, m, batch_size))


def _hutchpp(flat_op, key, m, batch_size):
    # Meyer, Musco, Musco & Woodruff (2021), Algorithm 1: m/3 matvecs sketch the range,
    # m/3 take tr(QᵀAQ) exactly, m/3 run Hutchinson on the deflated (I − QQᵀ)A(I − QQᵀ).
    k = m // 3
    _, y = sketch(flat_op, key, k, batch_size)
    # Any Q with orthonormal columns, built from the sketch alone, keeps the estimate unbiased.
    q = orthonormal_basis(y)
    qt = q.T
    low = jnp.sum(jnp.sum(qt * apply_rows(flat_op, qt, batch_size), axis=1))

    def residual(i):
        g = _probes.rademacher(key, i, flat_op.n, flat_op.dtype)
        w = g - q @ (qt @ g)
        return jnp.vdot(w, flat_op.matvec(w))

    # Probes k..2k-1: independent of the sketch's probes 0..k-1.
    estimate, stderr = mean_stderr(_probes.map_probes(residual, k, batch_size, start=k))
    return low + estimate, stderr


def _xtrace(flat_op, key, m, batch_size):
    # Epperly, Tropp & Webber (2024), "XTrace", Section 2 and their reference code (xtrace.m):
    # every probe serves both the low-rank part and the Hutchinson part, leave-one-out.
    # Probes are Rademacher, so without the paper's "improved" (resphering) normalisation.
    s = m // 2
    om, y = sketch(flat_op, key, s, batch_size)
    q, r = jnp.linalg.qr(y.T)
    qt = q.T
    z = apply_rows(flat_op, qt, batch_size)  # rows: (A q_j)ᵀ
    h = qt @ z.T  # QᵀAQ
    tr_h = jnp.trace(h)

    def exact():
        # range(Q) ⊇ range(A): tr(QᵀAQ) = tr(A), no variance left.
        return jnp.full((s,), tr_h)

    def estimate():
        w = qt @ om.T  # columns Qᵀω_i
        t = z @ om.T  # columns (AQ)ᵀω_i
        fs = loo_factor(r)
        sw = jnp.sum(fs * w, axis=0)
        x = w - fs * sw[None, :]  # Qᵀω_i projected as by Q_(i)
        shs = jnp.sum(fs * (h @ fs), axis=0)
        residual = -jnp.sum(t * x, axis=0) + jnp.sum(x * (h @ x), axis=0) + (
            jnp.sum(fs * r, axis=0) * sw)
        return tr_h - shs + residual

    samples = jax.lax.cond(rank_deficient(r, flat_op.n), exact, estimate)
    return mean_stderr(samples)


_IMPLS = {"hutchinson": _hutchinson, "hutch++": _hutchpp, "xtrace": _xtrace}


def _trace_impl(flat_op, key, *, method, num_matvecs, batch_size):
    return _IMPLS[method](flat_op, key, num_matvecs, batch_size)


def trace(
    op: Any,
    key: jax.Array,
    *,
    num_matvecs: int,
    method: TraceMethod = "hutch++",
    batch_size: int | None = None,
    like: PyTree | None = None,
) -> TraceResult:
    """Estimates tr(A) from `num_matvecs` products with Rademacher probes.

    Methods, all unbiased:

    - ``"hutchinson"`` (Hutchinson 1989): the mean of vᵢᵀAvᵢ. `stderr` is the sample standard
      deviation over the m probes divided by √m. Error O(‖A‖_F/√m).
    - ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): m/3 probes sketch A's range Q, m/3
      matvecs give tr(QᵀAQ) exactly, m/3 probes run Hutchinson on (I − QQᵀ)A(I − QQᵀ). Error
      O(‖A‖_*/m): far better on a fast-decaying spectrum; exact when rank(A) ≤ m/3. `stderr` is
      the standard error of the Hutchinson part (the only random term given Q).
      num_matvecs divisible by 3.
    - ``"xtrace"`` (Epperly, Tropp & Webber 2024): m/2 probes, each used both for the
      low-rank part and, leave-one-out, as a Hutchinson probe of the residual; exact when
      rank(A) < m/2. `stderr` is the paper's error estimate, std(ddof=1)/√(m/2) over the m/2
      leave-one-out estimates (a heuristic: they are exchangeable, not independent). Even
      num_matvecs.

    The exactness claims hold almost surely for Gaussian probes; with Rademacher probes a
    sketch can lose rank by chance when n is tiny or A is aligned with the axes (two probes
    agreeing on A's support), which costs accuracy, never unbiasedness.

    Probe i is drawn from `jax.random.fold_in(key, i)`, so `batch_size` (how many probes the
    operator sees at once: None = all) changes memory and speed, never the result. The whole
    estimate is one jitted program, the operator's arrays passed in as arguments.

    Args:
        op: A `jhvp.HessianOperator`, another jhvp operator, or a symmetric linear callable
            v -> A v on pytrees (then pass `like`).
        key: A `jax.random` key.
        num_matvecs: The budget m of matvecs, 1 ≤ m ≤ n.
        method: "hutchinson", "hutch++" or "xtrace".
        batch_size: Probes applied at once (vmapped, under `jax.lax.map`); None: all.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; required
            for a plain callable, else defaults to `op.in_structure()`.

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
    """
    api = "trace"
    m = check_budget(num_matvecs, method, _METHODS, {"hutch++": 3, "xtrace": 2}, api)
    _probes.check_batch_size(batch_size, api)
    struct = _protocol.structure(op, like, api)
    check_dimension(m, dimension(struct), "jnp.trace(op.as_matrix())", api)
    estimate, stderr = _protocol.run(
        _trace_impl, op, struct, key, api=api, method=method, num_matvecs=m,
        batch_size=batch_size,
    )
    return TraceResult(estimate, stderr, m)
