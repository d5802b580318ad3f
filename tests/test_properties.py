"""Hypothesis properties of H·v: symmetry, linearity, and agreement of the routes."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import DTYPE, X64, rosenbrock
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import jhvp

N = 6


def tree_vdot(a, b):
    """The real inner product of two pytrees of one structure."""
    return sum(jnp.vdot(x, y).real for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
TOL = 1e-9 if X64 else 2e-3
finite = st.floats(-2.0, 2.0, allow_nan=False, width=32)
vec = arrays(np.float64, (N,), elements=finite)


def f(p):
    return rosenbrock(p["x"]) + jnp.sum(jnp.sin(p["x"]) * p["y"] ** 2)


def tree(a, b):
    return {"x": jnp.asarray(a, DTYPE), "y": jnp.asarray(b, DTYPE)}


def close(a, b, scale):
    assert abs(float(a) - float(b)) <= TOL * (1.0 + float(scale)), (a, b)


@settings(max_examples=25, deadline=None)
@given(vec, vec, vec, vec, vec, vec)
def test_symmetry(x, y, u1, u2, v1, v2):
    p, u, v = tree(x, y), tree(u1, u2), tree(v1, v2)
    hu, hv = jhvp.hvp(f, (p,), u), jhvp.hvp(f, (p,), v)
    a, b = tree_vdot(u, hv), tree_vdot(v, hu)
    close(a, b, abs(a) + abs(b))


@settings(max_examples=25, deadline=None)
@given(vec, vec, vec, vec, vec, vec, st.floats(-3, 3, width=32), st.floats(-3, 3, width=32))
def test_linearity(x, y, u1, u2, v1, v2, alpha, beta):
    p, u, v = tree(x, y), tree(u1, u2), tree(v1, v2)
    combo = {k: alpha * u[k] + beta * v[k] for k in u}
    lhs = jhvp.hvp(f, (p,), combo)
    hu, hv = jhvp.hvp(f, (p,), u), jhvp.hvp(f, (p,), v)
    for k in lhs:
        rhs = alpha * hu[k] + beta * hv[k]
        scale = float(jnp.max(jnp.abs(alpha * hu[k])) + jnp.max(jnp.abs(beta * hv[k])))
        np.testing.assert_allclose(lhs[k], rhs, atol=TOL * (1 + scale), rtol=0)


@settings(max_examples=25, deadline=None)
@given(vec, vec, vec, vec)
def test_routes_agree_and_hvp_equals_vhp(x, y, v1, v2):
    p, v = tree(x, y), tree(v1, v2)
    ref = jhvp.hvp(f, (p,), v)
    others = [jhvp.vhp(f, (p,), v), jhvp.hvp(f, (p,), v, mode="rev_rev"),
              jhvp.hvp(f, (p,), v, mode="rev_fwd")]
    for other in others:
        for k in ref:
            scale = float(jnp.max(jnp.abs(ref[k])))
            np.testing.assert_allclose(other[k], ref[k], atol=TOL * (1 + scale), rtol=0)
