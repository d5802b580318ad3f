"""The spectral density of a symmetric operator by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _protocol
from .._typing import Operator, PyTree
from . import _checks, _lanczos, _sketch
from . import _vectors as vec

# The default Gaussian width, as a fraction of the spread of the nodes: fine enough to resolve
# outliers a few percent of the range apart, wide enough that the bulk reads as a curve and not
# as m spikes per probe (Ghorbani et al. 2019 use a similar smoothing on a normalised spectrum).
_SIGMA_FRACTION = 0.01
# The grid extends this many sigma past the extreme nodes: the Gaussian mass left outside is
# below 1e-6, so the density integrates to 1 over the grid.
_PAD_SIGMAS = 5.0


class SpectralDensity(NamedTuple):
    """A smoothed estimate of the eigenvalue density φ(t) = (1/n) Σᵢ δ(t - λᵢ).

    Every field is float32 for a bfloat16 or float16 operator (the quadrature runs in float32),
    else the operator's dtype.
    """

    grid: jax.Array
    """(num_points,): evenly spaced points, from 5 sigma below the lowest node to 5 above."""
    density: jax.Array
    """(num_points,): the estimate on the grid; it integrates to about 1."""
    nodes: jax.Array
    """(num_probes, m): the Gauss quadrature nodes (eigenvalues of each probe's T)."""
    weights: jax.Array
    """(num_probes, m): their weights, squared first components of T's eigenvectors; each row
    sums to 1. Nodes past a breakdown (an invariant Krylov space) have weight 0."""
    sigma: jax.Array
    """(): the Gaussian width the density was smoothed with (`spectral_density`'s `sigma`, or
    the default it chose); `smooth` re-smooths the same nodes and weights with another."""

    def smooth(self, sigma: float, grid: Any = None) -> SpectralDensity:
        """Returns the density of the same nodes and weights smoothed with another width.

        No operator application: the quadrature (nodes, weights) is what the probes cost, the
        smoothing is a sum of num_probes·m Gaussians per grid point. A narrower sigma resolves
        closer eigenvalues but shows the m nodes of each probe as separate spikes once it is
        below their spacing; a wider one gives a smoother curve with blurred outliers.

        Args:
            sigma: The new Gaussian width, a positive float.
            grid: The points to evaluate the density at, a 1-D array; default None spaces
                as many points as `self.grid` from 5 sigma below the lowest node to 5 above.

        Returns:
            A `SpectralDensity` with the same `nodes` and `weights`, the new `grid`, `density`
            and `sigma`.

        Raises:
            TypeError: `sigma` is not a real number.
            ValueError: `sigma` is not positive and finite; `grid` is not 1-D.

        Examples:
            >>> import jax, jax.numpy as jnp, jhvp
            >>> A = jnp.diag(jnp.linspace(0.0, 1.0, 50))
            >>> out = jhvp.curvature.spectral_density(lambda v: A @ v, jax.random.key(0),
            ...                                       num_matvecs=20, like=jnp.ones(50))
            >>> wide = out.smooth(0.1)
            >>> integral = jnp.trapezoid(wide.density, wide.grid)
            >>> print(round(float(wide.sigma), 3), round(float(integral), 3))
            0.1 1.0
        """
        api = "jhvp.curvature.SpectralDensity.smooth"
        sigma = _checks.check_positive(sigma, "sigma", api, optional=False)
        dtype = self.nodes.dtype
        width = jnp.asarray(sigma, dtype)
        if grid is None:
            lo, hi = _support(self.nodes, self.weights)
            grid = _grid(lo, hi, width, self.grid.shape[0])
        else:
            if jnp.ndim(grid) != 1:
                raise ValueError(
                    f"{api}: `grid` must be a 1-D array of points, got shape {jnp.shape(grid)}.")
            grid = jnp.asarray(grid, dtype)
        return self._replace(grid=grid, density=_smooth(grid, self.nodes, self.weights, width),
                             sigma=width)


def _support(nodes: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The lowest and highest node with weight.

    Weight-0 nodes (past a breakdown) sit at 0 and must not stretch the grid.
    """
    live = weights > jnp.finfo(weights.dtype).eps
    return (jnp.min(jnp.where(live, nodes, jnp.inf)),
            jnp.max(jnp.where(live, nodes, -jnp.inf)))


def _grid(lo: jax.Array, hi: jax.Array, width: jax.Array, num_points: int) -> jax.Array:
    pad = jnp.asarray(_PAD_SIGMAS, width.dtype) * width
    return jnp.linspace(lo - pad, hi + pad, num_points, dtype=width.dtype)


def _smooth(grid: jax.Array, nodes: jax.Array, weights: jax.Array, width: jax.Array) -> jax.Array:
    """(1/num_probes) Σ weights · N(grid; nodes, width²): the Gaussian-smoothed quadrature."""
    dtype = width.dtype
    diff = (grid[:, None] - nodes.reshape(-1)[None, :]) / width
    norm = jnp.asarray(math.sqrt(2 * math.pi), dtype) * width
    kernel = jnp.exp(-0.5 * diff * diff) / norm
    return jnp.matmul(kernel, weights.reshape(-1)) / jnp.asarray(nodes.shape[0], dtype)


def _density_impl(op, key, *, num_probes, num_matvecs, num_points, sigma, batch_size):
    root_n = jnp.asarray(math.sqrt(op.n), op.dtype)

    def quadrature(i):
        v = vec.scale(1 / root_n, vec.rademacher(op, key, i))
        out = _lanczos.run(op, v, num_matvecs, reortho="full", fixed=True)
        m = num_matvecs
        # T is float32 for a 16-bit operator (`_lanczos.compute_dtype`): eigh has no kernel
        # below, and the nodes need more than 8 bits to be told apart.
        T = (jnp.diag(out.alphas) + jnp.diag(out.betas[: m - 1], 1)
             + jnp.diag(out.betas[: m - 1], -1))
        theta, S = jnp.linalg.eigh(T)
        return theta, S[0] ** 2

    nodes, weights = _sketch.map_probes(op, quadrature, num_probes, batch_size)
    dtype = nodes.dtype
    lo, hi = _support(nodes, weights)
    if sigma is None:
        spread = hi - lo
        # A spectrum of one point (A = cI) has no spread: fall back on its magnitude, then on 1.
        spread = jnp.where(spread > 0, spread,
                           jnp.where(jnp.abs(hi) > 0, jnp.abs(hi), jnp.ones_like(hi)))
        width = jnp.asarray(_SIGMA_FRACTION, dtype) * spread
    else:
        width = jnp.asarray(sigma, dtype)
    grid = _grid(lo, hi, width, num_points)
    return SpectralDensity(grid, _smooth(grid, nodes, weights, width), nodes, weights, width)


def spectral_density(
    op: Operator,
    key: jax.Array,
    *,
    num_probes: int = 10,
    num_matvecs: int | None = None,
    num_points: int = 1024,
    sigma: float | None = None,
    batch_size: int | None = 1,
    like: PyTree = None,
    progress: bool = False,
) -> SpectralDensity:
    """Estimates the eigenvalue density (1/n) Σᵢ δ(t - λᵢ) by stochastic Lanczos quadrature.

    For a unit probe v, m Lanczos steps give the m-point Gauss quadrature of vᵀ g(A) v: nodes θⱼ
    (eigenvalues of T) and weights τⱼ (squared first components of T's eigenvectors), exact for
    polynomials g of degree < 2m (Golub & Meurant 2010). With Rademacher probes scaled to unit
    norm, E[vᵀ g(A) v] = tr g(A) / n, so averaging over probes estimates the density; each node
    is smoothed by a Gaussian of width `sigma` (Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017;
    Ghorbani, Krishnan & Xiao 2019). Probe i is drawn from `fold_in(key, i)`. Cost: num_probes
    × m operator applications, `batch_size` probes at a time (vmapped: matrix-matrix
    products). Memory: batch_size·(m + 4) vectors, a Lanczos basis and the recurrence's
    vectors per probe in flight, when the probes run in one batch (batch_size 1, the default,
    or ≥ num_probes); between several vmapped batches XLA keeps up to one batch more,
    (batch_size + 1)·(m + 4) (measured 97 vectors for 4 probes in batches of 2, m = 32). Each
    vector has the parameters' layout, leaf by leaf: 1/d of a vector per device on d
    devices. A bfloat16 or float16 operator keeps its vectors in that dtype; the recurrence's
    scalars, T's eigenproblem and the result are float32.

    Args:
        op: A `jhvp.HessianOperator` (or any jhvp operator), or a symmetric linear callable on
            pytrees (then pass `like`).
        key: A PRNG key for the probes.
        num_probes: How many Rademacher probes.
        num_matvecs: Lanczos steps m per probe, at most n; default min(n, 80).
        num_points: The number of grid points.
        sigma: The Gaussian width; default 1% of the spread of the nodes (their range), which
            the grid (about 110 sigma wide with the default) resolves with ~9 points per sigma.
            A sigma much below the grid spacing makes the density spiky and its integral
            inexact. The result's `sigma` holds the width used; `SpectralDensity.smooth`
            re-smooths with another at no operator cost.
        batch_size: Probes run at once (vmapped), each holding its own Lanczos basis:
            default 1 (one basis alive at a time); None runs all together. It changes the
            result only by rounding.
        like: A pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v; needed for
            a plain callable `op`.

        progress: Over a `jhvp.StreamedOperator` (data streamed from the host), show a tqdm
            bar over matvecs × batches (tqdm: the `progress` extra). Ignored on the device,
            where the algorithm is one compiled program.

    Returns:
        A `SpectralDensity(grid, density, nodes, weights, sigma)`.

    Raises:
        TypeError: `op` is a plain callable and `like` is missing; `key` is not a PRNG key; a
            non-int count.
        ValueError: `num_matvecs` > n; a count below 1 (`num_points` below 2); a non-positive
            `sigma`; `like` does not match what `op` returns.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> A = jnp.diag(jnp.linspace(0.0, 1.0, 50))
        >>> out = jhvp.curvature.spectral_density(lambda v: A @ v, jax.random.key(0),
        ...                                       num_matvecs=20, like=jnp.ones(50))
        >>> out.nodes.shape, out.density.shape
        ((10, 20), (1024,))
        >>> print(round(float(jnp.trapezoid(out.density, out.grid)), 3))
        1.0
    """
    api = "jhvp.curvature.spectral_density"
    struct = _protocol.structure(op, like, api)
    _checks.check_key(key, api)
    n = _protocol.size(struct)
    num_probes = _checks.check_int(num_probes, "num_probes", api)
    if num_matvecs is None:
        num_matvecs = min(n, 80)
    num_matvecs = _checks.check_int(
        num_matvecs, "num_matvecs", api, high=n, why=f" (n = {n}, the operator's dimension)"
    )
    num_points = _checks.check_int(num_points, "num_points", api, low=2)
    sigma = _checks.check_positive(sigma, "sigma", api)
    _checks.check_batch_size(batch_size, api)
    return _protocol.run(
        _density_impl, op, struct, key, api=api, progress=progress, budget=num_probes * num_matvecs,
        num_probes=num_probes, num_matvecs=num_matvecs,
        num_points=num_points, sigma=sigma, batch_size=batch_size,
    )
