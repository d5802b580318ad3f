"""Dataset operators (`data=`): on the device (`jhvp.batches`) and streamed, against the operator
of the concatenated dataset; curvature over streamed operators against the on-device results."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, assert_rounding_close, mlp_loss, mlp_params, rand

import jhvp
from jhvp import curvature
from jhvp.curvature import _flow

SIZES = (3, 5, 2)
PARAMS = mlp_params(SIZES, seed=3)


def _dataset(n):
    return rand(200, (n, SIZES[0])), rand(201, (n, SIZES[-1]))


def mlp_sum(params, x, y):
    return mlp_loss(params, x, y) * x.shape[0]


def model(params, x):
    h = x
    for i in range(len(params)):
        layer = params[f"layer{i}"]
        h = h @ layer["w"] + layer["b"][None, :]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def cross_entropy_mean(z, y):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(z) * jax.nn.softmax(y), axis=-1))


def cross_entropy_sum(z, y):
    return cross_entropy_mean(z, y) * z.shape[0]


def per_example(params, x, y):
    return jnp.sum((model(params, x) - y) ** 2, axis=-1)


def _build(kind, reduction, data=None, whole=None):
    """The dataset operator (data given) or the operator of the concatenated dataset (whole)."""
    if kind == "hessian":
        f = mlp_loss if reduction == "mean" else mlp_sum
        if data is None:
            return jhvp.hessian_operator(f, (PARAMS, *whole))
        return jhvp.hessian_operator(f, (PARAMS,), data=data, reduction=reduction)
    if kind == "ggn":
        loss = cross_entropy_mean if reduction == "mean" else cross_entropy_sum
        if data is None:
            return jhvp.ggn_operator(model, loss, (PARAMS, whole[0]), loss_args=(whole[1],))
        return jhvp.ggn_operator(model, loss, (PARAMS,), data=data, reduction=reduction)
    if data is None:
        op = jhvp.empirical_fisher_operator(per_example, (PARAMS, *whole))
        return op if reduction == "mean" else _Scaled(op, whole[0].shape[0])
    return jhvp.empirical_fisher_operator(per_example, (PARAMS,), data=data,
                                          reduction=reduction)


class _Scaled:
    """The Fisher of the sum: N times the mean's (what reduction="sum" is)."""

    def __init__(self, op, n):
        self.value, self.grad = op.value * n, jax.tree.map(lambda g: g * n, op.grad)
        self._matrix = op.as_matrix() * n

    def as_matrix(self):
        return self._matrix


def _streamed(x, y, size):
    # NumPy batches on the host, as a data loader yields them.
    return [(np.asarray(x[i:i + size]), np.asarray(y[i:i + size]))
            for i in range(0, x.shape[0], size)]


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("form", ["device", "streamed"])
@pytest.mark.parametrize("n", [24, 26])  # equal batches of 8, or a last batch of 2
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataset_operator_is_the_operator_of_the_concatenated_dataset(kind, form, n, reduction):
    x, y = _dataset(n)
    data = jhvp.batches(x, y, batch_size=8) if form == "device" else _streamed(x, y, 8)
    op = _build(kind, reduction, data=data)
    want = _build(kind, reduction, whole=(x, y))
    assert type(op).__name__ == ("StreamedOperator" if form == "streamed" else
                                 {"hessian": "HessianOperator", "ggn": "GGNOperator",
                                  "fisher": "FisherOperator"}[kind])
    # Four batches summed in another order than one batch's reductions: rounding of n terms.
    assert_rounding_close(op.as_matrix(), want.as_matrix(), steps=4)
    assert_rounding_close(op.value, want.value, steps=4)
    assert_rounding_close(op.grad, want.grad, steps=4)
    v = jax.tree.map(jnp.ones_like, PARAMS)
    flat = jax.flatten_util.ravel_pytree
    assert_rounding_close(flat(op @ v)[0], want.as_matrix() @ flat(v)[0], steps=4,
                          amplification=10)
    if form == "streamed":
        assert op.num_examples == n and op.batch_sizes == (8, 8, 8) + ((2,) if n == 26 else ())


def test_device_dataset_operator_is_a_pytree_for_jit_and_keeps_one_batch_in_memory():
    x, y = _dataset(64)
    data = jhvp.batches(x, y, batch_size=8)
    op = jhvp.hessian_operator(mlp_loss, (PARAMS,), data=data)
    v = jax.tree.map(jnp.ones_like, PARAMS)
    hv = jax.jit(lambda op, v: op @ v)(op, v)
    assert_rounding_close(hv, op @ v, steps=8)
    # Other data of the same shapes: the same compiled program, other numbers.
    x2, y2 = _dataset(64)[0] * 2, y
    op2 = jhvp.hessian_operator(mlp_loss, (PARAMS,), data=jhvp.batches(x2, y2, batch_size=8))
    want = jhvp.hessian_operator(mlp_loss, (PARAMS, x2, y2))
    assert_rounding_close(op2.as_matrix(), want.as_matrix(), steps=8)


