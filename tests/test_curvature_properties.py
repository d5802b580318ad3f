"""What every jhvp.curvature estimator promises, written once over a table of the estimators.

`batch_size` never changes a result; the operator is an argument of the compiled program (under
the user's `jax.jit`, and shared by operators of one structure); dict params give the dense
Hessian's result on flat vectors, in the params' structure; results keep the operator's dtype.
"Never changes" is to rounding: the programs compared differ (see helpers.rounding_tol). Each
estimator's accuracy against dense references, and what only it promises, is in its own file.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    DTYPE,
    X64,
    assert_estimates_close,
    assert_rounding_close,
    counting,
    mlp_problem,
    sym_matrix,
)
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp import curvature

KEY = jax.random.key(3)
M = 12  # every estimator's budget: divisible by 3 (hutch++) and by 2 (xtrace, xdiag)
DAMPING = 5.0  # CG's shift: both test operators' spectra lie above -5
# Outliers at both ends, separated from a bulk: eigh and power iteration see gaps.
SPECTRUM = np.concatenate([np.linspace(-1.0, 1.0, 34), [-4.0, -2.5, 2.0, 3.0, 4.5, 6.0]])


def norm(a):
    return np.abs(np.linalg.eigvalsh(a)).max()


# ---- how two results of one estimator compare (flat vectors; `a` the dense float64 matrix) ----


def same_estimates(actual, expected, a):
    assert int(actual.num_matvecs) == int(expected.num_matvecs)
    assert_estimates_close(actual, expected, M)


def same_exact_diagonal(actual, expected, a):
    # Entry i is e_iᵀAe_i, one application: its rounding is on the scale of A, not of A_ii.
    assert_rounding_close(actual.estimate, expected.estimate, steps=1, scale=norm(a))
    np.testing.assert_array_equal(actual.stderr, 0.0)


def same_density(actual, expected, a):
    """Lanczos is backward stable: a few ulps of ‖A‖ a step. Ritz values move by no more than
    that (Weyl), so nodes and grid compare on the spectrum's scale; a weight is a squared
    eigenvector component of T, conditioned by scale/gap to the probe's nearest other node
    (Davis-Kahan); the density sums Gaussians of width σ, which a node shift δ moves by about
    δ/σ of their height (nodes closer than σ trade weight without moving it)."""
    nodes = np.asarray(expected.nodes, np.float64)
    scale = np.abs(nodes).max()
    gap = np.diff(np.sort(nodes, axis=1), axis=1).min()
    grid = np.asarray(expected.grid, np.float64)
    sigma = ((grid[-1] - grid[0]) - (nodes.max() - nodes.min())) / 10  # 5σ past either end
    assert_rounding_close(actual.nodes, expected.nodes, steps=M, scale=scale)
    assert_rounding_close(actual.grid, expected.grid, steps=M)
    assert_rounding_close(actual.weights, expected.weights, steps=M, scale=1.0,
                          amplification=scale / gap)
    assert_rounding_close(actual.density, expected.density, steps=M, amplification=scale / sigma)


def same_eigenpairs(actual, expected, a):
    """Eigenvalues on ‖A‖'s scale (Weyl); vectors up to sign, conditioned by ‖A‖/gap."""
    w, scale = np.linalg.eigvalsh(a), norm(a)
    theta = np.asarray(expected.eigenvalues, np.float64)
    gap = min(np.sort(np.abs(w - t))[1] for t in theta)  # to the nearest eigenvalue but one
    assert_rounding_close(actual.eigenvalues, expected.eigenvalues, steps=M, scale=scale)
    y, z = (np.asarray(r.eigenvectors, np.float64) for r in (actual, expected))
    y = y * np.sign(np.sum(y * z, axis=1))[:, None]
    assert_rounding_close(y, z, steps=M, amplification=scale / gap, scale=1.0)
    assert_rounding_close(actual.residual_norms, expected.residual_norms, steps=M,
                          amplification=scale / gap, scale=scale)
    assert int(actual.num_matvecs) == int(expected.num_matvecs)


