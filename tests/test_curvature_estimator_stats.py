"""Statistics of the stochastic estimators over many keys: unbiased, with honest error bars.

Every estimate here is a random variable; each test draws it for KEYS fixed keys in one jitted,
vmapped program and checks what holds over the draws:

- unbiased: the mean over keys lies within 3 of its standard errors (std over keys / √KEYS) of
  the truth (about 4 per entry of a diagonal: the same false-alarm rate for the whole vector),
  plus the rounding of the dtype. KEYS = 400 resolves a bias of 0.15 of the spread of one
  estimate.
- honest: the reported stderr matches the actual error, |estimate − truth| > 2·stderr in at
  most 10% of keys (of entries and keys, for a diagonal), with the stderr not an empty bound
  (its root mean square at most 3x the actual spread).

Also: 16-bit operators (vectors in their dtype, small dense maths in float32) against a float64
reference, and XTrace and XDiag under `jax.vmap` in a subprocess with a timeout.
"""

import functools
import os
import subprocess
import sys
import textwrap
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, rademacher_probe

from jhvp import curvature

KEYS = 400
EPS = float(jnp.finfo(DTYPE).eps)


def symmetric(eigenvalues, seed):
    lam = np.asarray(eigenvalues, np.float64)
    u, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(lam.size, lam.size)))
    return (u * lam) @ u.T


def low_rank_plus_noise(n=60, seed=2):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, 5)))
    g = rng.normal(size=(n, n))
    return (u * [10.0, 8.0, 6.0, 4.0, 2.0]) @ u.T + 0.3 * (g + g.T) / np.sqrt(2 * n)


MATRICES = {
    # The example: Rademacher probes often agree on a 3-coordinate support.
    "axis": np.diag(np.r_[1.0, 2.0, 3.0, np.zeros(27)]),
    "dense": symmetric(np.linspace(-1.0, 3.0, 40), seed=1),
    "low_rank_plus_noise": low_rank_plus_noise(),
    # A network-like fast-decaying spectrum.
    "decaying": symmetric(0.5 ** np.arange(40.0), seed=5),
}
TRACE = ("hutchinson", "hutch++", "xtrace")
DIAGONAL = ("hutchinson", "xdiag")


@functools.cache
def draws(kind, method, matrix, m):
    """Estimates and stderrs (float64 numpy) over KEYS keys, and the truth."""
    a = MATRICES[matrix]
    n = a.shape[0]
    dense = jnp.asarray(a, DTYPE)
    fn = curvature.trace if kind == "trace" else curvature.diagonal
    run = jax.jit(jax.vmap(lambda k: fn(lambda v: dense @ v, k, num_matvecs=m, method=method,
                                        like=jnp.zeros(n, DTYPE))[:2]))
    est, se = run(jax.random.split(jax.random.key(20240615), KEYS))
    truth = np.trace(a) if kind == "trace" else np.diagonal(a)
    return np.asarray(est, np.float64), np.asarray(se, np.float64), truth


def rounding(a):
    """What rounding alone can move an estimate by: a few ulps of A's scale, per step of n."""
    return 10.0 * a.shape[0] * EPS * np.abs(a).max()


def assert_unbiased(kind, method, matrix, m):
    est, _, truth = draws(kind, method, matrix, m)
    sem = est.std(axis=0, ddof=1) / np.sqrt(KEYS)
    bias = est.mean(axis=0) - truth
    # 3 standard errors for a scalar; for n entries, the same 0.27% chance of a false alarm for
    # the whole diagonal (Bonferroni): about 4 standard errors per entry for n = 30 to 60.
    z = NormalDist().inv_cdf(1.0 - 0.0027 / (2 * np.size(truth)))
    tol = z * sem + rounding(MATRICES[matrix])
    worst = int(np.argmax(np.abs(bias) / tol))
    assert np.all(np.abs(bias) <= tol), (
        f"{method} on {matrix}: mean over {KEYS} keys {np.ravel(est.mean(axis=0))[worst]:.6g} "
        f"± {np.ravel(sem)[worst]:.2g} against {np.ravel(truth)[worst]:.6g} (entry {worst}): "
        f"{np.ravel(np.abs(bias) / np.maximum(sem, 1e-300))[worst]:.1f} standard errors")


