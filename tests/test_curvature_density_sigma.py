"""SpectralDensity.sigma (the width used) and SpectralDensity.smooth (re-smoothing, no matvecs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE

from jhvp.curvature import SpectralDensity, spectral_density

KEY = jax.random.key(0)
EPS = float(jnp.finfo(DTYPE).eps)


def problem(n=40):
    ev = np.concatenate([np.linspace(0.0, 1.0, n - 2), [3.0, 5.0]])
    A = jnp.asarray(np.diag(ev), DTYPE)
    return (lambda v: A @ v), jnp.ones(n, DTYPE)


def mixture(grid, nodes, weights, sigma):
    """The float64 reference: (1/num_probes) Σ weights · N(grid; nodes, sigma²)."""
    g = np.asarray(grid, np.float64)
    x, w = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    z = (g[:, None] - x.reshape(-1)[None, :]) / sigma
    return np.exp(-0.5 * z**2) @ w.reshape(-1) / (np.sqrt(2 * np.pi) * sigma * x.shape[0])


def assert_density(out, sigma):
    # On the returned grid, each Gaussian is evaluated to a few ε of its peak: (t - x)/σ and
    # its square carry 2-4 ε relative, which moves exp(-z²/2) by at most 4ε·max z²e^(-z²/2)
    # = 1.5ε of the peak, plus exp's own ε. Weights sum to num_probes: 10ε of the peak
    # 1/(√(2π)σ) bounds the sum.
    ref = mixture(out.grid, out.nodes, out.weights, sigma)
    np.testing.assert_allclose(out.density, ref, rtol=0,
                               atol=10 * EPS / (np.sqrt(2 * np.pi) * sigma))


def test_the_width_used_is_returned():
    mv, like = problem()
    given = spectral_density(mv, KEY, num_probes=3, num_matvecs=12, sigma=0.05, like=like)
    assert isinstance(given, SpectralDensity)
    np.testing.assert_allclose(float(given.sigma), 0.05, rtol=EPS)
    assert_density(given, 0.05)
    # The default: 1% of the spread of the nodes that carry weight.
    chosen = spectral_density(mv, KEY, num_probes=3, num_matvecs=12, like=like)
    live = np.asarray(chosen.weights) > EPS
    nodes = np.asarray(chosen.nodes, np.float64)[live]
    np.testing.assert_allclose(float(chosen.sigma), 0.01 * (nodes.max() - nodes.min()),
                               rtol=4 * EPS)
    assert_density(chosen, float(chosen.sigma))


def test_smooth_resmooths_the_same_quadrature():
    mv, like = problem()
    out = spectral_density(mv, KEY, num_probes=3, num_matvecs=12, num_points=512, like=like)
    for sigma in (0.02, 0.2):
        again = out.smooth(sigma)
        np.testing.assert_array_equal(again.nodes, out.nodes)
        np.testing.assert_array_equal(again.weights, out.weights)
        np.testing.assert_allclose(float(again.sigma), sigma, rtol=EPS)
        assert again.grid.shape == out.grid.shape
        # The new grid spans 5 sigma past the extreme nodes, and the density still integrates
        # to 1 (the Gaussian mass outside is below 1e-6; the trapezoid rule on ≥ 9 points per
        # sigma is exact to far below the float32 sum's rounding).
        live = np.asarray(out.weights) > EPS
        nodes = np.asarray(out.nodes, np.float64)[live]
        np.testing.assert_allclose([again.grid[0], again.grid[-1]],
                                   [nodes.min() - 5 * sigma, nodes.max() + 5 * sigma],
                                   rtol=0, atol=10 * EPS * (nodes.max() + 5 * sigma))
        assert_density(again, sigma)
        integral = float(jnp.trapezoid(again.density, again.grid))
        np.testing.assert_allclose(integral, 1.0, atol=1e-3)
    # The same width as the run used gives the run's density back (the same formula).
    same = out.smooth(float(out.sigma))
    np.testing.assert_allclose(same.density, out.density, rtol=0,
                               atol=10 * EPS / (np.sqrt(2 * np.pi) * float(out.sigma)))


def test_smooth_on_a_given_grid_and_under_jit():
    mv, like = problem()
    out = spectral_density(mv, KEY, num_probes=2, num_matvecs=10, like=like)
    grid = jnp.linspace(-1.0, 6.0, 300, dtype=DTYPE)
    fine = out.smooth(0.1, grid=grid)
    np.testing.assert_array_equal(fine.grid, grid)
    assert_density(fine, 0.1)
    jitted = jax.jit(lambda d: d.smooth(0.1, grid=grid))(out)
    np.testing.assert_allclose(jitted.density, fine.density, rtol=0,
                               atol=10 * EPS / (np.sqrt(2 * np.pi) * 0.1))


def test_smooth_errors():
    mv, like = problem()
    out = spectral_density(mv, KEY, num_probes=1, num_matvecs=5, like=like)
    with pytest.raises(ValueError, match=r"SpectralDensity.smooth: `sigma` must be positive"):
        out.smooth(0.0)
    with pytest.raises(TypeError, match=r"SpectralDensity.smooth: `sigma` must be a positive"):
        out.smooth("wide")
    with pytest.raises(ValueError, match=r"SpectralDensity.smooth: `grid` must be a 1-D array"):
        out.smooth(0.1, grid=jnp.zeros((3, 3), DTYPE))