def same_lanczos(actual, expected, a):
    scale = norm(a)
    assert_rounding_close(actual.alphas, expected.alphas, steps=M, scale=scale)
    assert_rounding_close(actual.betas, expected.betas, steps=M, scale=scale)
    # The basis spans the Krylov space: conditioned like T's eigenvectors, by ‖A‖ over the
    # smallest β (how nearly the space is invariant).
    beta = np.abs(np.asarray(expected.betas, np.float64)[: M - 1]).min()
    assert_rounding_close(actual.basis, expected.basis, steps=M, amplification=scale / beta,
                          scale=1.0)
    assert int(actual.num_matvecs) == int(expected.num_matvecs)


def same_solution(actual, expected, a):
    """A solve's forward error is κ times its backward error; r = b − Ax moves by A δx."""
    shifted = a + DAMPING * np.eye(len(a))
    kappa, scale = np.linalg.cond(shifted), norm(shifted)
    assert_rounding_close(actual.x, expected.x, steps=M, amplification=kappa)
    assert_rounding_close(actual.residual_norm, expected.residual_norm, steps=M,
                          amplification=kappa,
                          scale=scale * np.linalg.norm(np.asarray(expected.x, np.float64)))
    for field in ("num_steps", "converged", "negative_curvature"):
        np.testing.assert_array_equal(getattr(actual, field), getattr(expected, field))


# ---- the table -----------------------------------------------------------------------------------


class Estimator(NamedTuple):
    run: Callable[..., Any]
    """(op, key, vectors, like, batch_size) -> the result: `vectors` has the structure of v."""
    compare: Callable[..., None]
    """(actual, expected, a): two results with flat vectors agree to rounding."""
    vector_fields: tuple[str, ...] = ()
    """Fields with the structure of v (behind leading axes)."""
    batched: bool = False
    """Whether it takes `batch_size`."""


def start(key, vectors):
    """A random vector with the structure of `vectors`, drawn flat: the same for dict and flat."""
    flat, unravel = ravel_pytree(vectors)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def trace(method):
    return Estimator(lambda op, key, vec, like, bs=None: curvature.trace(
        op, key, num_matvecs=M, method=method, batch_size=bs, like=like), same_estimates,
        batched=True)


def diagonal(method):
    return Estimator(lambda op, key, vec, like, bs=None: curvature.diagonal(
        op, key, num_matvecs=M, method=method, batch_size=bs, like=like), same_estimates,
        ("estimate", "stderr"), batched=True)


ESTIMATORS = {
    "trace-hutchinson": trace("hutchinson"),
    "trace-hutch++": trace("hutch++"),
    "trace-xtrace": trace("xtrace"),
    "diagonal-hutchinson": diagonal("hutchinson"),
    "diagonal-xdiag": diagonal("xdiag"),
    "diagonal_exact": Estimator(
        lambda op, key, vec, like, bs=None: curvature.diagonal_exact(op, batch_size=bs, like=like),
        same_exact_diagonal, ("estimate", "stderr"), batched=True),
    "spectral_density": Estimator(
        lambda op, key, vec, like, bs=None: curvature.spectral_density(
            op, key, num_probes=10, num_matvecs=M, batch_size=bs, like=like),
        same_density, batched=True),
    "eigh": Estimator(
        lambda op, key, vec, like: curvature.eigh(op, key, 3, num_matvecs=M, like=like),
        same_eigenpairs, ("eigenvectors",)),
    # An rtol below rounding: all M iterations run, whatever the rounding.
    "power_iteration": Estimator(
        lambda op, key, vec, like: curvature.power_iteration(op, key, max_iters=M, rtol=1e-30,
                                                             like=like),
        same_eigenpairs, ("eigenvectors",)),
    "lanczos": Estimator(
        lambda op, key, vec, like: curvature.lanczos(op, start(key, vec), M),
        same_lanczos, ("basis",)),
    # rtol = 0: exactly M steps, whatever the rounding.
    "solve": Estimator(
        lambda op, key, vec, like: curvature.solve(op, start(key, vec), damping=DAMPING, rtol=0.0,
                                                   max_steps=M),
        same_solution, ("x",)),
}
BATCHED = [name for name, e in ESTIMATORS.items() if e.batched]


