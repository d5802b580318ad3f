"""hvp, vhp and value_grad_hvp against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from helpers import (
    ATOL,
    DTYPE,
    MODES,
    RTOL,
    X64,
    dense_hvp,
    fd_hvp,
    mlp_problem,
    model_problem,
    quadratic,
    rand,
    random_like,
    rosenbrock,
    tree_allclose,
    two_arg,
    two_arg_primals,
)

import jhvp


@pytest.mark.parametrize("mode", MODES)
def test_quadratic_is_exact(mode):
    f, H = quadratic(7)
    x, v = rand(10, (7,)), rand(11, (7,))
    tree_allclose(jhvp.hvp(f, (x,), v, mode=mode), H @ v)


@pytest.mark.parametrize("mode", MODES)
def test_mlp_dict_params_against_dense_hessian(mode):
    f, primals = mlp_problem()
    v = random_like(primals[0], seed=3)
    tree_allclose(jhvp.hvp(f, primals, v, mode=mode), dense_hvp(f, primals, v))


@pytest.mark.parametrize("mode", MODES)
def test_namedtuple_dataclass_and_list_params(mode):
    f, primals = model_problem()
    v = random_like(primals[0], seed=4)
    hv = jhvp.hvp(f, primals, v, mode=mode)
    assert jax.tree.structure(hv) == jax.tree.structure(primals[0])
    tree_allclose(hv, dense_hvp(f, primals, v))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argnums", [0, 1, -1, (0,), (0, 1), (1, 0), [0, 1]])
def test_argnums_forms(mode, argnums):
    primals = two_arg_primals()
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    diff = tuple(primals[i] for i in nums)
    v = random_like(diff[0] if isinstance(argnums, int) else diff, seed=5)
    expected = dense_hvp(two_arg, primals, v, argnums if isinstance(argnums, int) else nums)
    got = jhvp.hvp(two_arg, primals, v, argnums=argnums, mode=mode)
    tree_allclose(got, expected)


def test_matches_finite_differences():
    f, primals = mlp_problem(seed=2)
    v = random_like(primals[0], seed=6)
    rtol, atol = (1e-6, 1e-8) if X64 else (5e-2, 5e-3)
    tree_allclose(jhvp.hvp(f, primals, v), fd_hvp(f, primals, v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", MODES)
def test_rosenbrock_against_scipy(mode):
    x = np.linspace(-1.2, 1.4, 50)
    v = np.cos(np.arange(50.0))
    expected = scipy.optimize.rosen_hess_prod(x, v)
    got = jhvp.hvp(rosenbrock, (jnp.asarray(x, DTYPE),), jnp.asarray(v, DTYPE), mode=mode)
    assert got.dtype == DTYPE
    rtol = 1e-12 if X64 else 1e-5
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=rtol * 1e3)


def test_vhp_equals_hvp_and_dense():
    f, primals = mlp_problem(seed=1)
    v = random_like(primals[0], seed=7)
    vh = jhvp.vhp(f, primals, v)
    tree_allclose(vh, jhvp.hvp(f, primals, v))
    tree_allclose(vh, dense_hvp(f, primals, v))


@pytest.mark.parametrize("mode", MODES)
def test_has_aux_returns_aux_unchanged(mode):
    f, primals = mlp_problem()

    def f_aux(params, x, y):
        return f(params, x, y), {"n": x.shape[0], "mean": jnp.mean(x)}

    v = random_like(primals[0], seed=8)
    hv, aux = jhvp.hvp(f_aux, primals, v, has_aux=True, mode=mode)
    tree_allclose(hv, dense_hvp(f, primals, v))
    np.testing.assert_allclose(aux["mean"], jnp.mean(primals[1]), rtol=1e-6)
    assert int(aux["n"]) == primals[1].shape[0]


def test_value_grad_hvp():
    f, primals = mlp_problem(seed=3)
    v = random_like(primals[0], seed=9)
    value, grad, hv = jhvp.value_grad_hvp(f, primals, v)
    tree_allclose(value, f(*primals))
    tree_allclose(grad, jax.grad(f)(*primals))
    tree_allclose(hv, dense_hvp(f, primals, v))


def test_value_grad_hvp_with_aux_and_tuple_argnums():
    primals = two_arg_primals(seed=2)
    v = random_like(primals, seed=10)

    def f_aux(a, b):
        return two_arg(a, b), {"u_sum": jnp.sum(b["u"])}

    (value, aux), grad, hv = jhvp.value_grad_hvp(f_aux, primals, v, argnums=(0, 1), has_aux=True)
    tree_allclose(aux, {"u_sum": jnp.sum(primals[1]["u"])})
    tree_allclose(value, two_arg(*primals))
    tree_allclose(grad, jax.grad(two_arg, argnums=(0, 1))(*primals))
    tree_allclose(hv, dense_hvp(two_arg, primals, v, (0, 1)))


def test_python_and_numpy_inputs():
    f, H = quadratic(4)
    x = np.arange(4.0)
    v = [1.0, 0.0, 0.0, 0.0]
    got = jhvp.hvp(f, [jnp.asarray(x, DTYPE)], jnp.asarray(v, DTYPE))
    tree_allclose(got, H[:, 0])
    # A numpy tangent of another float width is cast to the primal's dtype.
    got = jhvp.hvp(f, (jnp.asarray(x, DTYPE),), np.asarray(v, np.float32))
    assert got.dtype == DTYPE


def test_nan_and_inf_propagate():
    # Rosenbrock's Hessian is tridiagonal: a NaN at x[3] reaches rows 2, 3, 4 of H·v, no others.
    x = jnp.array([0.5, -0.3, 1.2, jnp.nan, 0.7, 0.1], DTYPE)
    v = jnp.array([1.0, 2.0, -1.0, 0.5, 1.5, -2.0], DTYPE)
    hv = np.asarray(jhvp.hvp(rosenbrock, (x,), v))
    np.testing.assert_array_equal(np.isnan(hv), [False, False, True, True, True, False])
    clean = np.where(np.isnan(np.asarray(x)), 0.0, np.asarray(x, np.float64))
    expected = scipy.optimize.rosen_hess_prod(clean, np.asarray(v, np.float64))
    np.testing.assert_allclose(hv[[0, 1, 5]], expected[[0, 1, 5]], rtol=RTOL, atol=ATOL)
    hv = jhvp.hvp(lambda x: jnp.sum(x**2), (jnp.array([jnp.inf, 1.0], DTYPE),),
                  jnp.array([jnp.inf, 1.0], DTYPE))
    assert np.isinf(np.asarray(hv[0])) and hv[1] == 2.0


def test_float64_when_enabled():
    x = jnp.asarray([0.3, -0.2, 0.9], DTYPE)
    v = jnp.asarray([1.0, -1.0, 0.5], DTYPE)
    hv = jhvp.hvp(rosenbrock, (x,), v)
    assert hv.dtype == (jnp.float64 if X64 else jnp.float32)
    expected = scipy.optimize.rosen_hess_prod(np.asarray(x, np.float64), np.asarray(v, np.float64))
    # float64 agrees with SciPy to rounding; float32 to its own precision.
    np.testing.assert_allclose(hv, expected, rtol=1e-12 if X64 else 1e-5, atol=1e-12 if X64 else 1e-4)
