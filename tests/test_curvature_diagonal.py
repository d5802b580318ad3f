"""jhvp.curvature.diagonal and diagonal_exact against dense Hessian diagonals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    DTYPE,
    RTOL,
    X64,
    mlp_problem,
    rademacher_probe,
    rosenbrock,
    sym_matrix,
    tree_allclose,
)
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp import curvature

TIGHT = 1e-10 if X64 else 2e-5


def matrix(eigenvalues, seed=0):
    return jnp.asarray(sym_matrix(eigenvalues, seed), DTYPE)


def as_op(a):
    return lambda v: a @ v


def dense_diagonal(f, params, *args):
    """diag(jax.hessian) of f over the flattened params, unravelled to the params' structure."""
    flat, unravel = ravel_pytree(params)
    h = jax.jit(jax.hessian(lambda z: f(unravel(z), *args)))(flat)
    return unravel(jnp.diagonal(h))


def many_keys(a, method, m, num_keys):
    keys = jax.random.split(jax.random.key(11), num_keys)
    n = a.shape[0]
    run = jax.jit(jax.vmap(lambda k: curvature.diagonal(as_op(a), k, num_matvecs=m, method=method,
                                                        like=jnp.zeros(n, DTYPE))[:2]))
    est, se = run(keys)
    return np.asarray(est, np.float64), np.asarray(se, np.float64)


def test_exact_matches_dense_hessian_diagonal_with_dict_params():
    f, (params, x, y) = mlp_problem()
    op = jhvp.hessian_operator(f, (params, x, y))
    result = curvature.diagonal_exact(op, batch_size=7)
    tree_allclose(result.estimate, dense_diagonal(f, params, x, y), rtol=RTOL, atol=1e-5)
    tree_allclose(result.stderr, jax.tree.map(jnp.zeros_like, params), rtol=0, atol=0)
    assert result.num_matvecs == op.shape[0] == 67


def test_exact_rosenbrock():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, 25), DTYPE)
    result = curvature.diagonal_exact(jhvp.hessian_operator(rosenbrock, (x,)), batch_size=4)
    np.testing.assert_allclose(result.estimate, jnp.diagonal(jax.hessian(rosenbrock)(x)),
                               rtol=RTOL)


@pytest.mark.parametrize(("method", "m"), [("hutchinson", 8), ("xdiag", 8)])
def test_unbiased_and_stderr_plausible(method, m):
    a = matrix(1.0 / (1.0 + np.arange(20.0)), seed=1)
    exact = np.diagonal(np.asarray(a, np.float64))
    est, se = many_keys(a, method, m, 200)
    spread = est.std(axis=0, ddof=1)
    assert np.all(np.abs(est.mean(axis=0) - exact) <= 4.5 * spread / np.sqrt(200))
    ratio = np.median(se, axis=0) / spread
    low, high = (0.6, 1.6) if method == "hutchinson" else (0.3, 3.0)
    assert np.all((low <= ratio) & (ratio <= high)), ratio


def test_xdiag_beats_hutchinson_on_decaying_spectrum():
    a = matrix(0.5 ** np.arange(40.0), seed=2)
    exact = np.diagonal(np.asarray(a, np.float64))
    errors = {m: np.median(np.abs(many_keys(a, m, 16, 64)[0] - exact))
              for m in ("hutchinson", "xdiag")}
    assert errors["xdiag"] < errors["hutchinson"] / 2, errors


def test_xdiag_exact_on_low_rank():
    # rank 3 < 10/2 − 1 (the jackknife stderr's m/2 − 1 probes capture the range too), indefinite
    a = matrix(np.r_[3.0, -1.0, 0.5, np.zeros(27)], seed=3)
    result = curvature.diagonal(as_op(a), jax.random.key(0), num_matvecs=10, method="xdiag",
                                like=jnp.zeros(30, DTYPE))
    np.testing.assert_allclose(result.estimate, np.diagonal(np.asarray(a)),
                               atol=1e-10 if X64 else 1e-5)
    np.testing.assert_allclose(result.stderr, np.zeros(30), atol=1e-10 if X64 else 1e-5)


def test_hutchinson_exact_on_diagonal_matrix_and_one_probe_is_sophia():
    d = jnp.linspace(-1.0, 2.0, 9, dtype=DTYPE)
    result = curvature.diagonal(lambda v: d * v, jax.random.key(0), num_matvecs=3,
                                like=jnp.zeros(9, DTYPE))
    np.testing.assert_allclose(result.estimate, d, rtol=TIGHT)
    # One matvec: v ⊙ Hv with v = probe 0 (Sophia-H's estimate); its stderr is not estimable.
    x = jnp.linspace(0.5, 1.5, 9, dtype=DTYPE)
    h = np.asarray(jax.hessian(rosenbrock)(x), np.float64)
    one = curvature.diagonal(jhvp.hessian_operator(rosenbrock, (x,)), jax.random.key(4),
                             num_matvecs=1)
    v = np.asarray(rademacher_probe(jax.random.key(4), 0, 9, DTYPE), np.float64)
    np.testing.assert_allclose(one.estimate, v * (h @ v), rtol=RTOL, atol=1e-4)
    assert np.all(np.isnan(np.asarray(one.stderr)))


# ---- errors -------------------------------------------------------------------------------------


def call(**kw):
    args = dict(num_matvecs=2, like=jnp.zeros(6, DTYPE)) | kw
    return curvature.diagonal(lambda v: 2 * v, jax.random.key(0), **args)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(num_matvecs=7), ValueError, r"curvature\.diagonal: `num_matvecs` \(7\) exceeds .* n = 6.*diagonal_exact"),
        (dict(num_matvecs=0), ValueError, r"curvature\.diagonal: `num_matvecs` must be at least 1"),
        (dict(num_matvecs=None), TypeError, r"curvature\.diagonal: `num_matvecs` must be an int"),
        (dict(num_matvecs=3, method="xdiag"), ValueError, r"'xdiag' needs `num_matvecs` divisible by 2"),
        (dict(method="bekas"), ValueError, r"curvature\.diagonal: unknown method 'bekas'.*'xdiag'"),
        (dict(batch_size=-1), ValueError, r"curvature\.diagonal: `batch_size` must be a positive"),
        (dict(like=None), TypeError, r"curvature\.diagonal: `op` is a plain callable; pass `like=`"),
        (dict(like={"a": jnp.zeros(6, jnp.int32)}), TypeError, r"curvature\.diagonal: .*real floating"),
    ],
)
def test_errors(kw, error, match):
    with pytest.raises(error, match=match):
        call(**kw)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(batch_size=0), ValueError, r"curvature\.diagonal_exact: `batch_size` must be a positive"),
        (dict(batch_size="4"), TypeError, r"curvature\.diagonal_exact: `batch_size` must be None"),
        (dict(like=None), TypeError, r"curvature\.diagonal_exact: `op` is a plain callable"),
        (dict(like=jnp.zeros((2, 3), DTYPE)), ValueError, r"curvature\.diagonal_exact: `like` does not match"),
    ],
)
def test_exact_errors(kw, error, match):
    a = jnp.eye(6, dtype=DTYPE)
    args = dict(like=jnp.zeros(6, DTYPE)) | kw
    with pytest.raises(error, match=match):
        curvature.diagonal_exact(lambda v: a @ v, **args)