def test_dict_batches_with_batch_size_fn():
    x, y = _dataset(20)
    data = [{"x": np.asarray(x[i:i + 6]), "y": np.asarray(y[i:i + 6])} for i in range(0, 20, 6)]

    def loss(params, batch):
        return mlp_loss(params, batch["x"], batch["y"])

    sizes = []

    def size_of(batch):
        sizes.append(1)
        return batch["y"].shape[0]

    op = jhvp.hessian_operator(loss, (PARAMS,), data=data, batch_size_fn=size_of)
    assert op.batch_sizes == (6, 6, 6, 2) and sizes
    want = jhvp.hessian_operator(mlp_loss, (PARAMS, x, y))
    assert_rounding_close(op.as_matrix(), want.as_matrix(), steps=4)


# ---- curvature over streamed operators ------------------------------------------------------

KEY = jax.random.key(7)
ALGORITHMS = {
    "eigh": lambda op, **kw: curvature.eigh(op, KEY, 2, num_matvecs=12, **kw).eigenvalues,
    "lanczos": lambda op, **kw: curvature.lanczos(op, PARAMS, 8, **kw).alphas,
    "power": lambda op, **kw: curvature.power_iteration(op, KEY, max_iters=30, **kw).eigenvalues,
    "hutch++": lambda op, **kw: curvature.trace(op, KEY, num_matvecs=12, **kw).estimate,
    "hutchinson": lambda op, **kw: curvature.trace(op, KEY, num_matvecs=10,
                                                   method="hutchinson", **kw).estimate,
    "xtrace": lambda op, **kw: curvature.trace(op, KEY, num_matvecs=12, method="xtrace",
                                               **kw).estimate,
    "diagonal": lambda op, **kw: curvature.diagonal(op, KEY, num_matvecs=10, **kw).estimate,
    "xdiag": lambda op, **kw: curvature.diagonal(op, KEY, num_matvecs=12, method="xdiag",
                                                 **kw).estimate,
    "diagonal_exact": lambda op, **kw: curvature.diagonal_exact(op, **kw).estimate,
    "density": lambda op, **kw: curvature.spectral_density(op, KEY, num_probes=2,
                                                           num_matvecs=10, **kw).density,
    "density_batched": lambda op, **kw: curvature.spectral_density(
        op, KEY, num_probes=2, num_matvecs=10, batch_size=2, **kw).density,
    "solve": lambda op, **kw: curvature.solve(op, PARAMS, damping=1.0, rtol=1e-6, **kw).x,
}
# Condition numbers of what is compared (a GGN of a tiny MLP, ‖G‖ ≈ 1): Ritz values and
# estimates 1; the density smoothed at σ ≈ ‖G‖/100; the damped solve κ ≤ 2.
AMPLIFICATION = {"density": 100.0, "density_batched": 100.0}


@pytest.fixture(scope="module")
def ggn_pair():
    x, y = _dataset(26)
    device = jhvp.ggn_operator(model, cross_entropy_mean, (PARAMS,),
                               data=jhvp.batches(x, y, batch_size=8))
    streamed = jhvp.ggn_operator(model, cross_entropy_mean, (PARAMS,), data=_streamed(x, y, 8))
    return device, streamed


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_streamed_curvature_equals_the_on_device_result(name, ggn_pair):
    device, streamed = ggn_pair
    algorithm = ALGORITHMS[name]
    want, got = algorithm(device), algorithm(streamed)
    steps = 40  # up to 12 applications of 4 batches, and the algorithm's reductions
    assert_rounding_close(got, want, steps=steps, amplification=AMPLIFICATION.get(name, 10.0))


def test_streamed_steps_are_traced_once_not_per_step_or_batch():
    x, y = _dataset(40)
    traced = []

    def loss(params, x, y):
        traced.append(x.shape[0])
        return mlp_loss(params, x, y)

    op = jhvp.hessian_operator(loss, (PARAMS,), data=_streamed(x, y, 16))  # 16, 16, 8
    built = len(traced)
    assert built == 2  # the value-and-gradient kernel: one trace per batch shape
    counts = []
    for m in (6, 12):
        before, steps = len(traced), _flow.traces[0]
        out = curvature.eigh(op, KEY, 1, num_matvecs=m, rtol=None)
        assert int(out.num_matvecs) == m
        counts.append((len(traced) - before, _flow.traces[0] - steps))
    # The application kernel is traced at the two batch shapes on first use, never again; each
    # eigh call traces its step's two halves once, whatever its steps (6 or 12) and batches (3).
    assert counts == [(2, 2), (0, 2)]