def assert_honest(kind, method, matrix, m, *, conservative=3.0):
    est, se, truth = draws(kind, method, matrix, m)
    err = np.abs(est - truth)
    beyond = np.mean(err > 2.0 * se + rounding(MATRICES[matrix]))
    spread = est.std(axis=0)
    ratio = np.sqrt(np.mean(np.square(se), axis=0)) / spread
    assert beyond <= 0.10, (
        f"{method} on {matrix}: |estimate − truth| > 2 stderr in {beyond:.1%} of keys; "
        f"rms stderr / spread = {np.median(ratio):.2f}")
    assert np.median(ratio) <= conservative, (
        f"{method} on {matrix}: rms stderr is {np.median(ratio):.2f}x the actual spread")


# ---- unbiased --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "method"), [("trace", "xtrace"), ("trace", "hutch++"),
                                              ("diagonal", "xdiag")])
def test_unbiased_when_probes_agree_on_the_support(kind, method):
    # The example, 6 matvecs: the sketch is often singular on the support; XTrace
    # averaged 6.52 ± 0.03 and XDiag [1.23, 2.24, 3.17] when that was taken as exact.
    assert_unbiased(kind, method, "axis", 6)


@pytest.mark.parametrize("matrix", ["dense", "low_rank_plus_noise", "decaying"])
@pytest.mark.parametrize(("kind", "method"), [("trace", m) for m in TRACE]
                         + [("diagonal", m) for m in DIAGONAL])
def test_unbiased(kind, method, matrix):
    assert_unbiased(kind, method, matrix, 30)


# ---- honest error bars -----------------------------------------------------------------------


@pytest.mark.parametrize("matrix", ["dense", "low_rank_plus_noise"])
@pytest.mark.parametrize(("kind", "method"), [("trace", m) for m in TRACE]
                         + [("diagonal", m) for m in DIAGONAL])
def test_stderr_matches_the_actual_error(kind, method, matrix):
    # 13-30 samples, so that the stderr of each draw is itself well estimated (with 10, a
    # t-distribution with 9 degrees of freedom alone puts 7.6% of normal errors beyond 2).
    assert_honest(kind, method, matrix, 39 if method == "hutch++" else 30)


@pytest.mark.parametrize(("kind", "method"), [("trace", "xtrace"), ("diagonal", "xdiag")])
def test_stderr_honest_on_fast_decaying_spectrum(kind, method):
    # Where a rank threshold once declared the sketch exact (stderr 0) while it was not.
    # The jackknife is at its most conservative here (one probe fewer costs the most).
    est, se, _ = draws(kind, method, "decaying", 16)
    assert np.all(se > 0)
    assert_honest(kind, method, "decaying", 16, conservative=8.0)


def test_stderr_vanishes_where_xtrace_is_exact():
    # Rank 3 < 30/2 − 1: every leave-one-out and leave-two-out sketch spans range(A), so the
    # estimate and the jackknife are exact to rounding.
    a = symmetric(np.r_[3.0, -1.0, 0.5, np.zeros(37)], seed=3)
    dense = jnp.asarray(a, DTYPE)
    for kind in ("trace", "diagonal"):
        fn = curvature.trace if kind == "trace" else curvature.diagonal
        method = "xtrace" if kind == "trace" else "xdiag"
        result = fn(lambda v: dense @ v, jax.random.key(0), num_matvecs=30, method=method,
                    like=jnp.zeros(40, DTYPE))
        truth = np.trace(a) if kind == "trace" else np.diagonal(a)
        np.testing.assert_allclose(result.estimate, truth, rtol=0, atol=rounding(a))
        assert np.all(np.asarray(result.stderr) <= rounding(a))