def flat(result, name, vectors):
    """`result` with its fields of the vectors' structure raveled (leading axes kept)."""
    ndim = np.ndim(jax.tree.leaves(vectors)[0])

    def ravel(field):
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(field)]
        lead = leaves[0].shape[: leaves[0].ndim - ndim]
        return np.concatenate([x.reshape(*lead, -1) for x in leaves], axis=-1)

    return result._replace(**{f: ravel(getattr(result, f)) for f in ESTIMATORS[name].vector_fields})


def dense_problem(seed=0, dtype=DTYPE):
    """(a, v -> A v, the vectors' structure): a plain callable on flat vectors."""
    a = sym_matrix(SPECTRUM, seed)
    aj = jnp.asarray(a, dtype)
    return a, lambda v: aj @ v, jnp.zeros(len(a), dtype)


# ---- the properties ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4, 7])
@pytest.mark.parametrize("name", BATCHED)
def test_batch_size_never_changes_the_result(name, batch_size):
    # A chunk of probes and the whole batch are different programs: equal to rounding.
    a, op, like = dense_problem()
    run = ESTIMATORS[name].run
    whole = run(op, KEY, like, like)
    chunked = run(op, KEY, like, like, batch_size)
    ESTIMATORS[name].compare(chunked, whole, a)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_under_jit_with_the_operator_as_an_argument(name):
    f, (params, x, y) = mlp_problem()
    op = jhvp.hessian_operator(f, (params, x, y))
    run = ESTIMATORS[name].run
    inside = jax.jit(lambda op, key: run(op, key, params, None))(op, KEY)
    outside = run(op, KEY, params, None)
    flat_params, unravel = ravel_pytree(params)
    a = np.asarray(jax.hessian(lambda z: f(unravel(z), x, y))(flat_params), np.float64)
    ESTIMATORS[name].compare(flat(inside, name, params), flat(outside, name, params), a)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_operators_of_one_structure_share_one_program(name):
    # The matrix is an argument of the compiled program, not a constant in it: the second
    # operator traces nothing new, and its result is its own (as with the matrix closed over).
    matvec, calls = counting(lambda a, v: a @ v)
    run = ESTIMATORS[name].run
    (a1, _, like), (a2, closed, _) = dense_problem(seed=1), dense_problem(seed=2)
    run(jax.tree_util.Partial(matvec, jnp.asarray(a1, DTYPE)), KEY, like, like)
    traces = len(calls)
    second = run(jax.tree_util.Partial(matvec, jnp.asarray(a2, DTYPE)), KEY, like, like)
    assert len(calls) == traces
    ESTIMATORS[name].compare(second, run(closed, KEY, like, like), a2)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_dict_params_give_the_dense_hessians_result(name):
    # The same probes and start vectors (drawn with the params' structure), through the
    # operator and through the dense Hessian from jax.hessian, applied to the raveled vector:
    # the same result, in the params' shape.
    f, (params, x, y) = mlp_problem()
    flat_params, unravel = ravel_pytree(params)
    dense = jax.jit(jax.hessian(lambda z: f(unravel(z), x, y)))(flat_params)
    run = ESTIMATORS[name].run
    tree = run(jhvp.hessian_operator(f, (params, x, y)), KEY, params, None)
    reference = run(lambda v: unravel(dense @ ravel_pytree(v)[0]), KEY, params, params)
    for field in ESTIMATORS[name].vector_fields:
        value = getattr(tree, field)
        assert jax.tree.structure(value) == jax.tree.structure(params), field
        lead = np.shape(jax.tree.leaves(getattr(reference, field))[0])[:-1]
        for leaf, p in zip(jax.tree.leaves(value), jax.tree.leaves(params), strict=True):
            assert leaf.shape == (*lead, *p.shape), (field, leaf.shape, p.shape)
    ESTIMATORS[name].compare(flat(tree, name, params), flat(reference, name, params),
                             np.asarray(dense, np.float64))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_results_keep_the_operators_dtype(name, dtype):
    if dtype == "float64" and not X64:
        pytest.skip("float64 needs JAX_ENABLE_X64")
    _, op, like = dense_problem(dtype=dtype)
    result = ESTIMATORS[name].run(op, KEY, like, like)
    for leaf in jax.tree.leaves(result):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            assert jnp.result_type(leaf) == jnp.dtype(dtype), (name, jnp.result_type(leaf))
