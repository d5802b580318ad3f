"""Bridges: to_scipy, scipy_objective, to_lineax against dense, SciPy and NumPy references."""

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so
import scipy.sparse.linalg as sla
from helpers import ATOL, DTYPE, RTOL, X64, mlp_problem, quadratic, rand, rosenbrock
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp import interop
from jhvp.interop import scipy_objective, to_lineax, to_scipy

lx = pytest.importorskip("lineax")


def dense_hessian(f, primals):
    """The reference: jax.hessian on the ravelled first argument, ravel_pytree order."""
    flat, unravel = ravel_pytree(primals[0])
    return np.asarray(jax.hessian(lambda z: f(unravel(z), *primals[1:]))(flat), np.float64)


def scaled_close(got, want, rtol=RTOL):
    """Float32 noise scales with the largest entry, so compare relative to it."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)) + ATOL)


# ---- to_scipy ---------------------------------------------------------------------------------


def test_to_scipy_columns_are_the_dense_hessian():
    f, primals = mlp_problem()
    A = to_scipy(jhvp.hessian_operator(f, primals))
    H = dense_hessian(f, primals)
    n = H.shape[0]
    assert A.shape == (n, n) and A.dtype == np.float64
    cols = np.stack([A @ e for e in np.eye(n)], axis=1)
    assert cols.dtype == np.float64 and cols.flags.writeable
    scaled_close(cols, H)
    v = np.linspace(-1.0, 1.0, n)
    np.testing.assert_array_equal(A.rmatvec(v), A.matvec(v))  # symmetric
    np.testing.assert_array_equal(A.H @ v, A @ v)
    assert A.matvec(v[:, None]).shape == (n, 1)


def test_to_scipy_matmat_equals_matvec_per_column():
    f, primals = mlp_problem()
    A = to_scipy(jhvp.hessian_operator(f, primals))
    X = np.random.default_rng(0).standard_normal((A.shape[0], 4))
    Y = A.matmat(X)
    assert Y.shape == X.shape and Y.dtype == np.float64
    for j in range(X.shape[1]):
        scaled_close(Y[:, j], A.matvec(X[:, j]))
    np.testing.assert_array_equal(A.rmatmat(X), Y)
    np.testing.assert_array_equal(A @ X, Y)


def test_eigsh_matches_dense_eigh():
    f, primals = mlp_problem()
    A = to_scipy(jhvp.hessian_operator(f, primals))
    got = np.sort(sla.eigsh(A, k=3, tol=0 if X64 else 1e-6)[0])  # largest magnitude
    evals = np.linalg.eigh(dense_hessian(f, primals))[0]
    want = np.sort(evals[np.argsort(np.abs(evals))[-3:]])
    np.testing.assert_allclose(got, want, rtol=1e-8 if X64 else 1e-3)


def test_to_scipy_plain_callable_with_like():
    _, H = quadratic(n=5)
    like = {"a": jnp.zeros(2, DTYPE), "b": jax.ShapeDtypeStruct((3,), DTYPE)}

    def op(v):  # H acting on the concatenation of v["a"] and v["b"]
        y = H @ jnp.concatenate([v["a"], v["b"]])
        return {"a": y[:2], "b": y[2:]}

    A = to_scipy(op, like=like)
    assert A.shape == (5, 5)
    scaled_close(A.matmat(np.eye(5)), H)
    scaled_close(A @ np.ones(5), H @ jnp.ones(5, DTYPE))


def test_to_scipy_like_overrides_in_structure():
    f, H = quadratic(n=4)
    op = jhvp.hessian_operator(f, (jnp.zeros(4, DTYPE),))
    A = to_scipy(op, like=jax.ShapeDtypeStruct((4,), DTYPE))
    scaled_close(A.matmat(np.eye(4)), H)


@pytest.mark.parametrize("convert", [to_scipy, to_lineax])
def test_plain_callable_without_like_raises(convert):
    with pytest.raises(TypeError, match=rf"jhvp\.{convert.__name__}: .*plain callable.*pass `like=`"):
        convert(lambda v: v)


def test_like_with_integer_dtype_raises():
    with pytest.raises(TypeError, match="float"):
        to_scipy(lambda v: v, like=jnp.zeros(3, jnp.int32))


def complex_close(got, want, rtol=RTOL):
    """As scaled_close, for complex results: dtype and values, both parts."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)) + ATOL)


