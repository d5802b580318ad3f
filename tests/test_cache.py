"""The compile-once claim, tested directly: a counter inside f, and weak references."""

import dataclasses
import gc
import threading
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, counting, rosenbrock

import jhvp
from jhvp import _cache


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
    before = _cache.cache_size()
    x = jnp.ones(3, DTYPE)
    for k in range(30):
        jhvp.hvp(lambda x, k=k: jnp.sum(x**2) * k, (x,), x)
    gc.collect()
    assert _cache.cache_size() <= before + 1


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


# ---- validation never skipped on a hit (problem 5) ---------------------------------------------


def test_options_are_validated_on_every_call_not_only_on_a_miss():
    f = lambda a, b: jnp.sum(a * b**3)  # noqa: E731
    x = jnp.ones(3, DTYPE)
    jhvp.hvp(f, (x, x), x, argnums=1)
    jhvp.hvp(f, (x, x), x, has_aux=False)
    for _ in range(2):  # the same error every time, on a warm cache
        with pytest.raises(TypeError, match="`argnums` must be an int or a tuple of ints"):
            jhvp.hvp(f, (x, x), x, argnums=1.0)
        with pytest.raises(TypeError, match="`has_aux` must be a bool"):
            jhvp.hvp(f, (x, x), x, has_aux=1)
        with pytest.raises(TypeError, match="`argnums` must be an int"):
            jhvp.hvp(f, (x, x), x, argnums=True)


def test_numpy_integer_argnums_are_normalised():
    f = lambda a, b: jnp.sum(a * b**3)  # noqa: E731
    x = jnp.arange(1.0, 4.0, dtype=DTYPE)
    expected = jhvp.hvp(f, (x, x), x, argnums=1)
    for argnums in (np.array(1), np.int64(1), (np.int32(1),)):
        if isinstance(argnums, tuple):
            (got,) = jhvp.hvp(f, (x, x), (x,), argnums=argnums)
        else:
            got = jhvp.hvp(f, (x, x), x, argnums=argnums)
        np.testing.assert_array_equal(got, expected)


# ---- concurrent first calls trace once (problem 6) ---------------------------------------------


def test_concurrent_first_calls_trace_once():
    x = jnp.arange(1.0, 6.0, dtype=DTYPE)
    single, single_calls = counting(rosenbrock)
    jhvp.hvp(single, (x,), x)
    per_compile = len(single_calls)

    for _ in range(3):
        f, calls = counting(rosenbrock)
        barrier = threading.Barrier(8)
        results, errors = [], []

        def work(f=f, barrier=barrier, results=results, errors=errors):
            barrier.wait()
            try:
                results.append(jhvp.hvp(f, (x,), x))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(calls) == per_compile
        for r in results:
            np.testing.assert_array_equal(r, results[0])


def test_many_threads_many_functions_no_errors():
    x = jnp.ones(4, DTYPE)
    errors = []

    def work(k):
        try:
            for j in range(20):
                g = lambda x, s=float(k * 100 + j): s * jnp.sum(x**3)  # noqa: E731
                np.testing.assert_allclose(jhvp.hvp(g, (x,), x), 6.0 * g.__defaults__[0] * x,
                                           rtol=1e-5)
                gc.collect() if j % 7 == 0 else None
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ---- unhashable callables are held weakly, by identity (problem 7) -----------------------------


@dataclasses.dataclass
class CallableConfig:  # a non-frozen dataclass: unhashable, and not a pytree
    scale: float

    def __call__(self, x):
        return self.scale * jnp.sum(x**3)


def test_unhashable_callables_are_not_kept_alive():
    gc.collect()
    before = _cache.cache_size()
    x = jnp.arange(1.0, 4.0, dtype=DTYPE)
    refs = []
    for k in range(10):
        f = CallableConfig(float(k))
        np.testing.assert_allclose(jhvp.hvp(f, (x,), jnp.ones(3, DTYPE)), 6.0 * k * x, rtol=1e-6)
        refs.append(weakref.ref(f))
        del f
    gc.collect()
    assert all(r() is None for r in refs)
    assert _cache.cache_size() <= before


def test_unhashable_static_data_argument_is_keyed_by_identity_and_released():
    x = jnp.arange(1.0, 4.0, dtype=DTYPE)
    f = lambda x, cfg: cfg.scale * jnp.sum(x**3)  # noqa: E731
    a, b = CallableConfig(1.0), CallableConfig(2.0)
    np.testing.assert_allclose(jhvp.hvp(f, (x, a), jnp.ones(3, DTYPE)), 6.0 * x, rtol=1e-6)
    np.testing.assert_allclose(jhvp.hvp(f, (x, b), jnp.ones(3, DTYPE)), 12.0 * x, rtol=1e-6)
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None