def test_progress_bar_counts_matvecs_times_batches(monkeypatch):
    pytest.importorskip("tqdm")
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total=None, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    x, y = _dataset(24)
    op = jhvp.hessian_operator(mlp_loss, (PARAMS,), data=_streamed(x, y, 8))
    curvature.eigh(op, KEY, 1, num_matvecs=5, rtol=None, progress=True)
    curvature.trace(op, KEY, num_matvecs=6, method="hutchinson", batch_size=2, progress=True)
    assert [(b.total, b.n) for b in bars] == [(15, 15), (18, 18)]


def test_progress_without_tqdm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    x, y = _dataset(16)
    op = jhvp.hessian_operator(mlp_loss, (PARAMS,), data=_streamed(x, y, 8))
    with pytest.raises(ImportError, match=r"jhvp\[progress\]"):
        curvature.trace(op, KEY, num_matvecs=3, progress=True)


# ---- bad data -------------------------------------------------------------------------------

X, Y = _dataset(20)
LOSS = mlp_loss


@pytest.mark.parametrize("data, error, message", [
    (((X[i:i + 5], Y[i:i + 5]) for i in range(0, 20, 5)), TypeError,
     r"one-shot iterator \(generator\).*re-iterable"),
    ([], ValueError, r"holds no batches \(an empty dataset\)"),
    ([(X[:5], Y[:5]), {"x": X[5:10], "y": Y[5:10]}], ValueError,
     r"batch 1 has the structure .* every batch must have the same structure"),
    ([(np.float32(1.0), Y[:5])], ValueError,
     r"batch 0's arrays do not share a leading \(examples\) axis \(batch\[0\]: no axis, "
     r"batch\[1\]: 5\)"),
    (list(zip(np.asarray(X), np.asarray(Y), strict=True)), ValueError,
     r"batch 0's arrays do not share .* list\(zip\(x, y\)\) are single examples"),
    ([(X[:5], [1.0] * 5)], TypeError, r"batch 0\[1\]\[0\] is a builtins.float; batches must "
     r"hold NumPy or JAX arrays \(from a torch DataLoader"),
    ((X, Y), TypeError, r"must be jhvp.batches\(...\) .* got tuple"),
    (X, TypeError, r"must be jhvp.batches\(...\) .* got ArrayImpl"),
])
def test_bad_streamed_data_is_rejected_with_the_reason(data, error, message):
    with pytest.raises(error, match=message):
        jhvp.hessian_operator(LOSS, (PARAMS,), data=data)


@pytest.mark.parametrize("call, error, message", [
    (lambda: jhvp.batches(X[:0], Y[:0], batch_size=2), ValueError, r"empty \(N = 0\)"),
    (lambda: jhvp.batches(X, Y[:3], batch_size=2), ValueError,
     r"share their leading size N .* arrays\[0\]: 20, arrays\[1\]: 3"),
    (lambda: jhvp.batches(X, jnp.ones((), DTYPE), batch_size=2), ValueError,
     r"arrays\[1\] has no leading axis"),
    (lambda: jhvp.batches(X, Y, batch_size=0), ValueError, r"`batch_size` must be at least 1"),
    (lambda: jhvp.batches(batch_size=2), TypeError, r"at least one array"),
    (lambda: jhvp.hessian_operator(LOSS, (PARAMS,), data=jhvp.batches(X, Y, batch_size=4),
                                   reduction="max"), ValueError, r"unknown reduction 'max'"),
    (lambda: jhvp.hessian_operator(LOSS, (PARAMS, X, Y), reduction="sum"), TypeError,
     r"`reduction` applies to dataset operators only"),
    (lambda: jhvp.ggn_operator(model, cross_entropy_mean, (PARAMS, X), loss_args=(Y,),
                               check_deterministic=True), TypeError,
     r"`check_deterministic` applies to dataset operators only"),
    (lambda: jhvp.hessian_operator(lambda *a: (LOSS(*a), 0.0), (PARAMS,), has_aux=True,
                                   data=jhvp.batches(X, Y, batch_size=4)), TypeError,
     r"has_aux=True is not supported with `data=`"),
    (lambda: jhvp.hessian_operator(LOSS, (PARAMS,), argnums=1,
                                   data=jhvp.batches(X, Y, batch_size=4)), ValueError,
     r"argnums=1 is out of range"),
    (lambda: jhvp.hessian_operator(LOSS, (PARAMS, jhvp.batches(X, Y, batch_size=4))),
     TypeError, r"jhvp.batches\(...\) dataset is among the primals; pass it as `data=`"),
    (lambda: jhvp.hessian_operator(LOSS, (PARAMS,), data=jhvp.batches(X, Y, batch_size=4),
                                   batch_size_fn=len), TypeError,
     r"`batch_size_fn` is for streamed batches"),
    (lambda: jhvp.hessian_operator(LOSS, (PARAMS,), data=jhvp.batches(X, Y, batch_size=4),
                                   strategy="linearize"), TypeError,
     r"`strategy` applies to an operator of one batch; with `data`"),
])
def test_bad_dataset_arguments_are_rejected_with_the_reason(call, error, message):
    with pytest.raises(error, match=message):
        call()


