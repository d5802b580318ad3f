"""Which leaves are differentiated: Flax NNX Params by default, linen params, and `wrt=`.

References are dense Hessians of functions of the selected leaves alone (`jax.hessian` over a
flat vector), so a silently enlarged parameter set shows as a different matrix.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import DTYPE
from jax.flatten_util import ravel_pytree

import jhvp

RTOL = 1e-9 if DTYPE == jnp.float64 else 2e-4


class SmallCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, kernel_size=(3, 3), rngs=rngs, param_dtype=DTYPE, dtype=DTYPE)
        self.bn = nnx.BatchNorm(3, rngs=rngs, param_dtype=DTYPE, dtype=DTYPE)
        # flax makes the running statistics float32 whatever param_dtype says.
        self.bn.mean = nnx.BatchStat(jnp.zeros(3, DTYPE))
        self.bn.var = nnx.BatchStat(jnp.ones(3, DTYPE))
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(3 * 4 * 4, 2, rngs=rngs, param_dtype=DTYPE, dtype=DTYPE)

    def __call__(self, x):
        h = jnp.tanh(self.bn(self.conv(x)))
        return self.head(self.drop(h).reshape(x.shape[0], -1))


def cnn_problem():
    model = SmallCNN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 4, 4, 1), DTYPE)
    y = jnp.array([0, 1, 1, 0, 1])
    model.train()
    with jax.numpy_dtype_promotion("standard"):  # flax's Dropout mixes dtypes under x64
        model(x)  # one training step's worth of running statistics: mean/var differ from 0/1
    model.eval()  # BatchNorm uses them, Dropout is off

    def loss(m, x, y):
        logits = m(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return model, x, y, loss


def dense_param_hessian(model, loss, x, y):
    """The Hessian with respect to the nnx.Param variables only, and how to ravel a State."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat, unravel = ravel_pytree(params)

    def f(p):
        return loss(nnx.merge(graphdef, unravel(p), rest), x, y)

    return np.asarray(jax.hessian(f)(flat), np.float64), params


def test_nnx_batchnorm_model_differentiates_params_only():
    model, x, y, loss = cnn_problem()
    H, params = dense_param_hessian(model, loss, x, y)
    op = jhvp.hessian_operator(loss, (model, x, y))
    assert op.shape == H.shape  # 628 vs 612 before: BatchStat mean and var joined
    got = np.linalg.eigvalsh(np.asarray(op.as_matrix(), np.float64))
    np.testing.assert_allclose(got, np.linalg.eigvalsh(H), rtol=RTOL, atol=RTOL * np.abs(H).max())


