"""jhvp.curvature.lanczos: the Krylov relation, orthogonality, ghosts, breakdown, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, lanczos_state, mlp_problem, sym_matrix
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp.curvature import lanczos

EPS = float(jnp.finfo(DTYPE).eps)


def tridiag(alphas, betas):
    a, b = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    return np.diag(a) + np.diag(b[:-1], 1) + np.diag(b[:-1], -1)


def clustered(n=300):
    """A bulk of 290 eigenvalues in [0, 1] and 10 well-separated outliers that converge fast:
    the plain recurrence then loses orthogonality and repeats them (Paige 1971)."""
    return np.concatenate([np.linspace(0.0, 1.0, n - 10), 1.0 + 10.0 * np.arange(1, 11)])


def test_krylov_relation_and_projection():
    A = sym_matrix(np.linspace(-2.0, 3.0, 40), seed=1)
    v0 = np.random.default_rng(2).standard_normal(40)
    m = 12
    out = lanczos(lambda v: jnp.asarray(A, DTYPE) @ v, jnp.asarray(v0, DTYPE), m)
    Q = np.asarray(out.basis, np.float64)
    T = tridiag(out.alphas, out.betas)
    tol = 1e-10 if X64 else 2e-5
    assert int(out.num_matvecs) == m
    np.testing.assert_allclose(Q[0], v0 / np.linalg.norm(v0), atol=tol)
    np.testing.assert_allclose(Q @ A @ Q.T, T, atol=tol * 10)
    # A q_i = b_{i-1} q_{i-1} + a_i q_i + b_i q_{i+1}, checked where q_{i+1} is in the basis.
    AQ = Q @ A
    np.testing.assert_allclose(AQ[: m - 1], T[: m - 1] @ Q, atol=tol * 10)


@pytest.mark.parametrize("reortho", ["full", "partial", "none"])
def test_ghosts_only_without_reorthogonalisation(reortho):
    ev = clustered()
    A = jnp.asarray(sym_matrix(ev), DTYPE)
    v0 = jnp.asarray(np.random.default_rng(0).standard_normal(ev.size), DTYPE)
    m = 80
    out = lanczos(lambda v: A @ v, v0, m, reortho=reortho)
    Q = np.asarray(out.basis, np.float64)
    loss = np.abs(Q @ Q.T - np.eye(m)).max()
    ritz = np.linalg.eigvalsh(tridiag(out.alphas, out.betas))
    copies_of_top = int(np.sum(np.abs(ritz - ev.max()) < 0.5))
    if reortho in ("full", "partial"):
        # Partial reorthogonalisation promises semi-orthogonality (√ε), full working precision.
        assert loss <= 10 * np.sqrt(EPS), loss
        if reortho == "full":
            assert loss <= 1e3 * EPS, loss
        assert copies_of_top == 1
        # Ritz values interlace: none may leave the spectrum's hull.
        assert ritz.min() >= ev.min() - 1e-3 and ritz.max() <= ev.max() + 1e-3
        # Every outlier found once, to working precision (Simon 1984: semi-orthogonality
        # suffices).
        top = np.sort(ritz)[-10:]
        np.testing.assert_allclose(top, ev[-10:], rtol=1e-9 if X64 else 1e-5)
    else:
        assert loss > 0.1, loss
        assert copies_of_top > 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_partial_reorthogonalises_a_fraction_of_the_steps(dtype):
    if dtype == "float64" and not X64:
        pytest.skip("float64 needs JAX_ENABLE_X64")

    ev = clustered(600)
    A = jnp.asarray(sym_matrix(ev, seed=5), dtype)
    v0 = jnp.asarray(np.random.default_rng(1).standard_normal(ev.size), dtype)
    m = 120
    out = jax.jit(lambda v: lanczos_state(lambda x: A @ x, v, m, "partial"))(v0)
    Q = np.asarray(out.basis, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    assert np.abs(Q @ Q.T - np.eye(m)).max() <= 10 * np.sqrt(eps)
    # Pairs of reorthogonalisations, not one per step; and some, on this spectrum.
    assert 2 <= int(out.reorthos) < m * 0.7, int(out.reorthos)
    full = jax.jit(lambda v: lanczos_state(lambda x: A @ x, v, m, "full"))(v0)
    assert int(full.reorthos) == m


@pytest.mark.parametrize("reortho", ["full", "partial"])
def test_breakdown_stops_without_nan(reortho):
    A = jnp.diag(jnp.arange(1.0, 7.0, dtype=DTYPE))
    v0 = jnp.asarray([1.0, 1.0, 0.0, 0.0, 0.0, 0.0], DTYPE)  # in a 2-dimensional invariant space
    out = lanczos(lambda v: A @ v, v0, 5, reortho=reortho)
    assert int(out.num_matvecs) == 2
    assert np.all(np.isfinite(np.asarray(out.basis)))
    np.testing.assert_array_equal(np.asarray(out.basis)[2:], 0.0)
    assert float(out.betas[1]) == 0.0
    np.testing.assert_allclose(np.linalg.eigvalsh(tridiag(out.alphas[:2], out.betas[:2])),
                               [1.0, 2.0], rtol=1e-5)


def test_hessian_operator_with_dict_params():
    f, primals = mlp_problem()
    op = jhvp.hessian_operator(f, primals)
    H = np.asarray(jax.hessian(lambda z: f(ravel_pytree(primals[0])[1](z), *primals[1:]))(
        ravel_pytree(primals[0])[0]), np.float64)
    v0 = jax.tree.map(jnp.ones_like, primals[0])
    m = 10
    out = lanczos(op, v0, m)
    Q = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(out.basis), np.float64)
    tol = 1e-9 if X64 else 1e-4
    np.testing.assert_allclose(Q @ Q.T, np.eye(m), atol=tol)
    np.testing.assert_allclose(Q @ H @ Q.T, tridiag(out.alphas, out.betas), atol=tol * 10)


def test_errors():
    A = jnp.eye(4, dtype=DTYPE)
    v0 = jnp.ones(4, DTYPE)
    with pytest.raises(ValueError, match=r"lanczos: `num_matvecs` must be between 1 and 4"):
        lanczos(lambda v: A @ v, v0, 5)
    with pytest.raises(ValueError, match=r"`num_matvecs` must be between 1 and 4.*got 0"):
        lanczos(lambda v: A @ v, v0, 0)
    with pytest.raises(TypeError, match=r"`num_matvecs` must be an int"):
        lanczos(lambda v: A @ v, v0, 2.0)
    with pytest.raises(ValueError, match=r"unknown `reortho` 'selective'.*'full', 'partial', 'none'"):
        lanczos(lambda v: A @ v, v0, 2, reortho="selective")
    with pytest.raises(ValueError, match=r"`v0` does not match what op returns.*shape \(4,\)"):
        lanczos(lambda v: jnp.concatenate([v, v]), v0, 2)
    with pytest.raises(TypeError, match=r"`v0`\['a'\] has dtype int32"):
        lanczos(lambda v: v, {"a": jnp.ones(3, jnp.int32)}, 2)