class _Shuffled:
    """A loader that reshuffles on every pass and scales its targets (augmentation)."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __iter__(self):
        order = self.rng.permutation(20)
        for i in range(0, 20, 5):
            rows = order[i:i + 5]
            yield np.asarray(X)[rows], np.asarray(Y)[rows] * (1 + self.rng.normal())


def test_check_deterministic_names_the_usual_causes():
    with pytest.raises(RuntimeError, match=r"augmentation, dropout .*shuffling where the loss"):
        jhvp.hessian_operator(LOSS, (PARAMS,), data=_Shuffled(), check_deterministic=True)
    fixed = _streamed(X, Y, 5)
    op = jhvp.hessian_operator(LOSS, (PARAMS,), data=fixed, check_deterministic=True)
    assert op.num_batches == 4


def test_data_that_changes_between_passes_is_an_error():
    class Dropping:
        passes = 0

        def __iter__(self):
            Dropping.passes += 1
            stop = 20 if Dropping.passes == 1 else 15
            return iter(_streamed(X[:stop], Y[:stop], 5))

    op = jhvp.hessian_operator(LOSS, (PARAMS,), data=Dropping())
    with pytest.raises(RuntimeError, match=r"other batches than when the operator was built"):
        op @ PARAMS


def test_nnx_state_vectors_give_nnx_state_products_in_both_forms():
    nnx = pytest.importorskip("flax.nnx")
    net = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=DTYPE)
    x, y = rand(300, (12, 3)), rand(301, (12, 2))

    def loss(m, x, y):
        return jnp.mean((m(x) - y) ** 2)

    state = nnx.state(net, nnx.Param)
    one = jhvp.hessian_operator(loss, (net, x, y))
    want = one @ state
    for data in (jhvp.batches(x, y, batch_size=5), _streamed(x, y, 5)):
        op = jhvp.hessian_operator(loss, (net,), data=data)
        got = op @ state
        assert isinstance(got, nnx.State)
        assert_rounding_close(jax.tree.leaves(got), jax.tree.leaves(want), steps=3)


def test_a_streamed_operator_is_not_a_jit_argument():
    op = jhvp.hessian_operator(LOSS, (PARAMS,), data=_streamed(X, Y, 5))
    with pytest.raises(TypeError):
        jax.jit(lambda op: op @ PARAMS)(op)


def test_streamed_curvature_from_two_threads_at_once():
    # Each thread splits its own loops: the capture of one never sees the other's operator.
    import threading

    x, y = _dataset(24)
    ops = [jhvp.hessian_operator(mlp_loss, (PARAMS,), data=_streamed(x * s, y, 8)) for s in (1, 2)]
    want = [curvature.eigh(op, KEY, 2, num_matvecs=10, rtol=None).eigenvalues for op in ops]
    got = [None, None]

    def run(i):
        got[i] = curvature.eigh(ops[i], KEY, 2, num_matvecs=10, rtol=None).eigenvalues

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want, strict=True):
        assert_rounding_close(g, w, steps=10)


def test_streamed_operators_declare_psd_for_lineax_only_where_true():
    lx = pytest.importorskip("lineax")
    x, y = _dataset(16)
    hessian = jhvp.hessian_operator(mlp_loss, (PARAMS,), data=_streamed(x, y, 8))
    ggn = jhvp.ggn_operator(model, cross_entropy_mean, (PARAMS,), data=_streamed(x, y, 8))
    assert not lx.is_positive_semidefinite(jhvp.to_lineax(hessian))
    assert lx.is_positive_semidefinite(jhvp.to_lineax(ggn))
