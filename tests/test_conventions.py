"""Calling conventions as JAX users expect them: Equinox/Flax models, static leaves, pytree f, aux."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, counting, dense_hvp, rand, tree_allclose

import jhvp

# ---- an Equinox model as the differentiated primal (problem 1) ---------------------------------


def _eqx_problem(seed=0):
    model = eqx.nn.MLP(3, 2, 6, 2, activation=jax.nn.tanh, key=jax.random.PRNGKey(seed))
    model = jax.tree.map(lambda a: a.astype(DTYPE) if eqx.is_inexact_array(a) else a, model)
    x, y = rand(seed + 1, (5, 3)), rand(seed + 2, (5, 2))

    def loss(m, x, y):
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    return loss, model, x, y


def _partitioned_reference(loss, model, x, y, v):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grad = jax.grad(lambda p: loss(eqx.combine(p, static), x, y))
    return jax.jvp(grad, (params,), (v,))[1]


def test_equinox_model_as_primal_hvp_value_grad_and_operator():
    loss, model, x, y = _eqx_problem()
    params = eqx.filter(model, eqx.is_inexact_array)
    v = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    expected = _partitioned_reference(loss, model, x, y, v)

    hv = jhvp.hvp(loss, (model, x, y), v)
    assert jax.tree.structure(hv) == jax.tree.structure(params)
    tree_allclose(hv, expected)

    value, grad, hv2 = jhvp.value_grad_hvp(loss, (model, x, y), v)
    tree_allclose(hv2, expected)
    tree_allclose(value, loss(model, x, y))
    tree_allclose(grad, eqx.filter_grad(loss)(model, x, y))

    op = jhvp.hessian_operator(loss, (model, x, y))
    tree_allclose(op(v), expected)
    assert jax.tree.structure(op.in_structure()) == jax.tree.structure(params)


def test_tangent_with_the_models_full_structure_is_accepted():
    loss, model, x, y = _eqx_problem(1)
    v = jax.tree.map(lambda p: jnp.ones_like(p), eqx.filter(model, eqx.is_inexact_array))
    full = eqx.combine(v, eqx.filter(model, eqx.is_inexact_array, inverse=True))  # static leaves repeated
    tree_allclose(jhvp.hvp(loss, (model, x, y), full), jhvp.hvp(loss, (model, x, y), v))
    op = jhvp.hessian_operator(loss, (model, x, y))
    tree_allclose(op(full), op(v))


def test_equinox_mlp_matches_dense_hessian():
    loss, model, x, y = _eqx_problem(2)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    v = jax.tree.map(lambda p: jnp.ones_like(p), params)
    expected = dense_hvp(lambda p: loss(eqx.combine(p, static), x, y), (params,), v)
    tree_allclose(jhvp.hvp(loss, (model, x, y), v), expected)


def test_flax_nnx_module_and_state():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 4, rngs=rngs, param_dtype=DTYPE)
            self.b = nnx.Linear(4, 1, rngs=rngs, param_dtype=DTYPE)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    net, x = Net(nnx.Rngs(0)), rand(3, (6, 3))
    graphdef, state = nnx.split(net)

    def state_loss(state, x):
        return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

    v = jax.tree.map(jnp.ones_like, state)
    expected = dense_hvp(state_loss, (state, x), v)
    tree_allclose(jhvp.hvp(state_loss, (state, x), v), expected)
    # The module itself as the primal (NNX modules are pytrees).
    hv = jhvp.hvp(lambda m, x: jnp.mean(m(x) ** 2), (net, x), jax.tree.map(jnp.ones_like, net))
    tree_allclose(nnx.state(hv), expected)


def test_flax_linen_params():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1, param_dtype=DTYPE)(jnp.tanh(nn.Dense(4, param_dtype=DTYPE)(x)))

    net, x = Net(), rand(4, (6, 3))
    params = net.init(jax.random.PRNGKey(0), x)

    def loss(params, x):
        return jnp.mean(net.apply(params, x) ** 2)

    v = jax.tree.map(jnp.ones_like, params)
    tree_allclose(jhvp.hvp(loss, (params, x), v), dense_hvp(loss, (params, x), v))


# ---- non-array leaves are static (problem 2) ---------------------------------------------------


def test_python_int_data_argument_is_static():
    w, v = rand(0, (4,)), rand(1, (4,))
    got = jhvp.hvp(lambda w, n: jnp.sum(w[:n] ** 3), (w, 2), v)
    expected = jax.jvp(jax.grad(lambda w: jnp.sum(w[:2] ** 3)), (w,), (v,))[1]
    tree_allclose(got, expected)
    got3 = jhvp.hvp(lambda w, n: jnp.sum(w[:n] ** 3), (w, 3), v)  # a new static value: a new trace
    tree_allclose(got3, jax.jvp(jax.grad(lambda w: jnp.sum(w[:3] ** 3)), (w,), (v,))[1])


def test_strings_callables_and_none_among_data():
    def f(w, opts):
        act = opts["act"]
        scale = 2.0 if opts["name"] == "double" else 1.0
        assert opts["nothing"] is None
        return scale * jnp.sum(act(w) ** 2)

    w, v = rand(0, (3,)), rand(1, (3,))
    for name, act in [("double", jnp.sin), ("single", jnp.tanh)]:
        opts = {"act": act, "name": name, "nothing": None}
        got = jhvp.hvp(f, (w, opts), v)
        tree_allclose(got, dense_hvp(f, (w, opts), v))


def test_static_leaves_inside_the_differentiated_primal():
    # An int and a callable inside the differentiated dict are held fixed; results have None there.
    p = {"w": rand(0, (3,)), "n": 2, "act": jnp.sin}
    f = lambda p: jnp.sum(p["act"](p["w"][: p["n"]]) ** 2)  # noqa: E731
    v = {"w": rand(1, (3,)), "n": None, "act": None}
    hv = jhvp.hvp(f, (p,), v)
    assert hv["n"] is None and hv["act"] is None
    expected = jax.jvp(jax.grad(lambda w: jnp.sum(jnp.sin(w[:2]) ** 2)), (p["w"],), (v["w"],))[1]
    tree_allclose(hv["w"], expected)


def test_python_float_primal_is_differentiated():
    hv = jhvp.hvp(lambda x: x**3, (2.0,), 1.0)
    np.testing.assert_allclose(hv, 12.0, rtol=1e-6)


# ---- a pytree f sees new values; a plain closure is a constant, as under jax.jit (problem 3) ----


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Scaled:
    w: jax.Array

    def loss(self, x):
        return jnp.sum(self.w * x**3)


def test_bound_method_of_a_pytree_sees_new_arrays():
    x, v = rand(0, (3,)), jnp.ones(3, DTYPE)
    m = Scaled(jnp.asarray(1.0, DTYPE))
    tree_allclose(jhvp.hvp(m.loss, (x,), v), 6.0 * x)
    m.w = jnp.asarray(10.0, DTYPE)
    tree_allclose(jhvp.hvp(m.loss, (x,), v), 60.0 * x)
    op = jhvp.hessian_operator(m.loss, (x,))
    tree_allclose(op(v), 60.0 * x)


def test_fresh_partial_and_fresh_module_do_not_retrace():
    body, traces = counting(lambda scale, x: scale * jnp.sum(x**3))
    x, v = rand(0, (3,)), jnp.ones(3, DTYPE)
    for s in (1.0, 2.0, 3.0):
        hv = jhvp.hvp(jax.tree_util.Partial(body, jnp.asarray(s, DTYPE)), (x,), v)
        tree_allclose(hv, 6.0 * s * x)
    assert len(traces) == 1

    class Cubic(eqx.Module):
        scale: jax.Array

        def __call__(self, x):
            traces.append(1)
            return self.scale * jnp.sum(x**3)

    traces.clear()
    for s in (1.0, 2.0):
        tree_allclose(jhvp.hvp(Cubic(jnp.asarray(s, DTYPE)), (x,), v), 6.0 * s * x)
    assert len(traces) == 1


class Plain:
    def __init__(self, w):
        self.w = w

    def loss(self, x):
        return self.w * jnp.sum(x**3)


def test_plain_object_state_is_a_compile_time_constant_like_jax_jit():
    x, v = rand(0, (3,)), jnp.ones(3, DTYPE)
    m = Plain(1.0)
    jitted = jax.jit(lambda x: jax.jvp(jax.grad(m.loss), (x,), (v,))[1])
    first, first_jit = jhvp.hvp(m.loss, (x,), v), jitted(x)
    m.w = 10.0
    # Documented: exactly jax.jit's behaviour (pass the state as an argument, or use a pytree).
    tree_allclose(jhvp.hvp(m.loss, (x,), v), first)
    tree_allclose(jitted(x), first_jit)
    tree_allclose(first, first_jit)


# ---- aux comes back as f returned it (problem 4) -----------------------------------------------


def test_aux_is_returned_unchanged():
    x = rand(0, (3,))

    def f(x):
        return jnp.sum(x**2), {"count": 3, "name": "mse", "pred": 2 * x, "flag": True}

    for call in (
        lambda: jhvp.hvp(f, (x,), x, has_aux=True)[1],
        lambda: jhvp.vhp(f, (x,), x, has_aux=True)[1],
        lambda: jhvp.value_grad_hvp(f, (x,), x, has_aux=True)[0][1],
        lambda: jhvp.hessian_operator(f, (x,), has_aux=True).aux,
    ):
        aux = call()
        assert type(aux["count"]) is int and aux["count"] == 3
        assert aux["name"] == "mse" and aux["flag"] is True
        tree_allclose(aux["pred"], 2 * x)


# ---- complex primals are rejected (problem 8) --------------------------------------------------


def test_complex_primal_is_rejected_with_the_fix():
    z = jnp.ones(3, jnp.complex128 if X64 else jnp.complex64)
    with pytest.raises(TypeError, match=r"primals\[0\] is complex.*real and imaginary parts"):
        jhvp.hvp(lambda z: jnp.sum(jnp.abs(z) ** 2), (z,), z)
    with pytest.raises(TypeError, match=r"primals\[0\]\['z'\] is complex"):
        jhvp.hessian_operator(lambda p: jnp.sum(jnp.abs(p["z"]) ** 2), ({"z": z},))


def test_integer_array_in_a_model_says_how_to_hold_it_fixed():
    p = {"w": rand(0, (3,)), "steps": jnp.arange(3)}
    with pytest.raises(TypeError, match=r"primals\[0\]\['steps'\] has dtype int.*hold it fixed"):
        jhvp.hvp(lambda p: jnp.sum(p["w"] ** 2), (p,), {"w": p["w"], "steps": p["w"]})


def test_partial_with_static_arguments():
    f = jax.tree_util.Partial(functools.partial(lambda k, x: jnp.sum(x ** k)), 3)
    x = rand(0, (3,))
    tree_allclose(jhvp.hvp(f, (x,), jnp.ones(3, DTYPE)), 6.0 * x)
