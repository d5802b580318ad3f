"""jhvp.curvature.solve: CG against dense solves and scipy.sparse.linalg.cg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg
from helpers import DTYPE, X64, mlp_problem, rosenbrock, tree_allclose
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp import curvature

RT = 1e-10 if X64 else 1e-5  # the solver's rtol in these tests
CLOSE = dict(rtol=1e-7, atol=1e-9) if X64 else dict(rtol=3e-3, atol=3e-4)


def spd(n, cond, seed=0):
    """A dense symmetric positive definite matrix with eigenvalues in [1, cond]."""
    lam = np.geomspace(1.0, cond, n)
    u, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return jnp.asarray((u * lam) @ u.T, DTYPE)


def rhs(n, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=n), DTYPE)


def rosen_op(n=20):
    x = jnp.asarray(1.0 + 0.05 * np.random.default_rng(2).normal(size=n), DTYPE)
    return jhvp.hessian_operator(rosenbrock, (x,)), np.asarray(jax.hessian(rosenbrock)(x),
                                                               np.float64)


def test_matches_scipy_cg():
    a = spd(30, 50.0)
    b = rhs(30)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    steps = []
    ref, info = scipy.sparse.linalg.cg(a64, b64, rtol=RT, atol=0.0,
                                       callback=lambda xk: steps.append(1))
    assert info == 0
    result = curvature.solve(lambda v: a @ v, b, rtol=RT)
    np.testing.assert_allclose(result.x, ref, **CLOSE)
    assert bool(result.converged) and not bool(result.negative_curvature)
    # The same iteration and stopping rule: the same number of steps, up to rounding (float32
    # loses conjugacy sooner than scipy's float64, so needs a few more).
    if X64:
        assert abs(int(result.num_steps) - len(steps)) <= 1
    else:
        assert len(steps) - 1 <= int(result.num_steps) <= 2 * len(steps)
    true_residual = np.linalg.norm(b64 - a64 @ np.asarray(result.x, np.float64))
    assert true_residual <= 2 * RT * np.linalg.norm(b64)
    np.testing.assert_allclose(float(result.residual_norm), true_residual,
                               rtol=0.5, atol=RT * np.linalg.norm(b64))


def test_hessian_operator_with_damping_and_outer_jit():
    op, h = rosen_op()
    b = rhs(20)
    for damping in (0.0, 3.0):
        result = curvature.solve(op, b, damping=damping, rtol=RT)
        expect = np.linalg.solve(h + damping * np.eye(20), np.asarray(b, np.float64))
        np.testing.assert_allclose(result.x, expect, rtol=CLOSE["rtol"],
                                   atol=CLOSE["atol"] * np.abs(expect).max())
    # damping is traced: one program serves every value; op passed into the user's jit.
    jitted = jax.jit(lambda op, b, lam: curvature.solve(op, b, damping=lam, rtol=RT).x)
    for lam in (0.5, 7.0):
        expect = np.linalg.solve(h + lam * np.eye(20), np.asarray(b, np.float64))
        np.testing.assert_allclose(jitted(op, b, lam), expect, rtol=CLOSE["rtol"],
                                   atol=CLOSE["atol"] * np.abs(expect).max())


def test_x0_and_max_steps():
    a = spd(25, 1e3, seed=3)
    b = rhs(25)
    exact = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
    start = curvature.solve(lambda v: a @ v, b, x0=jnp.asarray(exact, DTYPE), rtol=1e-4)
    assert int(start.num_steps) == 0 and bool(start.converged)
    near = curvature.solve(lambda v: a @ v, b, x0=jnp.asarray(exact + 1e-3, DTYPE), rtol=RT)
    cold = curvature.solve(lambda v: a @ v, b, rtol=RT)
    np.testing.assert_allclose(near.x, exact, rtol=CLOSE["rtol"] * 10,
                               atol=CLOSE["atol"] * np.abs(exact).max())
    assert int(near.num_steps) <= int(cold.num_steps)
    capped = curvature.solve(lambda v: a @ v, b, max_steps=3, rtol=RT)
    assert int(capped.num_steps) == 3 and not bool(capped.converged)
    true_residual = np.linalg.norm(np.asarray(b, np.float64)
                                   - np.asarray(a, np.float64) @ np.asarray(capped.x, np.float64))
    np.testing.assert_allclose(float(capped.residual_norm), true_residual, rtol=1e-3)


def numpy_cg_steihaug(a, b):
    """Reference CG that stops at the first pᵀAp ≤ 0: (x, steps, detected)."""
    x, r = np.zeros_like(b), b.copy()
    p = r.copy()
    for k in range(len(b)):
        ap = a @ p
        if p @ ap <= 0:
            return (p if k == 0 else x), k + 1, True
        alpha = (r @ r) / (p @ ap)
        x, r_new = x + alpha * p, r - alpha * ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return x, len(b), False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_negative_curvature_stop_matches_steihaug(seed):
    lam = np.r_[np.geomspace(1.0, 10.0, 9), -0.5]
    u, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(10, 10)))
    a = jnp.asarray((u * lam) @ u.T, DTYPE)
    b = rhs(10, seed)
    x_ref, k_ref, detected = numpy_cg_steihaug(np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert detected
    result = curvature.solve(lambda v: a @ v, b, negative_curvature="stop", rtol=RT)
    assert bool(result.negative_curvature) and not bool(result.converged)
    assert int(result.num_steps) == k_ref
    np.testing.assert_allclose(result.x, x_ref, **CLOSE)
    # "ignore" runs on: CG may still solve an indefinite, nonsingular system; the flag is set.
    ignored = curvature.solve(lambda v: a @ v, b, rtol=RT)
    assert bool(ignored.negative_curvature)


def test_negative_curvature_at_first_step_returns_b():
    a = -spd(6, 4.0)
    b = rhs(6)
    result = curvature.solve(lambda v: a @ v, b, negative_curvature="stop")
    assert bool(result.negative_curvature) and int(result.num_steps) == 1
    np.testing.assert_allclose(result.x, b, rtol=0)  # the steepest-descent direction
    true_residual = np.linalg.norm(np.asarray(b - a @ b, np.float64))
    np.testing.assert_allclose(float(result.residual_norm), true_residual, rtol=1e-5)
    positive = curvature.solve(lambda v: -a @ v, b, negative_curvature="stop", rtol=RT)
    assert not bool(positive.negative_curvature) and bool(positive.converged)


def test_vmap_over_right_hand_sides():
    op, h = rosen_op()
    bs = jnp.stack([rhs(20, s) for s in range(4)])
    result = jax.vmap(lambda b: curvature.solve(op, b, damping=1.0, rtol=RT))(bs)
    expect = np.linalg.solve(h + np.eye(20), np.asarray(bs, np.float64).T).T
    np.testing.assert_allclose(result.x, expect, rtol=CLOSE["rtol"],
                               atol=CLOSE["atol"] * np.abs(expect).max())
    assert result.num_steps.shape == (4,) and bool(jnp.all(result.converged))


def test_grad_and_jvp_with_respect_to_b():
    op, h = rosen_op()
    b, db = rhs(20), rhs(20, seed=5)
    dense = jnp.asarray(h + 2.0 * np.eye(20), DTYPE)

    def loss(solver, b):
        return jnp.sum(jnp.sin(solver(b)))

    ours = lambda b: curvature.solve(op, b, damping=2.0, rtol=RT).x
    ref = lambda b: jnp.linalg.solve(dense, b)
    np.testing.assert_allclose(jax.grad(lambda b: loss(ours, b))(b),
                               jax.grad(lambda b: loss(ref, b))(b), **CLOSE)
    _, t_ours = jax.jvp(ours, (b,), (db,))
    _, t_ref = jax.jvp(ref, (b,), (db,))
    np.testing.assert_allclose(t_ours, t_ref, **CLOSE)


def test_dict_params_and_plain_callable_on_dicts():
    f, (params, x, y) = mlp_problem()
    op = jhvp.hessian_operator(f, (params, x, y))
    flat, unravel = ravel_pytree(params)
    h = np.asarray(jax.jit(jax.hessian(lambda z: f(unravel(z), x, y)))(flat), np.float64)
    damping = 1.0 + max(0.0, -np.linalg.eigvalsh(h).min())  # positive definite
    b = jax.tree.map(lambda p: jnp.cos(p), params)
    result = curvature.solve(op, b, damping=damping, rtol=RT)
    expect = unravel(jnp.asarray(np.linalg.solve(h + damping * np.eye(h.shape[0]),
                                                 np.asarray(ravel_pytree(b)[0], np.float64)),
                                 DTYPE))
    tree_allclose(result.x, expect, **CLOSE)
    # A plain callable on dicts: b gives the structure, no `like` needed.
    scale = {"u": jnp.asarray(2.0, DTYPE), "w": jnp.asarray(4.0, DTYPE)}
    plain = curvature.solve(lambda v: jax.tree.map(lambda s, t: s * t, scale, v),
                            {"u": jnp.ones(3, DTYPE), "w": jnp.ones((2, 2), DTYPE)})
    tree_allclose(plain.x, {"u": jnp.full(3, 0.5, DTYPE), "w": jnp.full((2, 2), 0.25, DTYPE)},
                  **CLOSE)


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(damping=-1.0), ValueError, r"curvature\.solve: `damping` must be non-negative, got -1\.0"),
        (dict(rtol=-1e-3), ValueError, r"curvature\.solve: `rtol` must be non-negative"),
        (dict(atol=np.ones(2)), ValueError, r"curvature\.solve: `atol` must be a scalar"),
        (dict(max_steps=0), ValueError, r"curvature\.solve: `max_steps` must be at least 1.*None"),
        (dict(max_steps=2.5), TypeError, r"curvature\.solve: `max_steps` must be None or an int"),
        (dict(negative_curvature="cauchy"), ValueError, r"curvature\.solve: unknown negative_curvature 'cauchy'.*'stop'"),
        (dict(b=jnp.ones(5, DTYPE)), ValueError, r"curvature\.solve: `b` leaf <root> has shape \(5,\), but op applies to shape \(6,\)"),
        (dict(b={"x": jnp.ones(6, DTYPE)}), ValueError, r"curvature\.solve: `b` must have the structure"),
        (dict(x0=jnp.ones(3, DTYPE)), ValueError, r"curvature\.solve: `x0` leaf <root> has shape \(3,\)"),
    ],
)
def test_errors(kw, error, match):
    op = jhvp.hessian_operator(rosenbrock, (jnp.ones(6, DTYPE),))
    args = dict(b=jnp.ones(6, DTYPE)) | kw
    b = args.pop("b")
    with pytest.raises(error, match=match):
        curvature.solve(op, b, **args)


def test_plain_callable_that_does_not_accept_b():
    with pytest.raises(ValueError, match=r"curvature\.solve: `b` does not match what op accepts"):
        curvature.solve(lambda v: jnp.ones((3, 3), DTYPE) @ v, jnp.ones(4, DTYPE))
