"""The compile-once claim, tested directly: a counter inside f, and weak references."""

import gc
import weakref

import jax.numpy as jnp
import numpy as np
from helpers import DTYPE, rosenbrock

import jhvp
from jhvp import _jit


def counting(fn):
    calls = []

    def f(*args):
        calls.append(1)
        return fn(*args)

    return f, calls


def test_repeated_calls_do_not_trace_again():
    f, calls = counting(rosenbrock)
    x, v = jnp.ones(5, DTYPE), jnp.arange(5.0, dtype=DTYPE)
    first = jhvp.hvp(f, (x,), v)
    traces = len(calls)
    assert traces >= 1
    for _ in range(5):
        np.testing.assert_array_equal(jhvp.hvp(f, (x,), v), first)
    jhvp.hvp(f, (x + 1,), v * 2)  # new values, same shapes: no new trace
    assert len(calls) == traces


def test_new_shape_traces_once_more_and_options_are_separate_entries():
    f, calls = counting(rosenbrock)
    jhvp.hvp(f, (jnp.ones(5, DTYPE),), jnp.ones(5, DTYPE))
    n = len(calls)
    jhvp.hvp(f, (jnp.ones(6, DTYPE),), jnp.ones(6, DTYPE))
    assert len(calls) > n
    n = len(calls)
    jhvp.hvp(f, (jnp.ones(6, DTYPE),), jnp.ones(6, DTYPE))
    assert len(calls) == n
    jhvp.hvp(f, (jnp.ones(6, DTYPE),), jnp.ones(6, DTYPE), mode="rev_rev")
    assert len(calls) > n


def test_operator_and_value_grad_hvp_are_cached_too():
    f, calls = counting(rosenbrock)
    x = jnp.ones(4, DTYPE)
    jhvp.hessian_operator(f, (x,))(x)
    jhvp.value_grad_hvp(f, (x,), x)
    n = len(calls)
    op = jhvp.hessian_operator(f, (x * 2,))
    jhvp.value_grad_hvp(f, (x * 2,), x)
    op(x)
    op(x * 3)
    assert len(calls) == n


def test_cache_does_not_keep_functions_alive():
    def make():
        return lambda x: jnp.sum(jnp.sin(x) ** 2)

    f = make()
    ref = weakref.ref(f)
    jhvp.hvp(f, (jnp.ones(3, DTYPE),), jnp.ones(3, DTYPE))
    del f
    gc.collect()
    assert ref() is None


def test_fresh_lambda_per_iteration_keeps_cache_bounded():
    gc.collect()
    before = _jit.cache_size()
    x = jnp.ones(3, DTYPE)
    for k in range(30):
        jhvp.hvp(lambda x, k=k: jnp.sum(x**2) * k, (x,), x)
    gc.collect()
    assert _jit.cache_size() <= before + 1


class Model:
    def __init__(self, scale):
        self.scale = scale
        self.calls = 0

    def loss(self, x):
        self.calls += 1
        return self.scale * jnp.sum(x**3)


def test_bound_methods_are_cached_and_released():
    m = Model(2.0)
    x = jnp.arange(1.0, 4.0, dtype=DTYPE)
    hv = jhvp.hvp(m.loss, (x,), jnp.ones(3, DTYPE))
    np.testing.assert_allclose(hv, 12.0 * np.arange(1.0, 4.0), rtol=1e-6)
    n = m.calls
    jhvp.hvp(m.loss, (x,), jnp.ones(3, DTYPE))
    assert m.calls == n
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_operator_outlives_f_without_keeping_it_alive():
    for strategy in ("linearize", "recompute"):
        f = lambda x: jnp.sum(jnp.sin(x) * x)  # noqa: E731
        ref = weakref.ref(f)
        x = jnp.arange(3.0, dtype=DTYPE)
        op = jhvp.hessian_operator(f, (x,), strategy=strategy)
        del f
        gc.collect()
        assert ref() is None
        # H = diag(2cos x - x sin x), still applied after f is gone.
        expected = 2 * jnp.cos(x) - x * jnp.sin(x)
        np.testing.assert_allclose(op(jnp.ones(3, DTYPE)), expected, rtol=1e-5)
