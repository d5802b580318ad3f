"""jhvp.curvature.trace: Hutchinson, Hutch++ and XTrace against dense traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, rademacher_probe, rosenbrock, sym_matrix
from jax.flatten_util import ravel_pytree

import jhvp
from jhvp import curvature
from jhvp.curvature import _sketch

METHODS = ["hutchinson", "hutch++", "xtrace"]


def matrix(eigenvalues, seed=0):
    return jnp.asarray(sym_matrix(eigenvalues, seed), DTYPE)


def as_op(a):
    return lambda v: a @ v


def low_rank_loss(p):
    """Σ cosh(J p) over dict params, J 2×10: the Hessian Jᵀ diag(cosh(Jp)) J has rank 2."""
    j = jnp.stack([jnp.linspace(-1.0, 1.0, 10, dtype=DTYPE), jnp.cos(jnp.arange(10, dtype=DTYPE))])
    flat = jnp.concatenate([p["a"].reshape(-1), p["b"]])
    return jnp.sum(jnp.cosh(j @ flat))


def many_keys(op_like, method, m, num_keys, **kw):
    """Estimates and stderrs over num_keys keys, vmapped in one jitted program."""
    op, like = op_like
    keys = jax.random.split(jax.random.key(42), num_keys)
    run = jax.jit(jax.vmap(lambda k: curvature.trace(op, k, num_matvecs=m, method=method,
                                                     like=like, **kw)[:2]))
    est, se = run(keys)
    return np.asarray(est, np.float64), np.asarray(se, np.float64)


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_and_stderr_plausible(method):
    a = matrix(1.0 / (1.0 + np.arange(24.0)), seed=1)
    exact = float(np.trace(np.asarray(a, np.float64)))
    est, se = many_keys((as_op(a), jnp.zeros(24, DTYPE)), method, 6, 200)
    spread = est.std(ddof=1)
    assert abs(est.mean() - exact) <= 4 * spread / np.sqrt(est.size)
    # The returned stderr estimates the spread of one estimate over keys.
    factor = 1.5 if method == "hutchinson" else 3.0
    assert spread / factor <= np.median(se) <= spread * factor


def test_low_rank_methods_beat_hutchinson_on_decaying_spectrum():
    a = matrix(0.5 ** np.arange(40.0), seed=2)
    exact = float(np.trace(np.asarray(a, np.float64)))
    errors = {
        method: np.median(np.abs(many_keys((as_op(a), jnp.zeros(40, DTYPE)), method, 12, 64)[0]
                                 - exact))
        for method in METHODS
    }
    assert errors["hutch++"] < errors["hutchinson"] / 2, errors
    assert errors["xtrace"] < errors["hutchinson"] / 2, errors


@pytest.mark.parametrize(("method", "m"), [("hutch++", 6), ("hutch++", 9), ("xtrace", 8)])
def test_exact_on_low_rank_hessian_with_dict_params(method, m):
    # rank 2 ≤ m/3 (hutch++), rank 2 < m/2 − 1 (xtrace: its stderr, a jackknife over m/2 − 1
    # probes, needs those to capture the range too): the sketch captures the whole range.
    params = {"a": jnp.full((2, 3), 0.3, DTYPE), "b": jnp.array([0.1, -0.2, 0.5, 1.0], DTYPE)}
    op = jhvp.hessian_operator(low_rank_loss, (params,))
    flat, unravel = ravel_pytree(params)
    dense = jax.jit(jax.hessian(lambda z: low_rank_loss(unravel(z))))(flat)
    assert np.linalg.matrix_rank(np.asarray(dense, np.float64), tol=1e-4) == 2
    result = curvature.trace(op, jax.random.key(3), num_matvecs=m, method=method)
    exact = np.trace(np.asarray(dense, np.float64))
    np.testing.assert_allclose(float(result.estimate), exact, rtol=1e-8 if X64 else 1e-4)
    assert float(result.stderr) <= (1e-8 if X64 else 1e-3) * abs(exact)
    assert result.num_matvecs == m


@pytest.mark.parametrize("method", METHODS)
def test_rosenbrock_hessian_operator(method):
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, 30), DTYPE)
    op = jhvp.hessian_operator(rosenbrock, (x,))
    exact = float(np.trace(np.asarray(jax.hessian(rosenbrock)(x), np.float64)))
    result = curvature.trace(op, jax.random.key(0), num_matvecs=30, method=method)
    assert result.num_matvecs == 30
    # Unbiased with a sensible stderr: a fixed key lands within a few of them.
    assert abs(float(result.estimate) - exact) <= 5 * float(result.stderr)
    assert float(result.stderr) < 0.2 * abs(exact)


def test_probe_i_depends_only_on_fold_in_key_i():
    # Hutchinson with m probes: probes 0..m-1 are the first m of a longer run.
    a = matrix(np.linspace(1.0, 2.0, 10), seed=6)
    like = jnp.zeros(10, DTYPE)
    short = curvature.trace(as_op(a), jax.random.key(0), num_matvecs=4, method="hutchinson",
                            like=like)
    signs = [np.asarray(rademacher_probe(jax.random.key(0), i, 10, DTYPE), np.float64)
             for i in range(4)]
    dense = np.asarray(a, np.float64)
    expect = np.mean([s @ dense @ s for s in signs])
    np.testing.assert_allclose(float(short.estimate), expect, rtol=1e-10 if X64 else 1e-5)


@pytest.mark.parametrize("one_program", [True, False])
def test_probe_leaves_are_the_bits_of_their_fold_in_keys(one_program, monkeypatch):
    # Probe i, leaf l: sign j of a row is bit j % 32 of word j // 32 of
    # jax.random.bits(fold_in(fold_in(key, i), l)) over the row's words. On one device all
    # leaves' words come from one threefry call (`_one_program_words`); the per-leaf draws
    # (several devices) must give the same signs. Reference: numpy, from jax.random.bits.
    from jhvp import _protocol
    from jhvp.curvature import _vectors

    if not one_program:
        monkeypatch.setattr(_vectors, "_one_program_words", lambda keys, shapes: None)
    shapes = {"a": (), "b": (3,), "c": (5, 40), "d": (2, 3, 33), "e": (70,)}
    struct = {k: jax.ShapeDtypeStruct(v, DTYPE) for k, v in shapes.items()}
    n = sum(int(np.prod(v)) for v in shapes.values())
    op = _protocol.TreeOperator(None, struct, n, jnp.dtype(DTYPE))
    key = jax.random.key(7)
    got = jax.jit(jax.vmap(lambda i: _vectors.rademacher(op, key, i)))(jnp.arange(3))
    for i in range(3):
        probe_key = jax.random.fold_in(key, i)
        for leaf, (name, shape) in enumerate(sorted(shapes.items())):
            full = shape if shape else (1,)
            words = np.asarray(jax.random.bits(jax.random.fold_in(probe_key, leaf),
                                               (*full[:-1], -(-full[-1] // 32)), jnp.uint32))
            j = np.arange(full[-1])
            bit = (words[..., j // 32] >> (j % 32).astype(np.uint32)) & np.uint32(1)
            expect = (1.0 - 2.0 * bit).reshape(shape)
            np.testing.assert_array_equal(np.asarray(got[name][i], np.float64), expect)


@pytest.mark.parametrize("kappa", [1.0, 1e3, 1e6, 1e12])
def test_range_basis_is_orthonormal_and_spans_the_sketch(kappa):
    # Gram-Schmidt on the stack, then the SVD of R: the kept basis is orthonormal to working
    # precision and spans the sketch; singular values at rounding level (kappa = 1e12 in
    # float32) are dropped, never kept as noise. Checked against numpy's SVD of the sketch.
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(500, 8)))
    v, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    s = np.geomspace(1.0, 1.0 / kappa, 8)
    y = jnp.asarray((u * s) @ v.T, DTYPE).T  # the stack of 8 sketch vectors
    basis = jax.jit(_sketch.range_basis)(y)
    q = np.asarray(basis.q, np.float64).T  # columns u_a
    keep = np.asarray(basis.keep)
    eps = float(jnp.finfo(DTYPE).eps)
    tol = 100 * eps
    np.testing.assert_allclose(q[:, keep].T @ q[:, keep], np.eye(int(keep.sum())), atol=tol)
    assert np.all(q[:, ~keep] == 0)
    ref = np.linalg.svd(np.asarray(y, np.float64).T, compute_uv=False)
    np.testing.assert_allclose(np.asarray(basis.sig, np.float64), ref, atol=20 * eps * ref[0])
    assert keep[ref > 100 * eps * ref[0]].all() and not keep[ref < eps * ref[0]].any()
    yt = np.asarray(y, np.float64).T
    # range(Q) = range(yᵀ) up to what was dropped: projecting yᵀ onto Q changes it by at
    # most the dropped singular values.
    dropped = ref[~keep].max(initial=0.0)
    np.testing.assert_allclose(q @ (q.T @ yt), yt, atol=100 * eps + 2 * dropped)


# ---- errors -------------------------------------------------------------------------------------


def call(**kw):
    a = jnp.eye(6, dtype=DTYPE)
    args = dict(num_matvecs=3, like=jnp.zeros(6, DTYPE)) | kw
    return curvature.trace(as_op(a), jax.random.key(0), **args)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(num_matvecs=9), ValueError, r"curvature\.trace: `num_matvecs` \(9\) exceeds .* n = 6"),
        (dict(num_matvecs=0), ValueError, r"curvature\.trace: `num_matvecs` must be at least 1"),
        (dict(num_matvecs=3.0), TypeError, r"curvature\.trace: `num_matvecs` must be an int"),
        (dict(num_matvecs=4), ValueError, r"'hutch\+\+' needs `num_matvecs` divisible by 3.*use 3 or 6"),
        (dict(num_matvecs=3, method="xtrace"), ValueError, r"'xtrace' needs .* divisible by 2.*2 or 4"),
        (dict(method="girard"), ValueError, r"curvature\.trace: unknown method 'girard'.*'hutch\+\+'"),
        (dict(batch_size=0), ValueError, r"curvature\.trace: `batch_size` must be a positive int"),
        (dict(batch_size=2.0), TypeError, r"curvature\.trace: `batch_size` must be None or"),
        (dict(like=None), TypeError, r"curvature\.trace: `op` is a plain callable; pass `like=`"),
        (dict(like=jnp.zeros(5, DTYPE)), ValueError, r"curvature\.trace: `like` does not match"),
    ],
)
def test_errors(kw, error, match):
    with pytest.raises(error, match=match):
        call(**kw)