def _scipy_pd():
    """to_scipy of a positive-definite quadratic's Hessian, and the float64 matrix."""
    f, H, _ = _pd_quadratic()
    return to_scipy(jhvp.hessian_operator(f, (jnp.zeros(6, DTYPE),))), H


def test_to_scipy_complex_vectors_match_aslinearoperator():
    S, H = _scipy_pd()
    R = sla.aslinearoperator(H)  # SciPy's own operator of the same real matrix
    assert S.dtype == R.dtype == np.float64  # the declared dtype stays float64, as SciPy's
    rng = np.random.default_rng(2)
    x = rng.standard_normal(6) + 1j * rng.standard_normal(6)
    X = rng.standard_normal((6, 3)) + 1j * rng.standard_normal((6, 3))
    complex_close(S.matvec(x), R.matvec(x))
    complex_close(S.rmatvec(x), R.rmatvec(x))
    complex_close(S @ x, R @ x)
    complex_close(S.H @ x, R.H @ x)
    complex_close(S.matvec(x[:, None]), R.matvec(x[:, None]))  # an (n, 1) column
    complex_close(S.matvec(x.astype(np.complex64)), R.matvec(x.astype(np.complex64)))
    complex_close(S.matmat(X), R.matmat(X))
    complex_close(S.rmatmat(X), R.rmatmat(X))
    complex_close(S @ X, R @ X)
    complex_close(S.matmat(X.real), R.matmat(X.real))  # real blocks stay float64
    assert S.matvec(x.real).dtype == np.float64


def test_to_scipy_complex_is_one_compiled_call(monkeypatch):
    S, H = _scipy_pd()
    calls = []
    run = interop._protocol.run

    def counting_run(impl, *args, **kwargs):
        calls.append(impl)
        return run(impl, *args, **kwargs)

    monkeypatch.setattr(interop._protocol, "run", counting_run)
    S.matvec(np.ones(6) + 1j * np.arange(6))
    assert len(calls) == 1  # real and imaginary parts as two columns of one program
    S.matmat(np.ones((6, 4)) * (1 + 2j))
    assert len(calls) == 2


def test_gmres_with_complex_right_hand_side():
    S, H = _scipy_pd()
    b = np.linspace(-1.0, 2.0, 6) + 1j * np.cos(np.arange(6))
    tol = 1e-10 if X64 else 1e-6
    x, info = sla.gmres(S, b, rtol=tol, atol=0.0)
    assert info == 0 and x.dtype == np.complex128
    want = np.linalg.solve(H, b)
    complex_close(x, want, rtol=1e-8 if X64 else 1e-4)
    ref, ref_info = sla.gmres(sla.aslinearoperator(H), b, rtol=tol, atol=0.0)
    assert ref_info == 0
    complex_close(x, ref, rtol=1e-8 if X64 else 1e-4)


# ---- scipy_objective --------------------------------------------------------------------------


def objective(f, primals, **kwargs):
    """scipy_objective of DTYPE primals: in float32 mode, expect its one PrecisionWarning."""
    if X64:
        return scipy_objective(f, primals, **kwargs)
    with pytest.warns(interop.PrecisionWarning, match="float32"):
        return scipy_objective(f, primals, **kwargs)


def _rosen_start(n=100):
    return jnp.asarray(1.0 + 0.3 * np.sin(np.arange(n)), DTYPE)


@pytest.mark.parametrize("method", ["trust-krylov", "trust-ncg"])
def test_minimize_rosenbrock_100(method):
    obj = objective(rosenbrock, (_rosen_start(),))
    assert obj.x0.dtype == np.float64 and obj.x0.shape == (100,)
    res = so.minimize(obj.fun, obj.x0, jac=obj.jac, hessp=obj.hessp, method=method,
                      options={"gtol": 1e-8 if X64 else 1e-3})
    np.testing.assert_allclose(res.x, np.ones(100), atol=1e-6 if X64 else 1e-3)
    if X64:
        assert res.success, res.message


def test_fun_jac_hessp_equal_scipy_rosen_references():
    obj = objective(rosenbrock, (_rosen_start(),))
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.uniform(0.0, 2.0, 100)
        p = rng.standard_normal(100)
        if not X64:  # compare at the point the float32 loss actually sees
            x = x.astype(np.float32).astype(np.float64)
            p = p.astype(np.float32).astype(np.float64)
        assert isinstance(obj.fun(x), float)
        np.testing.assert_allclose(obj.fun(x), so.rosen(x), rtol=RTOL)
        jac, hp = obj.jac(x), obj.hessp(x, p)
        assert jac.dtype == hp.dtype == np.float64
        scaled_close(jac, so.rosen_der(x))
        scaled_close(hp, so.rosen_hess_prod(x, p))


