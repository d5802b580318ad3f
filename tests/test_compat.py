"""jhvp.compat on its own (no torch needed): torch's test families against JAX references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, rand, rosenbrock, tree_allclose

from jhvp import compat

x4 = rand(0, (4,))
v4 = rand(1, (4,))


def foo(a):
    return 3 * jnp.exp(a[:3]).sum()


def test_all_in_torch_order():
    assert compat.__all__ == ["vjp", "jvp", "jacobian", "hessian", "hvp", "vhp"]


@pytest.mark.parametrize("api", ["hvp", "vhp"])
def test_hessian_products_match_dense_hessian(api):
    out, hv = getattr(compat, api)(rosenbrock, x4, v4)
    tree_allclose(out, rosenbrock(x4))
    tree_allclose(hv, jax.hessian(rosenbrock)(x4) @ v4)


@pytest.mark.parametrize("api", ["hvp", "vhp"])
def test_tuple_inputs_give_tuple_results(api):
    f = lambda a, b: jnp.sum(jnp.exp(a + 3 * b[:3]))
    a, b = rand(2, (3,)), rand(3, (4,))
    va, vb = rand(4, (3,)), rand(5, (4,))
    out, (ha, hb) = getattr(compat, api)(f, (a, b), (va, vb))
    H = jax.hessian(f, argnums=(0, 1))(a, b)
    tree_allclose(ha, H[0][0] @ va + H[0][1] @ vb)
    tree_allclose(hb, H[1][0] @ va + H[1][1] @ vb)


def test_jvp_vjp_jacobian_agree():
    f = lambda x: x**3 + x.sum()
    J = compat.jacobian(f, x4)
    tree_allclose(J, jax.jacobian(f)(x4))
    tree_allclose(compat.jvp(f, x4, v4)[1], J @ v4)
    tree_allclose(compat.vjp(f, x4, v4)[1], v4 @ J)


def test_hessian_nested_tuples():
    f = lambda x, y: jnp.sum(2 * x**2 + 3 * y**2)
    H = compat.hessian(f, (jnp.ones(2, DTYPE), jnp.ones(2, DTYPE)))
    assert isinstance(H, tuple) and all(isinstance(row, tuple) for row in H)
    tree_allclose(H, ((4 * jnp.eye(2), jnp.zeros((2, 2))), (jnp.zeros((2, 2)), 6 * jnp.eye(2))))


def test_scalar_inputs_python_floats_and_numpy():
    out, hv = compat.hvp(lambda x: jnp.exp(x).sum(), 0.5)  # v=None: single element
    np.testing.assert_allclose(hv, np.exp(0.5), rtol=1e-6)
    out, hv = compat.hvp(lambda x: jnp.sum(x**3), np.array([1.0, 2.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(hv, [6.0, 12.0], rtol=1e-6)


def test_errors_with_torch_messages():
    with pytest.raises(TypeError, match=r"The inputs given to hvp must be either a Tensor or a tuple of Tensors but the value at index 1 has type <class 'int'>\."):
        compat.hvp(foo, (x4, 2), v4)
    with pytest.raises(TypeError, match=r"The outputs of the user-provided function given to hvp must"):
        compat.hvp(lambda a: (a, "bar"), x4, v4)
    with pytest.raises(RuntimeError, match=r"The Tensor returned by the function given to hvp should contain a single element"):
        compat.hvp(lambda a: 3 * a, x4, v4)
    with pytest.raises(RuntimeError, match=r"The function given to vhp should return a single Tensor"):
        compat.vhp(lambda a: (a.sum(), a.sum()), x4, v4)
    with pytest.raises(RuntimeError, match=r"v has invalid size: should be torch.Size\(\[4\]\) but got torch.Size\(\[5\]\)\."):
        compat.hvp(foo, x4, jnp.ones(5))
    with pytest.raises(RuntimeError, match=r"v is a tuple of invalid length: should be 2 but got 1\."):
        compat.hvp(lambda a, b: jnp.sum(a * b), (x4, x4), (v4,))
    with pytest.raises(RuntimeError, match=r"The vector v can only be None if the input to the user-provided function is a single Tensor with a single element\."):
        compat.hvp(foo, x4)
    with pytest.raises(RuntimeError, match=r"The vector v can only be None if the user-provided function returns a single Tensor"):
        compat.vjp(lambda a: 2 * a, x4)
    with pytest.raises(RuntimeError, match="only Tensors of floating point dtype can require gradients"):
        compat.hvp(lambda a: a.sum(), jnp.arange(3), jnp.ones(3))


def test_v_is_checked_before_func_in_hvp_and_after_in_vjp():
    bad_out = lambda a: (a, "bar")
    with pytest.raises(RuntimeError, match="v has invalid size"):
        compat.hvp(bad_out, x4, jnp.ones(5))
    with pytest.raises(TypeError, match="The outputs of the user-provided function given to vjp"):
        compat.vjp(bad_out, x4, jnp.ones(5))
    with pytest.raises(TypeError, match="The outputs of the user-provided function given to vjp"):
        compat.vjp(bad_out, x4, (v4, "v"))


def test_strategy_errors_are_assertion_errors_even_under_python_O():
    with pytest.raises(AssertionError, match=r'Expected strategy to be either "forward-mode" or "reverse-mode"\. Hint'):
        compat.jacobian(foo, (x4, 2), strategy="sideways")  # strategy is checked before inputs
    with pytest.raises(TypeError, match="The inputs given to hessian"):
        compat.hessian(foo, (x4, 2), outer_jacobian_strategy="sideways")  # inputs first
    with pytest.raises(AssertionError, match=r'^Expected strategy to be either "forward-mode" or "reverse-mode"\.$'):
        compat.hessian(foo, x4, outer_jacobian_strategy="sideways")
    with pytest.raises(NotImplementedError, match="isonly implemented for `vectorize=True`"):
        compat.jacobian(foo, x4, strategy="forward-mode")
    with pytest.raises(RuntimeError, match="`strict=True` and `vectorized=True` are not supported together"):
        compat.jacobian(foo, x4, strict=True, vectorize=True)


def test_strict_mode():
    sg = jax.lax.stop_gradient
    with pytest.raises(RuntimeError, match="Output 0 of the user-provided function does not require gradients"):
        compat.hvp(lambda a: sg(a).sum(), x4, v4, strict=True)
    _, hv = compat.hvp(lambda a: sg(a).sum(), x4, v4)
    np.testing.assert_array_equal(hv, 0.0)
    with pytest.raises(RuntimeError, match="The output of the user-provided function is independent of input 1"):
        compat.vhp(lambda a, b: jnp.sum(a**3), (x4, x4), (v4, v4), strict=True)
    with pytest.raises(RuntimeError, match="jacobian of the user-provided function with respect to input 0 is independent"):
        compat.hvp(lambda a: jnp.sum(3 * a), x4, v4, strict=True)
    with pytest.raises(RuntimeError, match="Output 0 of the user-provided function is independent of input 1"):
        compat.hessian(lambda a, b: jnp.sum(a**3) + jnp.sum(b**3), (x4, x4), strict=True)
    with pytest.raises(RuntimeError, match="The jacobian of the user-provided function is independent of input 0. This is not allowed in strict mode when create_graph=True"):
        compat.jvp(lambda a: 2 * a, x4, v4, strict=True, create_graph=True)
    # Integer casts cut the connection, as they carry no derivative.
    with pytest.raises(RuntimeError, match="Output 0 of the user-provided function does not require gradients"):
        compat.vjp(lambda a: a.astype(jnp.int32).astype(a.dtype), x4, v4, strict=True)
    # Through jit, checkpoint and custom_jvp bodies.
    g = jax.jit(lambda a, b: jnp.sum(jnp.sin(a) ** 2))
    with pytest.raises(RuntimeError, match="independent of input 1"):
        compat.hvp(jax.checkpoint(g), (x4, x4), (v4, v4), strict=True)
    compat.hvp(lambda a: jax.nn.softplus(a).sum(), x4, v4, strict=True)


def test_create_graph_false_detaches():
    g = jax.grad(lambda x: compat.hvp(rosenbrock, x, v4)[1].sum())(x4)
    np.testing.assert_array_equal(g, 0.0)
    g = jax.grad(lambda x: compat.hvp(rosenbrock, x, v4, create_graph=True)[1].sum())(x4)
    expected = jax.grad(lambda x: (jax.hessian(rosenbrock)(x) @ v4).sum())(x4)
    tree_allclose(g, expected)


def test_same_func_same_shapes_is_not_traced_again():
    calls = []

    def f(a):
        calls.append(1)
        return jnp.sum(jnp.sin(a) * a)

    for api in ("hvp", "vhp", "jvp", "vjp"):
        v = v4 if api != "vjp" else jnp.ones((), DTYPE)
        getattr(compat, api)(f, x4, v)
        n = len(calls)
        getattr(compat, api)(f, x4 * 2, v)
        assert len(calls) == n, api
    compat.hessian(f, x4)
    n = len(calls)
    compat.hessian(f, x4 + 1)
    compat.jacobian(f, x4 + 1)
    m = len(calls)
    compat.jacobian(f, x4 + 2)
    assert len(calls) == m and m > n


def test_inside_a_user_jit_and_vmap():
    step = jax.jit(lambda x, v: compat.hvp(rosenbrock, x, v)[1])
    tree_allclose(step(x4, v4), jax.hessian(rosenbrock)(x4) @ v4)
    V = jnp.stack([v4, 2 * v4])
    got = jax.vmap(lambda v: compat.vhp(rosenbrock, x4, v)[1])(V)
    tree_allclose(got, V @ jax.hessian(rosenbrock)(x4))


def test_strict_mode_follows_a_carry_chain_through_scan():
    # z depends on a only through two iterations of the carry (a -> y -> z); torch accepts the
    # equivalent Python loop under strict=True (tests/test_compat_torch.py checks that side).
    def chain(a):
        def body(carry, _):
            x, y, _z = carry
            return (x, x, y), None

        (_, _, z), _ = jax.lax.scan(body, (a, jnp.ones_like(a), jnp.ones_like(a)), None, length=3)
        return 2 * z

    a, v = rand(0, (4,)), rand(1, (4,))
    out, vj = compat.vjp(chain, a, v, strict=True)
    tree_allclose(vj, 2 * v)
    tree_allclose(compat.jacobian(chain, a, strict=True), 2 * jnp.eye(4, dtype=DTYPE))

    def cut(a):  # the same loop with the chain cut: strict must still raise
        def body(carry, _):
            x, y, _z = carry
            return (x, jax.lax.stop_gradient(x), y), None

        (_, _, z), _ = jax.lax.scan(body, (a, jnp.ones_like(a), jnp.ones_like(a)), None, length=3)
        return 2 * z

    with pytest.raises(RuntimeError, match="Output 0 of the user-provided function does not require gradients"):
        compat.vjp(cut, a, v, strict=True)