# ---- 16-bit operators ------------------------------------------------------------------------


def low_precision_problem(dtype, n=32):
    """A rank-3 PSD matrix stored in `dtype`, and its float64 value."""
    a = symmetric(np.r_[3.0, 2.0, 1.0, np.zeros(n - 3)], seed=7)
    low = jnp.asarray(a, dtype)
    return low, np.asarray(low.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("kind", "method"), [("trace", m) for m in TRACE]
                         + [("diagonal", m) for m in DIAGONAL])
def test_16_bit_operators(kind, method, dtype):
    low, ref = low_precision_problem(dtype)
    n = ref.shape[0]
    eps = float(jnp.finfo(dtype).eps)
    fn = curvature.trace if kind == "trace" else curvature.diagonal
    result = fn(lambda v: low @ v, jax.random.key(1), num_matvecs=12, method=method,
                like=jnp.zeros(n, dtype))
    assert jnp.asarray(result.estimate).dtype == dtype
    assert jnp.asarray(result.stderr).dtype == dtype
    estimate = np.asarray(jnp.asarray(result.estimate).astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(np.asarray(jnp.asarray(result.stderr).astype(jnp.float32))))
    if method == "hutchinson":
        # The same probes in float64: each entry of Av is rounded to eps/2 of itself, so a
        # product v ⊙ Av moves by at most eps/2 · |Av|, a sum vᵀAv by eps/2 · ‖Av‖₁.

        probes = np.stack([np.asarray(rademacher_probe(jax.random.key(1), i, n, jnp.float32),
                                      np.float64) for i in range(12)])
        products = probes * (probes @ ref)
        expect = products.sum(axis=1).mean() if kind == "trace" else products.mean(axis=0)
        bound = np.abs(probes @ ref).sum(axis=1).max() if kind == "trace" else np.abs(
            probes @ ref).max()
        np.testing.assert_allclose(estimate, expect, rtol=0, atol=eps * bound)
    else:
        # Rank 3 < 12/3 and < 12/2: exact up to the rounding of the sketch, the basis and the
        # products, each eps/2 of ‖A‖ per entry; the stored matrix's own rounding (rank n,
        # eps/2 of each entry) is left to the Hutchinson part.
        truth = np.trace(ref) if kind == "trace" else np.diagonal(ref)
        scale = np.abs(np.linalg.eigvalsh(ref)).sum() if kind == "trace" else np.abs(ref).max()
        np.testing.assert_allclose(estimate, truth, rtol=0, atol=8.0 * eps * scale)


# ---- XTrace under vmap -----------------------------------------------------------------------

VMAP = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jhvp import curvature

    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    a = np.random.default_rng(0).normal(size=(60, 60))
    a = jnp.asarray(a + a.T, dtype)
    for fn, method in ((curvature.trace, "xtrace"), (curvature.diagonal, "xdiag")):
        for m, num in ((6, 8), (30, 400)):
            run = jax.jit(jax.vmap(lambda k: fn(lambda v: a @ v, k, num_matvecs=m, method=method,
                                                like=jnp.zeros(60, dtype))[:2]))
            for call in range(3):
                est, se = run(jax.random.split(jax.random.key(call), num))
                assert np.all(np.isfinite(np.asarray(se)))
    print("VMAP-OK")
    """
)


@pytest.mark.slow
def test_xtrace_and_xdiag_under_vmap_in_a_subprocess():
    # jaxlib splits a batched LAPACK call over XLA's CPU threads and blocks one until its parts
    # finish: two independent ones in a program (a QR and a triangular solve, as XTrace and
    # XDiag had; a QR's Q and an SVD of its R) deadlocked on 2 cores. Now one small SVD each
    # (of the s × s R of a Gram-Schmidt on the sketch). The timeout keeps a hang from blocking
    # the suite.
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_ENABLE_X64"] = "1" if X64 else "0"
    out = subprocess.run([sys.executable, "-c", VMAP], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "VMAP-OK" in out.stdout
