"""What eigh's results promise (issue #15, "never silently wrong").

16-bit operators.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jhvp
from jhvp.curvature import _sketch, eigh, lanczos, power_iteration, spectral_density

KEY = jax.random.key(0)


def sym_matrix(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    n = len(eigenvalues)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (U * np.asarray(eigenvalues, np.float64)) @ U.T


# ---- (6) bfloat16 and float16 operators ----------------------------------------------------------

LOW = [jnp.bfloat16, jnp.float16]


def low_problem(dtype, n=60):
    ev = np.concatenate([np.linspace(-1.0, 1.0, n - 3), [3.0, 4.0, 5.0]])
    Ab = jnp.asarray(sym_matrix(ev, seed=1), dtype)
    # The reference is the rounded matrix itself, in float64: what the operator applies.
    return Ab, np.asarray(Ab, np.float64)


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_eigh_on_a_16_bit_operator(dtype):
    Ab, A = low_problem(dtype)
    eps = float(jnp.finfo(dtype).eps)
    w = np.sort(np.linalg.eigvalsh(A))[::-1][:3]
    norm = np.abs(np.linalg.eigvalsh(A)).max()
    like = jnp.ones(60, dtype)
    m = 30
    out = eigh(lambda v: Ab @ v, KEY, 3, num_matvecs=m, like=like)
    assert out.eigenvalues.dtype == jnp.float32 and out.eigenvectors.dtype == dtype
    theta = np.asarray(out.eigenvalues, np.float64)
    # Ritz values of the rounded operator are accurate to its rounding: at most 3√m·ε‖A‖
    # (ε of the dtype), the floor of a Lanczos relation whose vectors are stored rounded.
    assert np.all(np.abs(theta - w) <= 3 * np.sqrt(m) * eps * norm)


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_lanczos_density_power_and_solve_on_a_16_bit_operator(dtype):
    Ab, A = low_problem(dtype)
    eps = float(jnp.finfo(dtype).eps)
    norm = np.abs(np.linalg.eigvalsh(A)).max()
    n = 60
    mv = lambda v: Ab @ v  # noqa: E731
    like = jnp.ones(n, dtype)
    # Lanczos: the basis is stored in the dtype (orthonormal to its ε), T in float32 is QᵀAQ
    # to the rounding of the stored vectors, a few ε‖A‖.
    v0 = jnp.asarray(np.random.default_rng(2).standard_normal(n), dtype)
    out = lanczos(mv, v0, 12)
    assert out.basis.dtype == dtype and out.alphas.dtype == jnp.float32
    Q = np.asarray(out.basis, np.float64)
    b = np.asarray(out.betas, np.float64)
    T = np.diag(np.asarray(out.alphas, np.float64)) + np.diag(b[:-1], 1) + np.diag(b[:-1], -1)
    np.testing.assert_allclose(Q @ Q.T, np.eye(12), atol=4 * eps)
    np.testing.assert_allclose(Q @ A @ Q.T, T, atol=4 * eps * norm)
    # SLQ: Gauss quadrature is exact for degree < 2m, so the moments of (nodes, weights) are
    # the probe's vᵀAᵖv/vᵀv, up to ε‖A‖ᵖ per application of the rounded operator.
    m = 8
    sd = spectral_density(mv, KEY, num_probes=2, num_matvecs=m, like=like)
    assert sd.nodes.dtype == jnp.float32 and sd.density.dtype == jnp.float32
    np.testing.assert_allclose(np.trapezoid(np.asarray(sd.density), np.asarray(sd.grid)), 1.0,
                               atol=1e-3)
    for i in range(2):
        v = np.asarray(_sketch.rademacher(KEY, i, n, dtype), np.float64)
        nodes, weights = (np.asarray(x[i], np.float64) for x in (sd.nodes, sd.weights))
        for p in range(2 * m):
            ref = v @ np.linalg.matrix_power(A, p) @ v / (v @ v)
            assert abs(weights @ nodes**p - ref) <= (p + 1) * eps * norm**p, (i, p)
    # Power iteration stops at residual ≤ rtol·|λ|; Kahan bounds the error by the residual,
    # which float32 arithmetic computes to ε‖A‖ of the rounded vectors.
    rtol = 1e-2
    pw = power_iteration(mv, KEY, max_iters=300, rtol=rtol, like=like)
    assert pw.eigenvalues.dtype == jnp.float32 and bool(pw.converged[0])
    assert abs(float(pw.eigenvalues[0]) - norm) <= rtol * norm + eps * norm
    # CG (already 16-bit clean): the true residual of the rounded solution meets rtol up to
    # the rounding of x, ε‖A‖‖x‖.
    rhs = jnp.ones(n, dtype)
    shifted = lambda v: Ab @ v + jnp.asarray(2.0, dtype) * v  # noqa: E731  (A + 2I ≻ 0)
    sol = jhvp.curvature.solve(shifted, rhs, rtol=rtol)
    x = np.asarray(sol.x, np.float64)
    A2 = A + 2.0 * np.eye(n)
    assert bool(sol.converged)
    assert np.linalg.norm(A2 @ x - 1.0) <= rtol * np.sqrt(n) + eps * (norm + 2) * np.linalg.norm(x)