def test_fun_and_jac_at_one_point_evaluate_once():
    calls = []

    def f(x):
        jax.debug.callback(lambda: calls.append(1))
        return rosenbrock(x)

    obj = objective(f, (_rosen_start(10),))
    x = obj.x0.copy()
    obj.fun(x)
    obj.jac(x)
    obj.fun(x.copy())
    assert len(calls) == 1
    obj.jac(x + 1.0)
    assert len(calls) == 2
    jac = obj.jac(x + 1.0)
    jac[:] = 0.0  # the caller may write to what it gets; the memo must not change
    assert np.any(obj.jac(x + 1.0) != 0.0)


def _logistic_data(n=200, d=5):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, d))
    y = (X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
    return X, y


def _logistic_reference(X, y, lam):
    """NumPy loss and gradient, minimised by SciPy's BFGS: independent of JAX."""

    def loss(z):
        w, b = z[:-1], z[-1]
        t = X @ w + b
        return np.mean(np.logaddexp(0.0, t) - y * t) + 0.5 * lam * w @ w

    def grad(z):
        w, b = z[:-1], z[-1]
        r = 1.0 / (1.0 + np.exp(-(X @ w + b))) - y
        return np.concatenate([X.T @ r / len(y) + lam * w, [np.mean(r)]])

    return so.minimize(loss, np.zeros(X.shape[1] + 1), jac=grad, method="BFGS",
                       options={"gtol": 1e-12}).x


def _logistic_loss(params, X, y, lam):
    t = X @ params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, t) - y * t) + 0.5 * lam * params["w"] @ params["w"]


@pytest.mark.parametrize("method", ["trust-krylov", "trust-ncg"])
def test_minimize_logistic_regression(method):
    X, y = _logistic_data()
    lam = 1e-2
    loss = _logistic_loss
    params = {"b": jnp.zeros((), DTYPE), "w": jnp.zeros(5, DTYPE)}
    data = (jnp.asarray(X, DTYPE), jnp.asarray(y, DTYPE), lam)  # lam: a static Python float
    obj = objective(loss, (params, *data))
    res = so.minimize(obj.fun, obj.x0, jac=obj.jac, hessp=obj.hessp, method=method,
                      options={"gtol": 1e-8 if X64 else 1e-5})
    sol = obj.unravel(res.x)
    assert set(sol) == {"b", "w"} and sol["w"].dtype == DTYPE
    ref = _logistic_reference(X, y, lam)  # order [w, b]
    tol = 1e-6 if X64 else 1e-3
    np.testing.assert_allclose(np.asarray(sol["w"]), ref[:-1], atol=tol)
    np.testing.assert_allclose(float(sol["b"]), ref[-1], atol=tol)
    assert np.linalg.norm(obj.jac(res.x)) < (1e-8 if X64 else 1e-4)


def test_tuple_argnums_concatenate_and_unravel():
    def f(data, a, b):
        return jnp.sum(data * jnp.sin(a["u"]) ** 2) + jnp.sum(b**3) * jnp.sum(a["u"])

    data, a, b = rand(0, (3,)), {"u": rand(1, (3,))}, rand(2, (2,))
    obj = objective(f, (data, a, b), argnums=(1, 2))
    flat, _ = ravel_pytree((a, b))
    np.testing.assert_array_equal(obj.x0, np.asarray(flat, np.float64))
    ua, ub = obj.unravel(obj.x0)
    np.testing.assert_array_equal(ua["u"], a["u"])
    np.testing.assert_array_equal(ub, b)
    want = ravel_pytree(jax.grad(f, argnums=(1, 2))(data, a, b))[0]
    scaled_close(obj.jac(obj.x0), want)
    p = np.linspace(-1.0, 1.0, 5)
    H = jax.hessian(lambda z: f(data, *ravel_pytree((a, b))[1](z)))(flat)
    scaled_close(obj.hessp(obj.x0, p), H @ jnp.asarray(p, DTYPE))

    single = objective(f, (data, a, b), argnums=2)
    np.testing.assert_array_equal(single.unravel(single.x0), b)


