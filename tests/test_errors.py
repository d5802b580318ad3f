"""Every documented error of the native API, with its message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, MODES, mlp_problem, random_like, rosenbrock

import jhvp

x3 = jnp.ones(3, DTYPE)


def test_non_scalar_output_names_shape_and_fix():
    with pytest.raises(TypeError, match=r"jhvp.hvp: f must return a real scalar.*shape \(3,\).*\.sum\(\)"):
        jhvp.hvp(lambda x: x**2, (x3,), x3)


def test_tuple_output_without_has_aux_suggests_it():
    with pytest.raises(TypeError, match="pass has_aux=True"):
        jhvp.hvp(lambda x: (jnp.sum(x), x), (x3,), x3)


def test_has_aux_without_pair():
    with pytest.raises(TypeError, match=r"with has_aux=True, f must return a pair"):
        jhvp.hvp(lambda x: jnp.sum(x), (x3,), x3, has_aux=True)


def test_integer_output():
    with pytest.raises(TypeError, match="real floating-point scalar, got dtype int"):
        jhvp.hvp(lambda x: jnp.sum(x).astype(jnp.int32), (x3,), x3)


def test_tangent_structure_mismatch_names_first_leaf_path():
    f, primals = mlp_problem()
    v = random_like(primals[0])
    del v["layer1"]["b"]
    with pytest.raises(ValueError, match=r"tangents\['layer1'\]\['b'\] with shape \(3,\) is missing"):
        jhvp.hvp(f, primals, v)


def test_tangent_left_out_at_an_integer_leaf_names_the_integer_leaf():
    # Tangents usually omit (or hold None at) an integer leaf: the error is about that leaf.
    p = {"w": x3, "steps": jnp.arange(3)}
    f = lambda p: jnp.sum(p["w"] ** 3) * jnp.sum(p["steps"])
    for v in ({"w": x3, "steps": None}, {"w": x3}):
        with pytest.raises(TypeError, match=r"primals\[0\]\['steps'\] has dtype int"):
            jhvp.hvp(f, (p,), v)


def test_tangent_missing_trailing_leaf():
    with pytest.raises(ValueError, match=r"tangents\[1\] with shape \(3,\) is missing"):
        jhvp.hvp(lambda a, b: jnp.sum(a * b), (x3, x3), (x3,), argnums=(0, 1))


def test_tangent_container_type_mismatch():
    with pytest.raises(ValueError, match="containers differ"):
        jhvp.hvp(lambda p: jnp.sum(p[0] * p[1]), ((x3, x3),), [x3, x3])


def test_tangent_shape_mismatch_names_both_shapes():
    f, primals = mlp_problem()
    v = random_like(primals[0])
    v["layer0"]["w"] = v["layer0"]["w"].T
    with pytest.raises(ValueError, match=r"tangents\['layer0'\]\['w'\] has shape \(8, 4\), but the primal it pairs with has shape \(4, 8\)"):
        jhvp.hvp(f, primals, v)


def test_complex_tangent_for_real_primal():
    with pytest.raises(TypeError, match="is complex"):
        jhvp.hvp(lambda x: jnp.sum(x**2), (x3,), jnp.ones(3, jnp.complex64))


def test_integer_differentiated_primal():
    with pytest.raises(TypeError, match=r"primals\[0\]\['a'\] has dtype int(32|64).*argnums"):
        jhvp.hvp(lambda p: jnp.sum(p["a"] ** 2), ({"a": jnp.arange(3)},), {"a": jnp.ones(3)})


def test_integer_data_argument_is_fine_when_not_differentiated():
    hv = jhvp.hvp(lambda x, k: jnp.sum(x**2) * k.astype(x.dtype), (x3, jnp.array(3)), x3)
    np.testing.assert_allclose(hv, 6.0 * np.ones(3))


@pytest.mark.parametrize("argnums", [2, -3, (0, 5)])
def test_argnums_out_of_range(argnums):
    with pytest.raises(ValueError, match=r"argnums=.* is out of range for f called with 2 positional"):
        jhvp.hvp(lambda a, b: jnp.sum(a * b), (x3, x3), x3, argnums=argnums)


def test_argnums_wrong_type_and_repeats():
    with pytest.raises(TypeError, match="`argnums` must be an int or a tuple of ints"):
        jhvp.hvp(lambda a: jnp.sum(a), (x3,), x3, argnums="0")
    with pytest.raises(ValueError, match="must not repeat"):
        jhvp.hvp(lambda a, b: jnp.sum(a * b), (x3, x3), (x3, x3), argnums=(0, 0))


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown mode 'fwd'; valid modes are 'fwd_rev', 'rev_rev', 'rev_fwd'"):
        jhvp.hvp(rosenbrock, (x3,), x3, mode="fwd")


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'lazy'"):
        jhvp.hessian_operator(rosenbrock, (x3,), strategy="lazy")


@pytest.mark.parametrize("primals", [x3, {"x": x3}, None])
def test_primals_must_be_a_tuple(primals):
    with pytest.raises(TypeError, match=r"`primals` must be a tuple \(or list\).*primals=\(x,\)"):
        jhvp.hvp(rosenbrock, primals, x3)


def test_f_not_callable():
    with pytest.raises(TypeError, match="`f` must be callable"):
        jhvp.hvp(3.0, (x3,), x3)


def test_has_aux_must_be_bool():
    with pytest.raises(TypeError, match="`has_aux` must be a bool"):
        jhvp.hvp(rosenbrock, (x3,), x3, has_aux="yes")


def _dynamic_loop(x):
    def cond(c):
        return c[0] < jnp.sum(x) * 10

    def body(c):
        return c[0] + 1.0, jnp.sin(c[1]) * 1.1

    return jax.lax.while_loop(cond, body, (jnp.zeros((), x.dtype), jnp.sum(x)))[1]


@pytest.mark.parametrize("mode", MODES)
def test_while_loop_explains_the_fix(mode):
    with pytest.raises(ValueError, match=r"jhvp.hvp: f contains a `lax.while_loop`.*lax.scan.*fori_loop"):
        jhvp.hvp(_dynamic_loop, (x3,), x3, mode=mode)
    with pytest.raises(ValueError, match="lax.while_loop"):
        jhvp.hessian_operator(_dynamic_loop, (x3,))


def test_operator_rejects_wrong_tangent():
    op = jhvp.hessian_operator(rosenbrock, (x3,))
    with pytest.raises(ValueError, match=r"jhvp.HessianOperator: `tangents` leaf tangents has shape \(4,\)"):
        op(jnp.ones(4, DTYPE))


# ---- one voice: the caller's full API name, every check at every entry point -----------------


@pytest.mark.parametrize("convert", ["to_scipy", "to_lineax"])
def test_bridges_name_themselves_not_the_curvature_package(convert):
    from jhvp import interop

    with pytest.raises(TypeError, match=rf"^jhvp\.{convert}: `op` is a plain callable"):
        getattr(interop, convert)(lambda v: v)
    with pytest.raises(TypeError, match=rf"^jhvp\.{convert}: every leaf of `like`"):
        getattr(interop, convert)(lambda v: v, like={"x": "a string"})


@pytest.mark.parametrize("name", ["trace", "diagonal"])
def test_trace_and_diagonal_check_their_key(name):
    estimator = getattr(jhvp.curvature, name)
    with pytest.raises(TypeError, match=rf"^jhvp\.curvature\.{name}: `key` must be one PRNG key"):
        estimator(lambda v: v, "not a key", num_matvecs=3, like=x3)


@pytest.mark.parametrize("argnums", [(0, 1.0), (0, True), (0.0,)])
def test_argnums_validated_by_type_even_after_an_equal_valid_call(argnums):
    f = lambda a, b: jnp.sum(a * b)
    jhvp.hvp(f, (x3, x3), (x3, x3), argnums=(0, 1))  # (0, 1) == (0, 1.0) == (0, True)
    jhvp.hvp(f, (x3, x3), (x3,), argnums=(0,))
    with pytest.raises(TypeError, match=r"`argnums` must be an int or a tuple of ints"):
        jhvp.hvp(f, (x3, x3), (x3, x3)[: len(argnums)], argnums=argnums)


def test_solve_with_an_integer_b_names_b_and_a_bad_rtol_is_explained():
    with pytest.raises(TypeError, match=r"jhvp\.curvature\.solve: vectors must be real .*`b`"):
        jhvp.curvature.solve(lambda v: v, jnp.arange(3))
    with pytest.raises(TypeError, match=r"jhvp\.curvature\.solve: `rtol` must be a non-negative"):
        jhvp.curvature.solve(lambda v: v, x3, rtol=None)


def test_solve_and_lanczos_accept_vectors_with_the_primals_full_structure():
    # A model with a static leaf: `op @ v` takes v with the full structure (README); so do these.
    params = {"w": jnp.array([1.0, 2.0, 3.0], DTYPE), "act": "cube"}
    f = lambda p: jnp.sum(p["w"] ** 3)
    op = jhvp.hessian_operator(f, (params,))
    full = {"w": jnp.ones(3, DTYPE), "act": "cube"}
    H = np.diag(6.0 * np.array([1.0, 2.0, 3.0]))
    x = jhvp.curvature.solve(op, full, rtol=1e-6).x
    np.testing.assert_allclose(x["w"], np.linalg.solve(H, np.ones(3)), rtol=1e-4)
    out = jhvp.curvature.lanczos(op, full, 3)
    T = np.diag(out.alphas) + np.diag(out.betas[:2], 1) + np.diag(out.betas[:2], -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), np.diag(H), rtol=1e-4)
