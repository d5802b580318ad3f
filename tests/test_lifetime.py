"""One lifetime policy: nothing a user passes to jhvp is kept alive by jhvp, at every entry point.

Each test hands jhvp a freshly made callable (or a pytree holding one), drops its own references,
and checks with a weak reference that the object is gone after `gc.collect()`.
"""

import gc
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE

import jhvp
from jhvp import _cache, compat, curvature
from jhvp.interop import scipy_objective, to_scipy


def _assert_freed(ref):
    gc.collect()
    assert ref() is None, f"{ref} is still alive"


def _matrix_closure():
    A = jnp.diag(jnp.arange(1.0, 7.0, dtype=DTYPE))
    return lambda v: A @ v


def _loss():
    scale = jnp.asarray(1.5, DTYPE)
    return lambda w: scale * jnp.sum(jnp.sin(w) ** 2)


LIKE = jnp.zeros(6, DTYPE)
KEY = jax.random.key(0)

CURVATURE_CALLS = {
    "eigh": lambda op: curvature.eigh(op, KEY, k=1, num_matvecs=4, like=LIKE),
    "power_iteration": lambda op: curvature.power_iteration(op, KEY, max_iters=3, like=LIKE),
    "lanczos": lambda op: curvature.lanczos(op, jnp.ones(6, DTYPE), 3),
    "trace": lambda op: curvature.trace(op, KEY, num_matvecs=3, like=LIKE),
    "diagonal": lambda op: curvature.diagonal(op, KEY, num_matvecs=2, like=LIKE),
    "diagonal_exact": lambda op: curvature.diagonal_exact(op, like=LIKE),
    "spectral_density": lambda op: curvature.spectral_density(
        op, KEY, num_probes=1, num_matvecs=3, like=LIKE),
    "solve": lambda op: curvature.solve(op, jnp.ones(6, DTYPE), max_steps=3),
    "to_scipy": lambda op: to_scipy(op, like=LIKE) @ np.ones(6),
}


@pytest.mark.parametrize("name", sorted(CURVATURE_CALLS))
def test_curvature_functions_do_not_keep_a_callable_operator_alive(name):
    op = _matrix_closure()
    ref = weakref.ref(op)
    jax.block_until_ready(CURVATURE_CALLS[name](op))
    del op
    _assert_freed(ref)


def test_fresh_closure_per_step_is_released_and_the_cache_stays_bounded():
    # A training loop that builds a new operator closure every step (the report).
    b = jnp.ones(6, DTYPE)
    refs = []
    gc.collect()
    before = _cache.cache_size()
    for step in range(5):
        A = jnp.eye(6, dtype=DTYPE) * (step + 1.0)
        op = lambda v, A=A: A @ v  # noqa: E731
        refs.append(weakref.ref(op))
        curvature.solve(op, b, max_steps=2)
        del op
    gc.collect()
    assert all(r() is None for r in refs)
    assert _cache.cache_size() <= before + 1


def test_partial_f_does_not_keep_its_function_alive():
    fn = _loss()
    ref = weakref.ref(fn)
    f = jax.tree_util.Partial(lambda w, inner: inner(w), inner=fn)
    inner_ref = weakref.ref(f.func)
    w = jnp.ones(3, DTYPE)
    jhvp.hvp(f, (w,), w)
    del f, fn
    _assert_freed(ref)
    _assert_freed(inner_ref)


def test_partial_f_with_its_arrays_as_arguments_is_freed():
    def make():
        def loss(w, c):
            return jnp.sum(c * w**2)

        return loss

    loss = make()
    ref = weakref.ref(loss)
    f = jax.tree_util.Partial(loss, c=jnp.asarray(2.0, DTYPE))
    w = jnp.ones(3, DTYPE)
    np.testing.assert_allclose(jhvp.hvp(f, (w,), w), 4.0 * w)
    del f, loss
    _assert_freed(ref)


class _ScaledLoss(eqx.Module):
    weight: jax.Array
    activation: object = eqx.field(static=True)

    def __call__(self, w):
        return jnp.sum(self.activation(self.weight * w))


def test_equinox_module_f_with_a_static_field_is_freed():
    act = lambda z: z**3  # noqa: E731 - a fresh function, as a user's lambda would be
    ref = weakref.ref(act)
    f = _ScaledLoss(jnp.asarray(2.0, DTYPE), act)
    w = jnp.ones(3, DTYPE)
    np.testing.assert_allclose(jhvp.hvp(f, (w,), w), 6.0 * 8.0 * w, rtol=1e-6)
    np.testing.assert_allclose(jhvp.hvp(f, (w,), w), 6.0 * 8.0 * w, rtol=1e-6)  # cached
    del f, act
    _assert_freed(ref)


@pytest.mark.parametrize("build", ["hessian_operator", "ggn_operator", "empirical_fisher_operator"])
def test_operator_constructors_do_not_keep_their_functions_alive(build):
    w = jnp.linspace(0.1, 0.6, 6, dtype=DTYPE)
    if build == "hessian_operator":
        fn = _loss()
        op = jhvp.hessian_operator(fn, (w,))
    elif build == "ggn_operator":
        fn = _loss()  # as the model here: z = scale * sum(sin(w)^2)
        op = jhvp.ggn_operator(fn, lambda z: z**2, (w,))
    else:
        scale = jnp.asarray(2.0, DTYPE)
        fn = lambda w: scale * w**2  # noqa: E731
        op = jhvp.empirical_fisher_operator(fn, (w,))
    ref = weakref.ref(fn)
    jax.block_until_ready(op @ w)
    del fn
    _assert_freed(ref)
    jax.block_until_ready(op @ w)  # the operator outlives f


def test_scipy_objective_releases_f_with_the_objective():
    fn = _loss()
    ref = weakref.ref(fn)
    obj = scipy_objective(fn, (jnp.ones(3, DTYPE),), dtype=DTYPE)
    obj.hessp(obj.x0, np.ones(3))
    obj.fun(obj.x0)
    del obj, fn
    _assert_freed(ref)


@pytest.mark.parametrize("name", ["vjp", "jvp", "jacobian", "hessian", "hvp", "vhp"])
def test_compat_functions_do_not_keep_func_alive(name):
    fn = _loss()
    ref = weakref.ref(fn)
    x, v = jnp.ones(3, DTYPE), jnp.ones(3, DTYPE)
    if name in ("jacobian", "hessian"):
        getattr(compat, name)(fn, x)
    elif name == "jvp":
        compat.jvp(fn, x, v)
    elif name == "vjp":
        compat.vjp(fn, x, jnp.asarray(1.0, DTYPE))
    else:
        getattr(compat, name)(fn, x, v)
    del fn
    _assert_freed(ref)