def _count_precision_warnings(build):
    """Builds an objective with `build()`, then uses it; returns it and its PrecisionWarnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = build()
        for _ in range(3):
            obj.fun(obj.x0), obj.jac(obj.x0 + 1.0), obj.hessp(obj.x0, np.ones_like(obj.x0))
        so.minimize(obj.fun, obj.x0, jac=obj.jac, hessp=obj.hessp, method="trust-krylov")
    return obj, [w for w in caught if issubclass(w.category, interop.PrecisionWarning)]


def test_float32_objective_warns_once_naming_dtype_and_fix():
    assert issubclass(interop.PrecisionWarning, UserWarning)
    x32 = jnp.asarray(_rosen_start(10), jnp.float32)  # float32 with or without x64
    obj, caught = _count_precision_warnings(lambda: scipy_objective(rosenbrock, (x32,)))
    assert len(caught) == 1  # once per objective, when built; not per evaluation
    message = str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller, not at jhvp
    assert "jhvp.scipy_objective" in message and "float32" in message
    assert "dtype=jnp.float64" in message and "dtype=jnp.float32" in message
    if not X64:  # the fix then starts with enabling x64
        assert 'jax.config.update("jax_enable_x64", True)' in message
        assert "JAX_ENABLE_X64=1" in message
    assert obj.dtype == np.float32
    _, again = _count_precision_warnings(lambda: scipy_objective(rosenbrock, (x32,)))
    assert len(again) == 1  # a second objective warns again


def test_explicit_low_dtype_is_silent():
    x32 = jnp.asarray(_rosen_start(10), jnp.float32)
    obj, caught = _count_precision_warnings(
        lambda: scipy_objective(rosenbrock, (x32,), dtype=jnp.float32))
    assert caught == [] and obj.dtype == np.float32
    np.testing.assert_allclose(obj.fun(obj.x0), float(rosenbrock(x32)), rtol=1e-6)


def test_low_precision_result_warns_even_with_dtype():
    def f(x):  # computes in DTYPE, but hands SciPy a float16 value
        return rosenbrock(x).astype(jnp.float16)

    with pytest.warns(interop.PrecisionWarning, match="f returns float16"):
        scipy_objective(f, (_rosen_start(10),), dtype=DTYPE)


@pytest.mark.skipif(X64, reason="needs x64 off: with JAX_ENABLE_X64=1 float64 is available")
def test_float64_dtype_without_x64_raises():
    with pytest.raises(TypeError, match=r"jhvp\.scipy_objective: dtype=float64 needs JAX's 64-bit"
                       r'.*jax\.config\.update\("jax_enable_x64", True\).*JAX_ENABLE_X64=1'):
        scipy_objective(rosenbrock, (_rosen_start(10),), dtype=jnp.float64)
    with pytest.raises(TypeError, match="64-bit mode"):
        scipy_objective(rosenbrock, (_rosen_start(10),), dtype="float64")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, "relu", 3])
def test_dtype_must_be_real_floating(dtype):
    with pytest.raises(TypeError, match=r"jhvp\.scipy_objective: `dtype` must be a real floating"):
        scipy_objective(rosenbrock, (_rosen_start(10),), dtype=dtype)


@pytest.mark.skipif(not X64, reason="dtype=jnp.float64 needs JAX_ENABLE_X64=1")
@pytest.mark.parametrize("method", ["trust-krylov", "Newton-CG"])
def test_dtype_float64_minimizes_float32_logistic_regression(method):
    # From float32 primals and data these methods stop with "A bad approximation caused failure
    # to predict improvement" / "precision loss" (issue #15); dtype=jnp.float64 computes in
    # float64: primals and data cast (strict promotion would reject float64 @ float32 otherwise).
    X, y = _logistic_data()
    lam = 1e-2
    params = {"b": jnp.zeros((), jnp.float32), "w": jnp.zeros(5, jnp.float32)}
    data = (jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32), lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PrecisionWarning: float64 was asked for
        obj = scipy_objective(_logistic_loss, (params, *data), dtype=jnp.float64)
    assert obj.dtype == np.float64
    options = {"xtol": 1e-12} if method == "Newton-CG" else {"gtol": 1e-8}
    res = so.minimize(obj.fun, obj.x0, jac=obj.jac, hessp=obj.hessp, method=method,
                      options=options)
    assert res.success, res.message
    sol = obj.unravel(res.x)
    assert sol["w"].dtype == sol["b"].dtype == jnp.float64
    X32, y32 = (np.asarray(a, np.float32).astype(np.float64) for a in (X, y))
    ref = _logistic_reference(X32, y32, lam)  # the data the objective holds, in float64
    np.testing.assert_allclose(np.asarray(sol["w"]), ref[:-1], atol=1e-6)
    np.testing.assert_allclose(float(sol["b"]), ref[-1], atol=1e-6)
    assert np.linalg.norm(obj.jac(res.x)) < 1e-7


def test_scipy_objective_errors():
    with pytest.raises(TypeError, match=r"jhvp\.scipy_objective: .*primals\[0\]\['n'\].*int32"):
        scipy_objective(lambda p: jnp.sum(p["x"]), ({"x": jnp.ones(2), "n": jnp.ones(2, jnp.int32)},))
    with pytest.raises(TypeError, match=r"jhvp\.scipy_objective: .*primals\[0\]\[1\] is str"):
        scipy_objective(lambda p: jnp.sum(p[0]), ((jnp.ones(2), "relu"),))
    with pytest.raises(TypeError, match=r"jhvp\.scipy_objective: f must return a real scalar"):
        scipy_objective(lambda x: x * 2.0, (jnp.ones(2),))
    with pytest.raises(ValueError, match="out of range"):
        scipy_objective(lambda x: jnp.sum(x), (jnp.ones(2),), argnums=1)


# ---- to_lineax --------------------------------------------------------------------------------


def _pd_quadratic(n=6):
    M = rand(3, (n, n))
    A = M @ M.T + n * jnp.eye(n, dtype=DTYPE)
    b = rand(4, (n,))
    return (lambda x: 0.5 * x @ A @ x - b @ x), np.asarray(A, np.float64), np.asarray(b, np.float64)


def test_to_lineax_cg_solve_equals_numpy():
    f, A, b = _pd_quadratic()
    op = jhvp.hessian_operator(f, (jnp.zeros(6, DTYPE),))
    L = to_lineax(op, psd=True)
    assert lx.is_symmetric(L) and lx.is_positive_semidefinite(L)
    assert L.in_structure() == jax.ShapeDtypeStruct((6,), DTYPE)
    tol = 1e-10 if X64 else 1e-6
    sol = lx.linear_solve(L, jnp.asarray(b, DTYPE), lx.CG(rtol=tol, atol=tol))
    scaled_close(sol.value, np.linalg.solve(A, b), rtol=1e-8 if X64 else 1e-4)


def test_to_lineax_tags():
    f, _, b = _pd_quadratic()
    op = jhvp.hessian_operator(f, (jnp.zeros(6, DTYPE),))
    L = to_lineax(op)
    assert lx.is_symmetric(L) and not lx.is_positive_semidefinite(L)
    with pytest.raises(ValueError, match="positive or negative definite"):
        lx.linear_solve(L, jnp.asarray(b, DTYPE), lx.CG(rtol=1e-6, atol=1e-6))

    class PSDOperator:  # the GGN / Fisher operators declare `psd = True` on the class
        psd = True

        def __call__(self, v):
            return 2.0 * v

        def in_structure(self):
            return jax.ShapeDtypeStruct((3,), DTYPE)

    assert lx.is_positive_semidefinite(to_lineax(PSDOperator()))


def test_to_lineax_plain_callable_with_pytree_like():
    _, H = quadratic(n=5)
    like = (jnp.zeros(2, DTYPE), jnp.zeros(3, DTYPE))

    def op(v):
        y = H @ jnp.concatenate(v)
        return (y[:2], y[2:])

    L = to_lineax(op, like=like)
    v = (jnp.ones(2, DTYPE), jnp.arange(3, dtype=DTYPE))
    scaled_close(jnp.concatenate(L.mv(v)), H @ jnp.concatenate(v))
    scaled_close(L.as_matrix(), H)


# ---- optional dependencies --------------------------------------------------------------------


def test_missing_scipy_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ImportError, match=r'jhvp\.to_scipy needs .*pip install "jhvp\[scipy\]"'):
        to_scipy(lambda v: v, like=jnp.zeros(2))


def test_missing_lineax_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lineax", None)
    with pytest.raises(ImportError, match=r'jhvp\.to_lineax needs .*pip install "jhvp\[lineax\]"'):
        to_lineax(lambda v: v, like=jnp.zeros(2))
