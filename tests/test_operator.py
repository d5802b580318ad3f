"""HessianOperator: equals hvp, passes through jit and vmap, keeps residuals as leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    DTYPE,
    STRATEGIES,
    dense_hvp,
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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_operator_equals_hvp_and_dense(strategy):
    f, primals = mlp_problem()
    op = jhvp.hessian_operator(f, primals, strategy=strategy)
    for seed in range(3):
        v = random_like(primals[0], seed)
        tree_allclose(op(v), jhvp.hvp(f, primals, v))
        tree_allclose(op @ v, dense_hvp(f, primals, v))
    tree_allclose(op.value, f(*primals))
    tree_allclose(op.grad, jax.grad(f)(*primals))
    assert op.aux is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tuple_argnums_and_aux(strategy):
    primals = two_arg_primals()

    def f_aux(a, b):
        return two_arg(a, b), jnp.sum(b["u"])

    op = jhvp.hessian_operator(f_aux, primals, argnums=(0, 1), has_aux=True, strategy=strategy)
    v = random_like(primals, seed=2)
    tree_allclose(op(v), dense_hvp(two_arg, primals, v, (0, 1)))
    tree_allclose(op.aux, jnp.sum(primals[1]["u"]))


def test_pytree_params_and_as_matrix():
    f, primals = model_problem()
    op = jhvp.hessian_operator(f, primals)
    H = op.as_matrix()
    n = op.shape[0]
    assert H.shape == (n, n)
    flat, unravel = jax.flatten_util.ravel_pytree(primals[0])
    dense = jax.hessian(lambda z: f(unravel(z), *primals[1:]))(flat)
    tree_allclose(H, dense)


def test_quadratic_matrix_is_exact_and_transpose_is_itself():
    f, H = quadratic(5)
    op = jhvp.hessian_operator(f, (rand(3, (5,)),))
    tree_allclose(op.as_matrix(), H)
    assert op.transpose() is op and op.T is op


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_operator_as_jit_argument_has_no_baked_constants(strategy):
    f, primals = mlp_problem()
    op = jhvp.hessian_operator(f, primals, strategy=strategy)
    v = random_like(primals[0], 1)
    apply = jax.jit(lambda op, v: op @ v)
    tree_allclose(apply(op, v), jhvp.hvp(f, primals, v))
    # The stored arrays enter as arguments (pytree leaves), not as constants of the program.
    closed = jax.make_jaxpr(lambda op, v: op @ v)(op, v)
    assert closed.consts == []
    assert len(jax.tree.leaves(op)) > len(jax.tree.leaves(primals[0]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vmap_over_a_stack_of_tangents(strategy):
    op = jhvp.hessian_operator(rosenbrock, (rand(0, (6,)),), strategy=strategy)
    V = rand(1, (4, 6))
    expected = jnp.stack([jhvp.hvp(rosenbrock, (rand(0, (6,)),), v) for v in V])
    tree_allclose(jax.vmap(op)(V), expected)
    tree_allclose(jax.vmap(lambda v: op @ v)(V), expected)


def test_operator_built_inside_jit_and_used_with_cg():
    f, H = quadratic(6)
    H = H + 6.0 * jnp.eye(6, dtype=DTYPE)  # make it positive definite

    def g(x):
        return f(x) + 3.0 * jnp.sum(x**2)

    @jax.jit
    def newton_step(x):
        op = jhvp.hessian_operator(g, (x,))
        step, _ = jax.scipy.sparse.linalg.cg(op, op.grad, tol=1e-10)
        return x - step

    x0 = rand(4, (6,))
    x1 = newton_step(x0)
    np.testing.assert_allclose(np.asarray(jax.grad(g)(x1)), 0.0, atol=1e-3 if DTYPE == jnp.float32 else 1e-8)


def test_auto_picks_recompute_for_elementwise_and_linearize_for_matmul():
    # Rosenbrock is memory-bound: stored residuals cost more to read than to recompute.
    op = jhvp.hessian_operator(rosenbrock, (jnp.ones(100_000, DTYPE),))
    assert op._apply.func.func.__name__ == "_apply_recompute"
    f, primals = mlp_problem(sizes=(64, 128, 128, 8), batch=64)
    op = jhvp.hessian_operator(f, primals)
    assert op._apply.func.__name__ == "_apply_linearized"


@pytest.mark.parametrize("problem", ["rosenbrock", "mlp"])
def test_cost_model_reads_the_same_flops_and_bytes_as_a_default_compilation(problem):
    # The "auto" choice compiles both candidate programs for their cost only, with cheaper
    # code generation on the CPU: the flops and bytes it reads must be those of the program
    # XLA compiles with its default options.
    from jhvp import _strategy

    if problem == "rosenbrock":
        f, primals = rosenbrock, (jnp.ones(100_000, DTYPE),)
    else:
        f, primals = mlp_problem(sizes=(64, 128, 128, 8), batch=64)
    grad = jax.grad(f)
    x = primals[0]

    def fresh(x, v):
        return jax.jvp(lambda y: grad(y, *primals[1:]), (x,), (v,))[1]

    default = jax.jit(fresh).lower(x, x).compile().cost_analysis()
    expected = default["flops"] / _strategy._FLOPS_PER_BYTE + default["bytes accessed"]
    assert _strategy.estimated_cost(fresh, x, x) == pytest.approx(expected, rel=1e-12)