def test_nnx_state_tangents_give_state_results_that_match_the_dense_hessian():
    model, x, y, loss = cnn_problem()
    H, params = dense_param_hessian(model, loss, x, y)
    g = nnx.grad(loss)(model, x, y)  # an nnx.State of the Params
    hv = jhvp.hvp(loss, (model, x, y), g)
    assert type(hv) is type(g) and jax.tree.structure(hv) == jax.tree.structure(g)
    want = H @ np.asarray(ravel_pytree(g)[0], np.float64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(ravel_pytree(hv)[0], want, rtol=RTOL, atol=RTOL * scale)
    op = jhvp.hessian_operator(loss, (model, x, y))
    np.testing.assert_allclose(ravel_pytree(op @ g)[0], want, rtol=RTOL, atol=RTOL * scale)
    _, _, hv2 = jhvp.value_grad_hvp(loss, (model, x, y), g)
    np.testing.assert_allclose(ravel_pytree(hv2)[0], want, rtol=RTOL, atol=RTOL * scale)
    # curvature.solve takes the State too: (H + λI) x = g against numpy.
    lam = 1.0
    b = np.asarray(ravel_pytree(g)[0], np.float64)
    x_ref = np.linalg.solve(H + lam * np.eye(H.shape[0]), b)
    sol = jhvp.curvature.solve(op, g, damping=lam, rtol=1e-6, max_steps=400).x
    flat = np.asarray(ravel_pytree(jax.tree.leaves(sol))[0], np.float64)
    np.testing.assert_allclose(np.linalg.norm(flat - x_ref) / np.linalg.norm(x_ref), 0,
                               atol=1e-3 if DTYPE == jnp.float32 else 1e-6)


def test_nnx_wrt_selects_variables_and_non_float_ones_get_nnx_advice():
    model, x, y, loss = cnn_problem()
    op_bn = jhvp.hessian_operator(loss, (model, x, y), wrt=nnx.BatchStat)
    assert op_bn.shape == (6, 6)  # mean and var of 3 channels
    with pytest.raises(TypeError, match=r"RngCount.*hold it fixed.*wrt="):
        jhvp.hvp(loss, (model, x, y), jax.tree.map(jnp.ones_like, model), wrt=nnx.Variable)


def test_linen_variables_dict_differentiates_params_only():
    variables = {"params": {"w": jnp.array([1.0, 2.0], DTYPE)},
                 "batch_stats": {"mean": jnp.array([0.5, -0.5], DTYPE)}}

    def f(v):
        return jnp.sum((v["params"]["w"] - v["batch_stats"]["mean"]) ** 4)

    op = jhvp.hessian_operator(f, (variables,))
    assert op.shape == (2, 2)
    d = np.array([0.5, 2.5])
    np.testing.assert_allclose(op.as_matrix(), np.diag(12 * d**2), rtol=RTOL)


def test_prefix_of_bools_gives_the_hessian_block_for_every_operator():
    p = {"w": jnp.array([0.3, -0.2, 0.5], DTYPE), "v": jnp.array([1.0, 2.0], DTYPE)}
    x = jnp.array([[1.0, 0.5, -1.0], [0.2, 0.1, 0.3]], DTYPE)

    def model(p, x):
        return jnp.tanh(x @ p["w"]) * p["v"]

    def loss(p, x):
        return jnp.sum(model(p, x) ** 2)

    full = jax.hessian(lambda w: loss({"w": w, "v": p["v"]}, x))(p["w"])
    op = jhvp.hessian_operator(loss, (p, x), wrt={"w": True, "v": False})
    np.testing.assert_allclose(op.as_matrix(), full, rtol=RTOL, atol=RTOL)
    hv = jhvp.hvp(loss, (p, x), {"w": jnp.ones(3, DTYPE), "v": None}, wrt={"w": True, "v": False})
    np.testing.assert_allclose(hv["w"], full @ np.ones(3), rtol=RTOL, atol=RTOL)
    assert hv["v"] is None
    # GGN and Fisher blocks against their dense formulas in w alone.
    J = jax.jacobian(lambda w: model({"w": w, "v": p["v"]}, x))(p["w"])
    ggn = jhvp.ggn_operator(model, lambda z: jnp.sum(z**2), (p, x), wrt={"w": True, "v": False})
    np.testing.assert_allclose(ggn.as_matrix(), 2 * J.T @ J, rtol=RTOL, atol=RTOL)
    fisher = jhvp.empirical_fisher_operator(
        lambda p, x: model(p, x) ** 2, (p, x), wrt={"w": True, "v": False})
    G = jax.jacobian(lambda w: model({"w": w, "v": p["v"]}, x) ** 2)(p["w"])
    np.testing.assert_allclose(fisher.as_matrix(), G.T @ G / 2, rtol=RTOL, atol=RTOL)


class WithCounter(eqx.Module):
    w: jax.Array
    steps: jax.Array  # an int array the model carries: not a parameter

    def __call__(self, x):
        return jnp.sum(jnp.sin(self.w * x)) * self.steps


def test_callable_wrt_and_tuple_argnums():
    m = WithCounter(jnp.array([0.5, 1.0], DTYPE), jnp.array(2))
    x = jnp.array([1.0, 3.0], DTYPE)
    with pytest.raises(TypeError, match=r"wrt=eqx.is_inexact_array"):
        jhvp.hvp(lambda m, x: m(x), (m, x), jax.tree.map(jnp.ones_like, m))
    ones = jax.tree.map(jnp.ones_like, eqx.filter(m, eqx.is_inexact_array))
    hv = jhvp.hvp(lambda m, x: m(x), (m, x), ones, wrt=eqx.is_inexact_array)
    want = -2 * np.sin(np.array([0.5, 3.0])) * np.array([1.0, 9.0])
    np.testing.assert_allclose(hv.w, want, rtol=RTOL)
    # Tuple argnums: one wrt per argument; x's block alone (w held fixed).
    hv = jhvp.hvp(lambda m, x: m(x), (m, x), (jax.tree.map(lambda _: None, m), jnp.ones(2, DTYPE)),
                  argnums=(0, 1), wrt=(False, None))
    np.testing.assert_allclose(hv[1], -2 * np.sin(np.array([0.5, 3.0])) * np.array([0.25, 1.0]),
                               rtol=RTOL)


def test_bad_wrt_is_explained():
    with pytest.raises(TypeError, match=r"`wrt` must be a pytree prefix of bools"):
        jhvp.hvp(lambda w: jnp.sum(w**2), (jnp.ones(2, DTYPE),), jnp.ones(2, DTYPE), wrt=3)
    with pytest.raises(TypeError, match=r"is an NNX filter, but the differentiated argument"):
        jhvp.hvp(lambda w: jnp.sum(w**2), (jnp.ones(2, DTYPE),), jnp.ones(2, DTYPE), wrt="w")
    with pytest.raises(ValueError, match=r"`wrt` must be a pytree prefix"):
        jhvp.hvp(lambda p: jnp.sum(p["a"] ** 2), ({"a": jnp.ones(2, DTYPE)},),
                 {"a": jnp.ones(2, DTYPE)}, wrt={"b": True})


def test_scipy_objective_takes_wrt_and_the_nnx_rule():
    from jhvp.interop import scipy_objective

    p = {"w": jnp.array([0.3, -0.2, 0.5], DTYPE), "v": jnp.array([1.0, 2.0], DTYPE)}
    x = jnp.array([[1.0, 0.5, -1.0], [0.2, 0.1, 0.3]], DTYPE)

    def loss(p, x):
        return jnp.sum((jnp.tanh(x @ p["w"]) * p["v"]) ** 2)

    obj = scipy_objective(loss, (p, x), wrt={"w": True, "v": False}, dtype=DTYPE)
    assert obj.x0.shape == (3,)
    block = jax.hessian(lambda w: loss({"w": w, "v": p["v"]}, x))(p["w"])
    np.testing.assert_allclose(obj.hessp(obj.x0, np.ones(3)), block @ np.ones(3), rtol=RTOL,
                               atol=RTOL)
    back = obj.unravel(obj.x0 + 1.0)
    np.testing.assert_allclose(back["w"], p["w"] + 1.0, rtol=RTOL)
    np.testing.assert_array_equal(back["v"], p["v"])  # held fixed
    model, xs, ys, cnn_loss = cnn_problem()
    H, _ = dense_param_hessian(model, cnn_loss, xs, ys)
    obj = scipy_objective(cnn_loss, (model, xs, ys), dtype=DTYPE)
    assert obj.x0.size == H.shape[0]  # Params only: no BatchStat, no RNG state
