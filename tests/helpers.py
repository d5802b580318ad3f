"""The problem zoo and the references the tests compare against."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jhvp._typing import MODES, STRATEGIES  # noqa: F401 - the one list, from the Literal types

X64 = bool(jax.config.jax_enable_x64)
DTYPE = jnp.float64 if X64 else jnp.float32
RTOL, ATOL = (1e-9, 1e-11) if X64 else (2e-4, 2e-5)


def tree_allclose(a, b, rtol=RTOL, atol=ATOL):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"structures differ: {ta} vs {tb}"
    for x, y in zip(la, lb, strict=True):
        assert np.shape(x) == np.shape(y), (np.shape(x), np.shape(y))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
    return True


# ---- agreement to rounding --------------------------------------------------------------------

EPS = float(jnp.finfo(DTYPE).eps)
# Two programs that compute the same thing in a different order (vmapped vs unbatched, chunked
# vs not, inside an outer jit vs not, a matrix as a constant vs as an argument) agree to
# rounding, not bitwise: XLA picks other kernels, blockings and summation orders for each. One
# step of an algorithm (an operator application, the length-n reductions around it) reorders
# sums of n terms, and a reordered sum moves by about √n ulps of its terms' scale (rounding
# errors add like a random walk: Higham & Mary 2019, "A new approach to probabilistic rounding
# error analysis"); these tests keep n ≤ 100, so 10 ulps a step.
ROUNDING_PER_STEP = 10


def rounding_tol(steps, amplification=1.0):
    """The relative tolerance between two orderings of `steps` sequential steps.

    `amplification` is the condition number of the compared quantity where it is not 1: how
    far a relative perturbation of the input moves it (‖A‖/gap for an eigenvector, κ(A) for
    a solve, ‖A‖/σ for a density smoothed with width σ).
    """
    return ROUNDING_PER_STEP * steps * EPS * amplification


def assert_rounding_close(actual, expected, *, steps, amplification=1.0, scale=None):
    """Each leaf of `actual` within `rounding_tol(steps, amplification) * scale` of `expected`.

    `scale` defaults to each expected leaf's largest |entry|: rounding errors are absolute at
    the scale of the largest values a result is computed from, so an entry near zero carries
    the error of the large ones and an entry-wise relative test fails there.
    """
    la, ta = jax.tree.flatten(actual)
    lb, tb = jax.tree.flatten(expected)
    assert ta == tb, f"structures differ: {ta} vs {tb}"
    tol = rounding_tol(steps, amplification)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (x.shape, y.shape)
        s = float(np.max(np.abs(y), initial=0.0)) if scale is None else float(scale)
        np.testing.assert_allclose(x, y, rtol=0, atol=tol * s,
                                   err_msg=f"{steps} steps, amplification {amplification:.3g}")
    return True


def assert_estimates_close(actual, expected, m):
    """Trace or diagonal estimates of the same m probes, computed in another order, to rounding.

    Rounding moves each probe's sample by a few ulps of the samples' scale, |estimate| + √m ×
    stderr (the mean plus the samples' spread), and the mean and the spread with it.
    """
    scale = np.abs(np.asarray(expected.estimate)).max() + np.sqrt(m) * np.abs(
        np.asarray(expected.stderr)).max()
    assert_rounding_close(actual.estimate, expected.estimate, steps=m, scale=scale)
    assert_rounding_close(actual.stderr, expected.stderr, steps=m, scale=scale)


def counting(fn):
    """fn wrapped to count its calls (so, under jit, its traces): (wrapped, list of calls)."""
    calls = []

    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    return wrapped, calls


def rand(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(key), shape, DTYPE)


def random_like(tree, seed=0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, jnp.shape(x), DTYPE) for k, x in zip(keys, leaves, strict=False)]
    )


def dense_hvp(f, primals, tangents, argnums=0):
    """The reference: the dense Hessian from jax.hessian on the flattened parameters, times v."""
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)
    diff = tuple(primals[i] for i in nums)
    flat, unravel = ravel_pytree(diff)

    def flat_f(z):
        args = list(primals)
        for i, x in zip(nums, unravel(z), strict=False):
            args[i] = x
        return f(*args)

    H = jax.hessian(flat_f)(flat)
    t_flat, _ = ravel_pytree((tangents,) if single else tuple(tangents))
    out = unravel(H @ t_flat)
    return out[0] if single else out


def fd_hvp(f, primals, tangents, eps=None):
    """Central finite differences of the gradient (argnums=0)."""
    eps = eps or (1e-5 if X64 else 1e-2)
    g = jax.grad(f)
    plus = jax.tree.map(lambda x, t: x + eps * t, primals[0], tangents)
    minus = jax.tree.map(lambda x, t: x - eps * t, primals[0], tangents)
    gp, gm = g(plus, *primals[1:]), g(minus, *primals[1:])
    return jax.tree.map(lambda a, b: (a - b) / (2 * eps), gp, gm)


# ---- problems ---------------------------------------------------------------------------------


def quadratic(n=6, seed=0):
    """f(x) = ½ xᵀAx + bᵀx with A not symmetric: H = (A + Aᵀ)/2 exactly."""
    A = rand(seed, (n, n))
    b = rand(seed + 1, (n,))

    def f(x):
        return 0.5 * x @ A @ x + b @ x

    return f, 0.5 * (A + A.T)


def sym_matrix(eigenvalues, seed=0):
    """A dense symmetric float64 (NumPy) matrix with this spectrum and random eigenvectors."""
    rng = np.random.default_rng(seed)
    n = len(eigenvalues)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (U * np.asarray(eigenvalues, np.float64)) @ U.T


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def mlp_params(sizes=(4, 8, 3), seed=0):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        params[f"layer{i}"] = {"w": rand(seed + 2 * i, (a, b), 1 / np.sqrt(a)),
                               "b": rand(seed + 2 * i + 1, (b,), 0.1)}
    return params


def mlp_loss(params, x, y):
    h = x
    n = len(params)
    for i in range(n):
        layer = params[f"layer{i}"]
        h = h @ layer["w"] + layer["b"][None, :]
        if i < n - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def mlp_problem(sizes=(4, 8, 3), batch=5, seed=0):
    params = mlp_params(sizes, seed)
    x = rand(seed + 100, (batch, sizes[0]))
    y = rand(seed + 101, (batch, sizes[-1]))
    return mlp_loss, (params, x, y)


class Linear(NamedTuple):
    w: jax.Array
    b: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Model:
    first: Linear
    scales: list
    depth: int = dataclasses.field(metadata=dict(static=True), default=2)


def model_loss(model: Model, x):
    h = jnp.tanh(x @ model.first.w + model.first.b[None, :])
    for s in model.scales[: model.depth]:
        h = jnp.sin(h * (s if s.ndim == 0 else s[None, :]))
    return jnp.sum(h**2)


def model_problem(seed=0):
    model = Model(Linear(rand(seed, (3, 4)), rand(seed + 1, (4,))),
                  [rand(seed + 2, (4,)), rand(seed + 3, ())])
    return model_loss, (model, rand(seed + 4, (5, 3)))


def two_arg(a, b):
    """Couples two differentiated arguments (one a tuple pytree) and a constant."""
    x, (y,) = a
    return jnp.sum(jnp.sin(x) * b["u"] ** 2) + jnp.sum(y**3) * jnp.sum(b["u"]) + jnp.sum(x) ** 2


def two_arg_primals(seed=0):
    return ((rand(seed, (3,)), (rand(seed + 1, (2,)),)), {"u": rand(seed + 2, (3,))})


def rademacher_probe(key, i, n, dtype):
    """Probe i of the curvature estimators for vectors of shape (n,): what they draw."""
    from jhvp import _protocol
    from jhvp.curvature import _vectors

    struct = jax.ShapeDtypeStruct((n,), dtype)
    return _vectors.rademacher(_protocol.TreeOperator(None, struct, n, jnp.dtype(dtype)), key, i)


def lanczos_state(matvec, v0, m, reortho):
    """The internal Lanczos state (`_lanczos.State`) for `matvec` on flat vectors like v0."""
    from jhvp import _protocol
    from jhvp.curvature import _lanczos

    struct = jax.ShapeDtypeStruct(v0.shape, v0.dtype)
    op = _protocol.TreeOperator(matvec, struct, v0.size, v0.dtype)
    return _lanczos.run(op, v0, m, reortho=reortho)
