"""jhvp.curvature.eigh and power_iteration against numpy.linalg.eigh and scipy's eigsh."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg
from helpers import DTYPE, X64, mlp_problem, quadratic, rosenbrock, sym_matrix
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp.curvature import eigh, power_iteration

KEY = jax.random.key(0)
RTOL = 1e-9 if X64 else 2e-4


def dense_hessian(f, primals):
    flat, unravel = ravel_pytree(primals[0])
    return np.asarray(jax.hessian(lambda z: f(unravel(z), *primals[1:]))(flat), np.float64)


def flat_rows(tree):
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree), np.float64)


def assert_pairs(out, A, which, k):
    """Eigenvalues against numpy's, eigenvectors up to sign, and the reported residuals."""
    w, U = np.linalg.eigh(A)
    order = {"LA": np.argsort(-w), "SA": np.argsort(w), "LM": np.argsort(-np.abs(w))}[which][:k]
    scale = np.abs(w).max()
    np.testing.assert_allclose(out.eigenvalues, w[order], rtol=RTOL, atol=RTOL * scale)
    Y = flat_rows(out.eigenvectors)
    overlap = np.abs(np.sum(Y * U[:, order].T, axis=1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6 if X64 else 1e-3)
    true_residual = np.linalg.norm(Y @ A - np.asarray(out.eigenvalues)[:, None] * Y, axis=1)
    # eigh's default partial reorthogonalisation keeps the basis, and so the Ritz vectors,
    # orthogonal to √ε, not ε (Simon 1984): their true residuals have that floor.
    floor = np.sqrt(float(jnp.finfo(DTYPE).eps)) * scale
    assert np.all(true_residual <= 10 * np.asarray(out.residual_norms) + floor)


# Outliers well separated from a bulk: Lanczos finds them in few steps at every end.
SPECTRUM = np.concatenate([np.linspace(-1.0, 1.0, 80), [-9.0, -6.0, -4.0, 4.5, 7.0, 10.0]])


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_matches_numpy_on_a_plain_callable(which):
    A = sym_matrix(SPECTRUM)
    Aj = jnp.asarray(A, DTYPE)
    out = eigh(lambda v: Aj @ v, KEY, 3, which=which, num_matvecs=40, like=jnp.ones(86, DTYPE))
    assert out.eigenvalues.shape == (3,) and out.eigenvectors.shape == (3, 86)
    assert int(out.num_matvecs) == 40
    assert bool(jnp.all(out.converged))
    assert_pairs(out, A, which, 3)


@pytest.mark.parametrize("reortho", ["partial", "full"])
def test_reortho_choices_agree_on_a_hard_spectrum(reortho):
    # Ten outliers converge within a few steps: the plain recurrence would repeat them.
    ev = np.concatenate([np.linspace(0.0, 1.0, 190), 1.0 + 10.0 * np.arange(1, 11)])
    A = sym_matrix(ev, seed=4)
    Aj = jnp.asarray(A, DTYPE)
    out = eigh(lambda v: Aj @ v, KEY, 5, num_matvecs=60, reortho=reortho,
               like=jnp.ones(200, DTYPE))
    assert_pairs(out, A, "LA", 5)
    Y = flat_rows(out.eigenvectors)
    # Ritz vectors inherit the basis' orthogonality: working precision, or √ε for "partial".
    eps = float(jnp.finfo(DTYPE).eps)
    tol = 10 * np.sqrt(eps) if reortho == "partial" else (1e-9 if X64 else 1e-4)
    np.testing.assert_allclose(Y @ Y.T, np.eye(5), atol=tol)


def test_full_krylov_space_gives_every_eigenvalue():
    A = sym_matrix(np.linspace(-3.0, 5.0, 12), seed=3)
    Aj = jnp.asarray(A, DTYPE)
    like = jax.ShapeDtypeStruct((12,), DTYPE)
    out = eigh(lambda v: Aj @ v, KEY, 12, num_matvecs=12, like=like)
    assert_pairs(out, A, "LA", 12)


def test_hessian_operator_dict_params_against_scipy_eigsh():
    f, primals = mlp_problem()
    op = jhvp.hessian_operator(f, primals)
    H = dense_hessian(f, primals)
    ref = scipy.sparse.linalg.eigsh(H, k=3, which="LA", return_eigenvectors=False)
    out = eigh(op, KEY, 3, num_matvecs=40)
    np.testing.assert_allclose(out.eigenvalues, np.sort(ref)[::-1], rtol=RTOL * 10, atol=1e-5)
    assert_pairs(out, H, "LA", 3)


def test_rosenbrock_and_quadratic_hessians():
    x = jnp.linspace(-1.0, 1.5, 10, dtype=DTYPE)
    op = jhvp.hessian_operator(rosenbrock, (x,))
    H = dense_hessian(rosenbrock, (x,))
    assert_pairs(eigh(op, KEY, 2, which="LM", num_matvecs=10), H, "LM", 2)
    f, Hq = quadratic(n=8)
    op = jhvp.hessian_operator(f, (jnp.zeros(8, DTYPE),))
    assert_pairs(eigh(op, KEY, 2, which="SA", num_matvecs=8), np.asarray(Hq, np.float64), "SA", 2)


def test_rtol_stops_early_and_reports_the_matvecs_used():
    A = sym_matrix(SPECTRUM)
    Aj = jnp.asarray(A, DTYPE)
    out = eigh(lambda v: Aj @ v, KEY, 2, num_matvecs=80, rtol=1e-3 if not X64 else 1e-6,
               like=jnp.ones(86, DTYPE))
    assert 2 <= int(out.num_matvecs) < 80
    w = np.sort(np.linalg.eigvalsh(A))[::-1][:2]
    np.testing.assert_allclose(out.eigenvalues, w, rtol=1e-3)


class ScaledTanh(eqx.Module):
    """A pytree operator with a non-array leaf (an activation function)."""

    A: jax.Array
    act: object

    def __call__(self, v):
        return self.A @ v + 0.0 * self.act(v)


def test_equinox_module_operator():
    A = sym_matrix(SPECTRUM)
    out = eigh(ScaledTanh(jnp.asarray(A, DTYPE), jnp.tanh), KEY, 2, num_matvecs=30,
               like=jnp.ones(86, DTYPE))
    assert_pairs(out, A, "LA", 2)


def test_power_iteration():
    A = sym_matrix(SPECTRUM)
    Aj = jnp.asarray(A, DTYPE)
    out = power_iteration(lambda v: Aj @ v, KEY, max_iters=500, rtol=1e-5 if X64 else 1e-4,
                          like=jnp.ones(86, DTYPE))
    assert bool(out.converged[0]) and int(out.num_matvecs) < 500
    np.testing.assert_allclose(out.eigenvalues, [10.0], rtol=1e-4)
    y = flat_rows(out.eigenvectors)[0]
    u = np.linalg.eigh(A)[1][:, -1]
    assert abs(abs(y @ u) - 1) < 1e-3
    np.testing.assert_allclose(out.residual_norms[0], np.linalg.norm(A @ y - out.eigenvalues[0] * y),
                               rtol=1e-2, atol=1e-5)
    short = power_iteration(lambda v: Aj @ v, KEY, max_iters=3, like=jnp.ones(86, DTYPE))
    assert int(short.num_matvecs) == 3 and not bool(short.converged[0])


def test_errors():
    A = jnp.eye(5, dtype=DTYPE)
    like = jnp.ones(5, DTYPE)
    mv = lambda v: A @ v
    with pytest.raises(TypeError, match=r"eigh: `op` is a plain callable; pass `like=`"):
        eigh(mv, KEY)
    with pytest.raises(ValueError, match=r"eigh: `num_matvecs` must be between 1 and 5.*got 6"):
        eigh(mv, KEY, 2, num_matvecs=6, like=like)
    with pytest.raises(ValueError, match=r"eigh: `k` = 4 .* `num_matvecs` = 3"):
        eigh(mv, KEY, 4, num_matvecs=3, like=like)
    with pytest.raises(ValueError, match=r"eigh: `k` must be between 1 and 5"):
        eigh(mv, KEY, 6, like=like)
    with pytest.raises(ValueError, match=r"unknown `which` 'BE'.*'LA', 'SA', 'LM'"):
        eigh(mv, KEY, which="BE", like=like)
    with pytest.raises(ValueError, match=r"eigh: unknown `reortho` 'none'.*'partial', 'full'"):
        eigh(mv, KEY, reortho="none", like=like)
    with pytest.raises(ValueError, match=r"`rtol` must be positive"):
        eigh(mv, KEY, rtol=0.0, like=like)
    with pytest.raises(TypeError, match=r"eigh: `key` must be one PRNG key"):
        eigh(mv, 0, like=like)
    with pytest.raises(ValueError, match=r"eigh: `like` does not match what op returns: leaf "
                                         r"\['b'\] has shape \(2,\)"):
        eigh(lambda v: {"a": v["a"], "b": v["a"]}, KEY, like={"a": like, "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"`like` does not match what op accepts"):
        eigh(mv, KEY, like=jnp.ones(3, DTYPE))
    with pytest.raises(TypeError, match=r"every leaf of `like`.*`like`\['x'\] is str"):
        eigh(mv, KEY, like={"x": "five"})
    with pytest.raises(TypeError, match=r"power_iteration: `op` is a plain callable"):
        power_iteration(mv, KEY)
    with pytest.raises(ValueError, match=r"power_iteration: `max_iters` must be at least 1"):
        power_iteration(mv, KEY, max_iters=0, like=like)
