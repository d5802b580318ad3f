"""Composition: jit, vmap, grad-of-hvp, custom_vjp, checkpoint, and sharded inputs."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from helpers import MODES, X64, dense_hvp, mlp_problem, rand, random_like, rosenbrock, tree_allclose

import jhvp


@pytest.mark.parametrize("mode", MODES)
def test_inside_user_jit(mode):
    f, primals = mlp_problem()
    v = random_like(primals[0], 1)

    @jax.jit
    def step(params, x, y, v):
        return jhvp.hvp(f, (params, x, y), v, mode=mode)

    tree_allclose(step(*primals, v), dense_hvp(f, primals, v))


@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_a_stack_of_tangents(mode):
    x = rand(0, (5,))
    V = rand(1, (3, 5))
    got = jax.vmap(lambda v: jhvp.hvp(rosenbrock, (x,), v, mode=mode))(V)
    H = jax.hessian(rosenbrock)(x)
    tree_allclose(got, V @ H.T)


def test_vmap_over_primals():
    X = rand(2, (4, 5))
    v = rand(3, (5,))
    got = jax.vmap(lambda x: jhvp.hvp(rosenbrock, (x,), v))(X)
    expected = jnp.stack([jax.hessian(rosenbrock)(x) @ v for x in X])
    tree_allclose(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_grad_of_hvp_is_third_order(mode):
    # f = Σ x³/6 ⇒ H·v = x ⊙ v ⇒ ∇_x <u, H·v> = u ⊙ v exactly.
    f = lambda x: jnp.sum(x**3) / 6.0  # noqa: E731
    x, v, u = rand(0, (4,)), rand(1, (4,)), rand(2, (4,))
    g = jax.grad(lambda x: jnp.vdot(u, jhvp.hvp(f, (x,), v, mode=mode)))(x)
    tree_allclose(g, u * v)
    # And against a dense third-derivative reference on a non-polynomial function.
    g = jax.grad(lambda x: jnp.vdot(u, jhvp.hvp(rosenbrock, (x,), v, mode=mode)))(x)
    expected = jnp.einsum("ijk,i,j->k", jax.jacfwd(jax.hessian(rosenbrock))(x), u, v)
    tree_allclose(g, expected)


@jax.custom_vjp
def softplus_sum(x):
    return jnp.sum(jnp.logaddexp(x, 0.0))


def _sp_fwd(x):
    # Calls the custom_vjp function itself: eager jvp-of-grad fails on this, jitted succeeds.
    return softplus_sum(x), x


def _sp_bwd(x, ct):
    return (ct * jax.nn.sigmoid(x),)


softplus_sum.defvjp(_sp_fwd, _sp_bwd)


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev"])
def test_custom_vjp(mode):
    x, v = rand(0, (4,)), rand(1, (4,))
    # The hand-written eager route fails on this function ...
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(jax.grad(softplus_sum), (x,), (v,))
    # ... jhvp (compiled) does not, and gives the exact H = diag(σ'(x)).
    s = jax.nn.sigmoid(x)
    tree_allclose(jhvp.hvp(softplus_sum, (x,), v, mode=mode), s * (1 - s) * v)
    tree_allclose(jhvp.hessian_operator(softplus_sum, (x,))(v), s * (1 - s) * v)


def test_custom_vjp_with_rev_fwd_says_which_mode_to_use():
    x = rand(0, (4,))
    with pytest.raises(TypeError, match="mode='rev_fwd'.*custom_vjp.*'fwd_rev'"):
        jhvp.hvp(softplus_sum, (x,), x, mode="rev_fwd")


@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_function(mode):
    f, primals = mlp_problem()
    v = random_like(primals[0], 2)
    tree_allclose(jhvp.hvp(jax.checkpoint(f), primals, v, mode=mode), dense_hvp(f, primals, v))


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jhvp
    from jhvp._typing import MODES
    assert jax.device_count() == 8, jax.devices()
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    tol = 1e-9 if dt == jnp.float64 else 2e-4

    def loss(params, x, y):
        h = jnp.tanh(x @ params["w1"])
        return jnp.mean((h @ params["w2"] - y) ** 2)

    k = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    params = {"w1": jax.random.normal(next(k), (16, 32), dt), "w2": jax.random.normal(next(k), (32, 4), dt)}
    x = jax.random.normal(next(k), (64, 16), dt)
    y = jax.random.normal(next(k), (64, 4), dt)
    v = {"w1": jax.random.normal(next(k), (16, 32), dt), "w2": jax.random.normal(next(k), (32, 4), dt)}
    expected = jax.jit(lambda p, v: jax.jvp(jax.grad(lambda p: loss(p, x, y)), (p,), (v,))[1])(params, v)

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    # Data parallel: the batch sharded over "data"; parameters sharded along "model".
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
    ps = {"w1": jax.device_put(params["w1"], NamedSharding(mesh, P(None, "model"))),
          "w2": jax.device_put(params["w2"], NamedSharding(mesh, P("model", None)))}
    vs = jax.tree.map(lambda a, b: jax.device_put(a, b.sharding), v, ps)
    for mode in MODES:
        hv = jhvp.hvp(loss, (ps, xs, ys), vs, mode=mode)
        for name in hv:
            np.testing.assert_allclose(hv[name], expected[name], rtol=tol, atol=tol)
            # The result keeps the parameters' sharding.
            assert hv[name].sharding.is_equivalent_to(ps[name].sharding, hv[name].ndim), (
                name, hv[name].sharding, ps[name].sharding)
    op = jhvp.hessian_operator(loss, (ps, xs, ys))
    hv = op(vs)
    for name in hv:
        np.testing.assert_allclose(hv[name], expected[name], rtol=tol, atol=tol)
        assert hv[name].sharding.is_equivalent_to(ps[name].sharding, hv[name].ndim), name
    # Inside a user's jit with explicit shardings, and under vmap of a tangent stack.
    step = jax.jit(lambda p, x, y, v: jhvp.hvp(loss, (p, x, y), v))
    hv = step(ps, xs, ys, vs)
    np.testing.assert_allclose(hv["w2"], expected["w2"], rtol=tol, atol=tol)
    # A dataset sharded along N, cut into 4 batches of 16 inside the program: the same Hessian,
    # the products laid out like the parameters, and the same top eigenvalue.
    data = jhvp.batches(xs, ys, batch_size=16)
    op = jhvp.hessian_operator(loss, (ps,), data=data)
    hv = jax.jit(lambda op, v: op @ v)(op, vs)
    for name in hv:
        np.testing.assert_allclose(hv[name], expected[name], rtol=tol, atol=tol)
        assert hv[name].sharding.is_equivalent_to(ps[name].sharding, hv[name].ndim), name
    top = jhvp.curvature.eigh(op, jax.random.key(0), 1, num_matvecs=20).eigenvalues
    want = jhvp.curvature.eigh(jhvp.hessian_operator(loss, (params, x, y)), jax.random.key(0), 1,
                               num_matvecs=20).eigenvalues
    np.testing.assert_allclose(top, want, rtol=10 * tol)
    print("SHARDED-OK")
    """
)


@pytest.mark.slow
def test_sharded_inputs_on_8_host_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_ENABLE_X64"] = "1" if X64 else "0"
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "SHARDED-OK" in out.stdout
