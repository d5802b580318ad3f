"""jhvp.curvature.spectral_density (stochastic Lanczos quadrature) and the probes it draws."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, assert_rounding_close, mlp_problem, rademacher_probe, sym_matrix
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp.curvature import _sketch, spectral_density

KEY = jax.random.key(0)


def gaussian_mixture(grid, centres, weights, sigma):
    z = (np.asarray(grid, np.float64)[:, None] - np.asarray(centres, np.float64)[None, :]) / sigma
    return np.exp(-0.5 * z**2) @ np.asarray(weights, np.float64) / (np.sqrt(2 * np.pi) * sigma)


def test_gauss_quadrature_is_exact():
    """m = n: the nodes are A's eigenvalues; m < n: exact moments vᵀAᵖv/‖v‖² for p < 2m."""
    n = 24
    ev = np.linspace(-1.0, 1.0, n) + 0.1 * np.sin(np.arange(n))
    A = sym_matrix(ev, seed=4)
    Aj = jnp.asarray(A, DTYPE)
    like = jnp.ones(n, DTYPE)
    full = spectral_density(lambda v: Aj @ v, KEY, num_probes=3, num_matvecs=n, like=like)
    tol = 1e-9 if X64 else 2e-4
    for nodes in np.asarray(full.nodes, np.float64):
        np.testing.assert_allclose(np.sort(nodes), np.sort(ev), atol=tol * 10)
    m = 4
    part = spectral_density(lambda v: Aj @ v, KEY, num_probes=3, num_matvecs=m, like=like)
    np.testing.assert_allclose(np.sum(np.asarray(part.weights), axis=1), 1.0, atol=tol)
    for i in range(3):
        v = np.asarray(rademacher_probe(KEY, i, n, DTYPE), np.float64)
        assert set(np.unique(v)) <= {-1.0, 1.0}
        nodes, weights = (np.asarray(x[i], np.float64) for x in (part.nodes, part.weights))
        for p in range(2 * m):
            exact = v @ np.linalg.matrix_power(A, p) @ v / (v @ v)
            np.testing.assert_allclose(weights @ nodes**p, exact, atol=tol * 20)


def test_density_of_a_diagonal_matches_the_smoothed_spectrum():
    # Rademacher probes see a diagonal exactly (vᵢ² = 1), so with m = n the estimate is the
    # Gaussian-smoothed eigenvalue histogram itself.
    ev = np.concatenate([np.linspace(0.0, 1.0, 30), [3.0, 5.0]])
    A = jnp.asarray(np.diag(ev), DTYPE)
    sigma = 0.05
    out = spectral_density(lambda v: A @ v, KEY, num_probes=2, num_matvecs=ev.size, sigma=sigma,
                           num_points=2000, like=jnp.ones(ev.size, DTYPE))
    ref = gaussian_mixture(out.grid, ev, np.full(ev.size, 1.0 / ev.size), sigma)
    np.testing.assert_allclose(out.density, ref, atol=1e-6 if X64 else 1e-3)
    assert float(out.grid[0]) <= -4 * sigma and float(out.grid[-1]) >= 5.0 + 4 * sigma


def test_default_sigma_integrates_to_one_and_covers_the_spectrum():
    f, primals = mlp_problem()
    op = jhvp.hessian_operator(f, primals)
    flat, unravel = ravel_pytree(primals[0])
    w = np.linalg.eigvalsh(np.asarray(
        jax.hessian(lambda z: f(unravel(z), *primals[1:]))(flat), np.float64))
    out = spectral_density(op, KEY, num_probes=4, num_matvecs=30)
    assert out.nodes.shape == (4, 30) and out.density.shape == (1024,)
    np.testing.assert_allclose(np.sum(np.asarray(out.weights), axis=1), 1.0, atol=1e-5)
    # Ritz values lie in the spectrum's hull (Cauchy interlacing).
    slack = 1e-9 if X64 else 1e-4
    assert out.nodes.min() >= w.min() - slack and out.nodes.max() <= w.max() + slack
    integral = float(jnp.trapezoid(out.density, out.grid))
    assert abs(integral - 1.0) < 1e-3
    assert float(out.grid[0]) < w.min() and float(out.grid[-1]) > w.max()


_ON_DEVICE = types.SimpleNamespace(streamed=None)  # an operator on the device, as map_probes sees it


def test_probes_and_map_probes():
    n = 1000
    signs = np.stack([np.asarray(rademacher_probe(KEY, i, n, DTYPE)) for i in range(4)])
    assert signs.dtype == np.dtype(DTYPE) and set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) < 0.1 and not np.array_equal(signs[0], signs[1])
    assert abs(np.corrcoef(signs[0], signs[1])[0, 1]) < 0.15
    fn = lambda i: {"x": jax.random.normal(jax.random.fold_in(KEY, i), (5,), DTYPE), "i": i}
    ref = jax.vmap(fn)(jnp.arange(2, 9))
    for b in (None, 1, 3, 7, 100):
        out = _sketch.map_probes(_ON_DEVICE, fn, 7, b, start=2)
        np.testing.assert_array_equal(out["i"], np.arange(2, 9))
        assert_rounding_close(out["x"], ref["x"], steps=1)  # elementwise: one step


def test_errors():
    A = jnp.eye(6, dtype=DTYPE)
    like = jnp.ones(6, DTYPE)
    mv = lambda v: A @ v
    with pytest.raises(TypeError, match=r"spectral_density: `op` is a plain callable"):
        spectral_density(mv, KEY)
    with pytest.raises(ValueError, match=r"spectral_density: `num_matvecs` must be between 1 "
                                         r"and 6.*got 7"):
        spectral_density(mv, KEY, num_matvecs=7, like=like)
    with pytest.raises(ValueError, match=r"spectral_density: `sigma` must be positive"):
        spectral_density(mv, KEY, sigma=-1.0, like=like)
    with pytest.raises(ValueError, match=r"spectral_density: `batch_size` must be a positive"):
        spectral_density(mv, KEY, batch_size=0, like=like)
    with pytest.raises(TypeError, match=r"`batch_size` must be None or a positive int"):
        spectral_density(mv, KEY, batch_size=2.5, like=like)
    with pytest.raises(ValueError, match=r"`num_points` must be at least 2"):
        spectral_density(mv, KEY, num_points=1, like=like)
    with pytest.raises(ValueError, match=r"spectral_density: `like` does not match"):
        spectral_density(lambda v: v[:3], KEY, like=like)
