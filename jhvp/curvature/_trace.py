"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace, budgets counted in matvecs.

Every method draws Rademacher probe i from `fold_in(key, i)` and applies the operator to its
vectors in vmapped batches (matrix-matrix products), `batch_size` at a time, so the estimate
does not depend on `batch_size`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import PyTree
from . import _checks, _sketch

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


def _hutchinson(flat_op, key, m, batch_size):
    def sample(i):
        v = _sketch.rademacher(key, i, flat_op.n, flat_op.dtype)
        return jnp.vdot(v, flat_op.matvec(v))

    return _sketch.mean_stderr(_sketch.map_probes(sample, m, batch_size))


def _hutchpp(flat_op, key, m, batch_size):
    # Meyer, Musco, Musco & Woodruff (2021), Algorithm 1: m/3 matvecs sketch the range,
    # m/3 take tr(QᵀAQ) exactly, m/3 run Hutchinson on the deflated (I − QQᵀ)A(I − QQᵀ).
    k = m // 3
    _, y = _sketch.sketch(flat_op, key, k, batch_size)
    # Any Q with orthonormal columns, built from the sketch alone, keeps the estimate unbiased.
    q = _sketch.orthonormal_basis(y)
    qt = q.T
    low = jnp.sum(jnp.sum(qt * _sketch.apply_rows(flat_op, qt, batch_size), axis=1))

    def residual(i):
        g = _sketch.rademacher(key, i, flat_op.n, flat_op.dtype)
        w = g - q @ (qt @ g)
        return jnp.vdot(w, flat_op.matvec(w))

    # Probes k..2k-1: independent of the sketch's probes 0..k-1.
    estimate, stderr = _sketch.mean_stderr(_sketch.map_probes(residual, k, batch_size, start=k))
    return low + estimate, stderr


def _xtrace(flat_op, key, m, batch_size):
    # Epperly, Tropp & Webber (2024), "XTrace", Section 2 and their reference code (xtrace.m):
    # every probe serves both the low-rank part and the Hutchinson part, leave-one-out.
    # Probes are Rademacher, so without the paper's "improved" (resphering) normalisation.
    s = m // 2
    om, y = _sketch.sketch(flat_op, key, s, batch_size)
    q, r = jnp.linalg.qr(y.T)
    qt = q.T
    z = _sketch.apply_rows(flat_op, qt, batch_size)  # rows: (A q_j)ᵀ
    h = qt @ z.T  # QᵀAQ
    tr_h = jnp.trace(h)

    def exact():
        # range(Q) ⊇ range(A): tr(QᵀAQ) = tr(A), no variance left.
        return jnp.full((s,), tr_h)

    def estimate():
        w = qt @ om.T  # columns Qᵀω_i
        t = z @ om.T  # columns (AQ)ᵀω_i
        fs = _sketch.loo_factor(r)
        sw = jnp.sum(fs * w, axis=0)
        x = w - fs * sw[None, :]  # Qᵀω_i projected as by Q_(i)
        shs = jnp.sum(fs * (h @ fs), axis=0)
        residual = -jnp.sum(t * x, axis=0) + jnp.sum(x * (h @ x), axis=0) + (
            jnp.sum(fs * r, axis=0) * sw)
        return tr_h - shs + residual

    samples = jax.lax.cond(_sketch.rank_deficient(r, flat_op.n), exact, estimate)
    return _sketch.mean_stderr(samples)


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
    api = "jhvp.curvature.trace"
    m = _checks.check_budget(num_matvecs, method, _METHODS, {"hutch++": 3, "xtrace": 2}, api)
    _checks.check_batch_size(batch_size, api)
    struct = _protocol.structure(op, like, api)
    _checks.check_key(key, api)
    _checks.check_dimension(m, _protocol.size(struct), "jnp.trace(op.as_matrix())", api)
    estimate, stderr = _protocol.run(
        _trace_impl, op, struct, key, api=api, method=method, num_matvecs=m,
        batch_size=batch_size,
    )
    return TraceResult(estimate, stderr, m)
