"""Curvature over a dataset: the weights of its batches, on the device or streamed from the host.

An operator built with `data=` is the curvature of the training loss over all batches,
Σ_b w_b C_b, with w_b = n_b / N (`reduction="mean"`) or 1 (`"sum"`), n_b the batch's size and
N = Σ n_b; its `value` and `grad` are weighted alike. (The empirical Fisher sums its
per-example terms: (1/N) Σᵢ ∇ℓᵢ∇ℓᵢᵀ for "mean", Σᵢ ∇ℓᵢ∇ℓᵢᵀ for "sum".)

- `batches(*arrays, batch_size=B)` keeps the whole dataset on the device: the operator is one
  of jhvp's pytree operators whose application loops over the batches inside one compiled
  program (`lax.fori_loop` over the full batches, a smaller last batch applied once more at its
  own shape: exact weights, no padding).
- Any other re-iterable of batches (a list of tuples, a data loader of NumPy or JAX arrays) is
  streamed: a `StreamedOperator`, whose application is a Python loop over the batches with one
  compiled kernel per batch shape, and which `jhvp.curvature` runs from a Python loop of
  compiled steps (`jhvp.curvature._flow`).

Each batch is appended to the function's arguments: `f(*primals, *batch)` (Hessian),
`model(*primals, x)` and `loss(z, *rest, *loss_args)` for `batch = (x, *rest)` (GGN),
`per_example_loss(*primals, *batch)` (Fisher). A batch that is not a tuple or list (a dict) is
passed as one argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _ad, _cache, _checks, _filter, _protocol, _select
from ._protocol import SymmetricOperator, TangentLayout
from ._typing import REDUCTIONS, PyTree


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"],
                   meta_fields=["batch_size"])
@dataclasses.dataclass(frozen=True)
class Batches:
    """A dataset held on the device, cut into batches inside the compiled program.

    Built by `jhvp.batches`. A pytree (its arrays are leaves), so an operator built from it
    goes into `jax.jit` like any other.

    Attributes:
        arrays: The full arrays (each a pytree of arrays with leading axis N).
        batch_size: B, the examples per batch; the last batch holds N mod B when that is not 0.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> jhvp.batches(jnp.zeros((10, 3)), jnp.zeros(10), batch_size=4)
        Batches(num_examples=10, batch_size=4, num_batches=3)
    """

    arrays: tuple
    batch_size: int

    @property
    def num_examples(self) -> int:
        """N, the leading size shared by every array."""
        return int(np.shape(jax.tree.leaves(self.arrays)[0])[0])

    @property
    def num_batches(self) -> int:
        """⌈N / B⌉."""
        return -(-self.num_examples // self.batch_size)

    def __repr__(self) -> str:
        return (f"Batches(num_examples={self.num_examples}, batch_size={self.batch_size}, "
                f"num_batches={self.num_batches})")


def batches(*arrays: Any, batch_size: int) -> Batches:
    """Returns a dataset on the device, cut into batches of `batch_size` inside the program.

    Pass it as `data=` to `jhvp.hessian_operator`, `jhvp.ggn_operator` or
    `jhvp.empirical_fisher_operator`: the operator is then the curvature of the mean (or sum)
    loss over all N examples, computed batch by batch inside one XLA program, so memory is one
    batch's activations, not the dataset's. Batch i is the tuple of the arrays' rows
    [iB, (i+1)B); a last batch of N mod B examples is applied at its own shape and weighted
    exactly. The arrays may be sharded along N.

    Args:
        *arrays: The full arrays, each a pytree whose leaves share the leading axis N ≥ 1.
        batch_size: B ≥ 1, examples per batch (B ≥ N: one batch).

    Returns:
        A `Batches`.

    Raises:
        TypeError: No arrays; a leaf that is not an array; a non-int `batch_size`.
        ValueError: Leaves with different leading sizes, or without a leading axis; N = 0;
            `batch_size` < 1.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> x, y = jnp.arange(10.0).reshape(5, 2), jnp.ones(5)
        >>> data = jhvp.batches(x, y, batch_size=2)
        >>> data
        Batches(num_examples=5, batch_size=2, num_batches=3)
        >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
        >>> op = jhvp.hessian_operator(loss, (jnp.zeros(2),), data=data)
        >>> print(op.as_matrix())  # 2 XᵀX / N over all five rows
        [[48. 56.]
         [56. 66.]]
    """
    api = "jhvp.batches"
    if not arrays:
        raise TypeError(f"{api}: pass at least one array (the dataset's inputs, targets, ...).")
    from .curvature import _checks as _int_checks

    batch_size = _int_checks.check_int(batch_size, "batch_size", api)
    sizes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        where = f"arrays{jax.tree_util.keystr(path)}"
        if not _filter.is_array(leaf):
            raise TypeError(f"{api}: every leaf must be an array; {where} is "
                            f"{type(leaf).__name__}.")
        if np.ndim(leaf) == 0:
            raise ValueError(f"{api}: {where} has no leading axis (shape ()); every array "
                             "needs the examples along its first axis.")
        sizes.append((where, int(np.shape(leaf)[0])))
    if not sizes:
        raise TypeError(f"{api}: the arrays hold no array leaves.")
    if any(n != sizes[0][1] for _, n in sizes):
        listed = ", ".join(f"{w}: {n}" for w, n in sizes)
        raise ValueError(f"{api}: the arrays must share their leading size N (examples); got "
                         f"{listed}.")
    if sizes[0][1] == 0:
        raise ValueError(f"{api}: the dataset is empty (N = 0).")
    return Batches(tuple(arrays), batch_size)


def as_args(batch: Any) -> tuple:
    """A batch as the positional arguments it appends: a tuple's items, else itself."""
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)


# ---- the per-batch maths, shared by the on-device program and the streamed kernels --------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["fns", "loss_args"],
                   meta_fields=["kind", "batch_size", "reduction"])
@dataclasses.dataclass(frozen=True)
class _Problem:
    """What the caches key: the user's callables, loss_args, kind, batch size and reduction.

    The callables are pytrees (their arrays traced); kind ("hessian", "ggn", "fisher"), batch
    size and reduction are static.

    The last primal of a call is the data: the full arrays (on the device) or one batch.
    """

    fns: tuple
    loss_args: tuple
    kind: str
    batch_size: int | None
    reduction: str

    def __call__(self, *primals: Any) -> Any:  # never called: the bodies below unpack it
        raise AssertionError("a dataset problem is evaluated batch by batch")


def _batch_fn(t: _cache.Traced, batch: Any) -> Callable[[list], Any]:
    """The kind's function of the differentiated leaves d on `batch` (the model's z: GGN)."""

    def fn(d: list) -> Any:
        problem, primals = t.substitute(d)
        model = problem.fns[0]
        if problem.kind == "hessian":
            return _checks.check_scalar_output(model(*primals[:-1], *as_args(batch)), False,
                                               t.api)
        if problem.kind == "fisher":
            from ._ggn import _check_per_example

            return _check_per_example(model(*primals[:-1], *as_args(batch)), t.api)
        return model(*primals[:-1], as_args(batch)[0])

    return fn


def _ggn_loss(t: _cache.Traced, batch: Any) -> Callable:
    """The map z -> (∇_z L, L) for the batch's targets: L = loss(z, *rest, *loss_args)."""
    from ._ggn import _check_loss

    problem, _ = t.substitute(t.diff)
    targets = (*as_args(batch)[1:], *problem.loss_args)

    def loss_grad(z: PyTree):
        value, gz = jax.value_and_grad(
            lambda z: _check_loss(problem.fns[1](z, *targets), t.api))(z)
        return gz, value

    return loss_grad


def value_grad(t: _cache.Traced, batch: Any) -> tuple[jax.Array, list]:
    """The batch's loss (summed per-example losses for the Fisher) and its gradient."""
    fn = _batch_fn(t, batch)
    kind = t.key.extra[1]
    if kind == "hessian":
        return jax.value_and_grad(fn)(t.diff)
    z, vjp = jax.vjp(fn, t.diff)
    if kind == "fisher":
        (grad,) = vjp(jnp.ones_like(z))
        return jnp.sum(z), grad
    from ._ggn import _check_outputs

    _check_outputs(z, t.api)
    gz, value = _ggn_loss(t, batch)(z)
    (grad,) = vjp(gz)
    return value, grad


def apply(t: _cache.Traced, batch: Any, vecs: list) -> list:
    """The batch's curvature times vecs (J_bᵀJ_b v, unnormalised, for the Fisher)."""
    fn = _batch_fn(t, batch)
    kind = t.key.extra[1]
    if kind == "hessian":
        return _ad.fwd_rev(lambda d: (fn(d), None), t.diff, vecs)[1]
    from ._ggn import _apply_gauss_newton

    z, linear = jax.linearize(fn, t.diff)
    if kind == "fisher":
        return _apply_gauss_newton(linear, lambda u: u, vecs)
    _, loss_linear, _ = jax.linearize(_ggn_loss(t, batch), z, has_aux=True)
    return _apply_gauss_newton(linear, loss_linear, vecs)


def weight(kind: str, reduction: str, n_b: int, n: int) -> float:
    """The batch's weight w_b in Σ_b w_b C_b."""
    if reduction == "sum":
        return 1.0
    return 1.0 / n if kind == "fisher" else n_b / n


# ---- on the device ------------------------------------------------------------------------


def _over_batches(data: Any, size: int, fn: Callable[[Any, int], PyTree]) -> PyTree:
    """Σ_b fn(batch_b, n_b) over the batches of `data` (full batches in a `lax.fori_loop`)."""
    n = int(np.shape(jax.tree.leaves(data)[0])[0])
    full, rest = divmod(n, size)
    total = None
    if full:
        def take(i):
            return jax.tree.map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size, 0), data)

        shapes = jax.eval_shape(lambda: fn(take(0), size))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total = jax.lax.fori_loop(
            0, full, lambda i, acc: jax.tree.map(jnp.add, acc, fn(take(i), size)), zeros)
    if rest:
        last = fn(jax.tree.map(lambda x: x[full * size:], data), rest)
        total = last if total is None else jax.tree.map(jnp.add, total, last)
    return total


def _device_body(t: _cache.Traced) -> SymmetricOperator:
    problem, primals = t.substitute(t.diff)
    data, kind, reduction = primals[-1], problem.kind, problem.reduction
    n = int(np.shape(jax.tree.leaves(data)[0])[0])

    def weighted(parts: Callable) -> Callable:
        def fn(batch, n_b):
            w = weight(kind, reduction, n_b, n)
            return jax.tree.map(lambda x: x * jnp.asarray(w, x.dtype), parts(batch))

        return fn

    value, grad = _over_batches(data, problem.batch_size,
                                weighted(lambda batch: value_grad(t, batch)))

    def apply_all(dynamic: list, vecs: list) -> list:
        again = t.again(dynamic)
        _, prims = again.substitute(again.diff)
        return _over_batches(prims[-1], problem.batch_size,
                             weighted(lambda batch: apply(again, batch, vecs)))

    closed, out_shape = jax.make_jaxpr(apply_all, return_shape=True)(t.dynamic, t.diff)
    # A traced program, not f (as the Hessian's recompute strategy applies): the operator does
    # not keep the user's callables alive.
    from ._hessian import _apply_recompute

    body = functools.partial(_apply_recompute, closed.jaxpr, jax.tree.structure(out_shape))
    op_apply = jax.tree_util.Partial(body, closed.consts, t.dynamic)
    return _operator_class(kind).build(value, t.unflatten(grad), op_apply,
                                       TangentLayout.of(t.layout))


def _operator_class(kind: str) -> Any:
    from ._ggn import FisherOperator, GGNOperator
    from ._hessian import HessianOperator

    class _Build:
        @staticmethod
        def build(value, grad, op_apply, layout):
            if kind == "hessian":
                return HessianOperator(value, grad, None, op_apply, layout, None)
            cls = GGNOperator if kind == "ggn" else FisherOperator
            return cls(value, grad, op_apply, layout)

    return _Build


# ---- streamed from the host ---------------------------------------------------------------


def _streamed_vg_body(t: _cache.Traced) -> tuple:
    _, primals = t.substitute(t.diff)
    value, grad = value_grad(t, primals[-1])
    return value, t.unflatten(grad), _filter.Static(TangentLayout.of(t.layout))


def _streamed_apply_body(t: _cache.Traced) -> PyTree:
    _, primals = t.substitute(t.diff)
    assert t.vecs is not None  # an application's program is traced with its vectors
    return t.unflatten(apply(t, primals[-1], t.vecs))


@jax.jit
def _accumulate(acc: PyTree, w: jax.Array, product: PyTree) -> PyTree:
    return jax.tree.map(lambda a, p: a + w.astype(p.dtype) * p, acc, product)


@jax.jit
def _scaled(w: jax.Array, product: PyTree) -> PyTree:
    return jax.tree.map(lambda p: w.astype(p.dtype) * p, product)


class Capture:
    """What `jhvp.curvature._flow` sets while it traces a loop body over a streamed operator.

    `mode` "record": the operator records the vector it is applied to and returns zeros (the
    body's part before the product is traced); "replay": it returns `product` (the part after).
    """

    _local = threading.local()  # per thread: two threads may split loops at once

    def __init__(self, mode: str, product: PyTree = None, owner: Any = None):
        self.mode, self.product = mode, product
        self.vectors: list = []
        self.owner = owner  # the trace of the body's arguments: the vector must be of it

    def __enter__(self) -> Capture:
        Capture.stack().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        Capture.stack().pop()

    @staticmethod
    def stack() -> list:
        """This thread's active captures; the innermost is the last."""
        stack = getattr(Capture._local, "stack", None)
        if stack is None:
            stack = Capture._local.stack = []
        return stack


class Unsplittable(Exception):
    """A loop body over a streamed operator that does not apply it exactly once (internal)."""


class StreamedOperator(SymmetricOperator):
    """The curvature of a loss over batches streamed from the host: `op(v)` = Σ_b w_b C_b v.

    Built by `hessian_operator`, `ggn_operator` or `empirical_fisher_operator` with `data=` a
    re-iterable of batches (a list of tuples, a data loader). Each application reads the data
    once: a Python loop over the batches, each a call of one compiled kernel (a forward-over-
    reverse pass for the Hessian, J then Jᵀ for the GGN and Fisher, at that batch), compiled
    once per batch shape. Memory on the device: one batch and a few vectors. It is not a pytree
    (the data lives on the host), so it cannot enter `jax.jit`; every `jhvp.curvature`
    algorithm accepts it and runs its compiled steps from a Python loop.

    Attributes:
        value: The weighted loss over the dataset.
        grad: Its gradient, with the structure of the differentiated primals.
        num_examples: N.
        batch_sizes: n_b for each batch, in the order the data yields them.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np, jhvp
        >>> x = np.arange(12.0, dtype=np.float32).reshape(6, 2)
        >>> loader = [(x[:4], np.ones(4, np.float32)), (x[4:], np.ones(2, np.float32))]
        >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
        >>> op = jhvp.hessian_operator(loss, (jnp.zeros(2, jnp.float32),), data=loader)
        >>> op.batch_sizes, op.num_examples
        ((4, 2), 6)
        >>> print(op.as_matrix())  # 2 XᵀX / N over all six rows
        [[73.333336 83.333336]
         [83.333336 95.333336]]
        >>> top = jhvp.curvature.eigh(op, jax.random.key(0), num_matvecs=2)
        >>> print(f"{float(top.eigenvalues[0]):.2f}")
        168.39
    """

    _streams = True  # `_protocol.on_trees` hands it to `jhvp.curvature._flow`

    def __init__(self, problem: _Problem, primals: tuple, data: Iterable, opts: tuple,
                 batch_size_fn: Callable | None, api: str):
        self._problem, self._primals, self._data = problem, primals, data
        self._vg_opts, self._apply_opts = opts
        self._batch_size_fn, self._api = batch_size_fn, api
        self.progress: Any = None  # a tqdm bar while a `jhvp.curvature` call runs
        value = grad = structure = None
        sizes, layout = [], None
        for i, batch in enumerate(self._batches(first=True)):
            n_b = self._size(batch, i)
            tree = jax.tree.structure(batch)
            if structure is None:
                structure = tree
            elif tree != structure:
                raise ValueError(f"jhvp.{api}: batch {i} has the structure {tree}, batch 0 "
                                 f"{structure}; every batch must have the same structure.")
            v_b, g_b, static = _cache.run(self._vg_opts, problem, (*primals, batch),
                                          _streamed_vg_body)
            layout = static.value
            sizes.append(n_b)
            pair = (v_b, g_b) if problem.kind == "fisher" else _scaled(
                jnp.asarray(n_b if problem.reduction == "mean" else 1.0), (v_b, g_b))
            value, grad = pair if value is None else jax.tree.map(jnp.add, (value, grad), pair)
        if not sizes:
            raise ValueError(f"jhvp.{api}: `data` holds no batches (an empty dataset).")
        assert value is not None and layout is not None  # set by the first batch
        self.num_examples = sum(sizes)
        self.batch_sizes = tuple(sizes)
        self._weights = [weight(problem.kind, problem.reduction, n_b, self.num_examples)
                         for n_b in sizes]
        if problem.reduction == "mean":
            value, grad = _scaled(jnp.asarray(1.0 / self.num_examples), (value, grad))
        self.value, self.grad = value, grad
        self._tangent_layout = layout

    psd = property(lambda self: self._problem.kind != "hessian")

    def _batches(self, first: bool = False) -> Iterable:
        data = self._data
        it = iter(data)
        if it is data:
            raise TypeError(
                f"jhvp.{self._api}: `data` is a one-shot iterator ({type(data).__name__}); the "
                "operator reads the data once per application, so pass a re-iterable: a list "
                "of batches, a data loader, or an object whose __iter__ starts afresh."
            )
        return it

    def _size(self, batch: Any, i: int) -> int:
        """The batch's n_b, after checking that it holds arrays of examples."""
        name = f"jhvp.{self._api}"
        with_path = jax.tree_util.tree_flatten_with_path(batch)[0]
        for path, leaf in with_path:
            if not _filter.is_array(leaf):
                kind = f"{type(leaf).__module__}.{type(leaf).__name__}"
                raise TypeError(
                    f"{name}: batch {i}{jax.tree_util.keystr(path)} is a {kind}; batches must "
                    "hold NumPy or JAX arrays (from a torch DataLoader, convert them with "
                    "`.numpy()`, e.g. in its collate_fn)."
                )
        if self._batch_size_fn is not None:
            return int(self._batch_size_fn(batch))
        sizes = [(jax.tree_util.keystr(p), np.shape(x)[0] if np.ndim(x) else None)
                 for p, x in with_path]
        if not sizes or any(n is None or n != sizes[0][1] for _, n in sizes):
            listed = ", ".join(f"batch{p}: {'no axis' if n is None else n}" for p, n in sizes)
            raise ValueError(
                f"{name}: batch {i}'s arrays do not share a leading (examples) axis ({listed}). "
                "Each batch holds its examples along the leading axis of every array (the "
                "items of list(zip(x, y)) are single examples: batch them, or pass "
                "data=jhvp.batches(x, y, batch_size=B)); or pass `batch_size_fn=`."
            )
        return int(cast(int, sizes[0][1]))  # not None: checked above

    def __call__(self, tangents: PyTree) -> PyTree:
        """Returns Σ_b w_b C_b·tangents, in the gradient's structure (an nnx.State for one)."""
        if _select.is_state(tangents):
            out = self(_protocol.gradient_form(self, tangents))
            paths = self._tangent_layout.state_paths
            assert paths is not None  # gradient_form raised for an operator without NNX paths
            return _select.to_state(out, tangents, paths)
        tangents = _protocol.gradient_form(self, tangents)
        if Capture.stack():
            capture = Capture.stack()[-1]
            if capture.mode == "replay":
                return capture.product
            # Applied under a vmap or loop of the body's own, or twice: not one top-level
            # application, so the body cannot be split there.
            if capture.vectors or capture.owner is None or any(
                    getattr(x, "_trace", None) is not capture.owner
                    for x in jax.tree.leaves(tangents)):
                raise Unsplittable
            capture.vectors.append(tangents)
            return jax.tree.map(jnp.zeros_like, self.grad)
        acc = None
        count = 0
        for i, batch in enumerate(self._batches()):
            if i >= len(self._weights) or self._size(batch, i) != self.batch_sizes[i]:
                self._changed()
            product = _cache.run(self._apply_opts, self._problem, (*self._primals, batch),
                                 _streamed_apply_body, vectors=tangents, name="tangents")
            w = jnp.asarray(self._weights[i])
            acc = _scaled(w, product) if acc is None else _accumulate(acc, w, product)
            count += 1
            if self.progress is not None:
                self.progress.update(_vector_count(tangents))
        if count != len(self._weights):
            self._changed()
        return acc

    def _changed(self) -> None:
        raise RuntimeError(
            f"jhvp.{self._api}: the data yielded other batches than when the operator was "
            f"built ({len(self.batch_sizes)} batches of sizes {self.batch_sizes[:8]}...). The "
            "data must yield batches of the same sizes on every pass: a re-iterable that "
            "restarts (not a one-shot generator), without random sampling of the batches."
        )

    def as_matrix(self) -> jax.Array:
        """Returns the dense n×n matrix (`jax.flatten_util.ravel_pytree` order): tests only."""
        flat, unravel = ravel_pytree(self.grad)
        basis = jnp.eye(flat.size, dtype=flat.dtype)
        return jax.vmap(lambda e: ravel_pytree(self(unravel(e)))[0])(basis)

    @property
    def num_batches(self) -> int:
        """The number of batches per pass."""
        return len(self.batch_sizes)

    def __repr__(self) -> str:
        return (f"StreamedOperator(kind={self._problem.kind}, n={self.shape[0]}, "
                f"num_examples={self.num_examples}, num_batches={self.num_batches}, "
                f"value={self.value!r})")


def _vector_count(tangents: PyTree) -> int:
    leaf = jax.tree.leaves(tangents)[0]
    # Under `jax.vmap` (probes applied at once) a tracer holds the whole batch in `val`.
    val: Any = getattr(leaf, "val", None)
    if type(leaf).__name__ == "BatchTracer" and hasattr(val, "size"):
        return max(1, int(val.size) // max(1, int(np.prod(np.shape(leaf), dtype=np.int64))))
    return 1


# ---- the entry point ----------------------------------------------------------------------


def operator(kind: str, api: str, fns: tuple, loss_args: tuple, primals: tuple, argnums: Any,
             wrt: Any, data: Any, reduction: str, batch_size_fn: Callable | None,
             check_deterministic: bool) -> Any:
    """The dataset operator of `kind` for `data` (a `Batches` or a re-iterable of batches)."""
    name = f"jhvp.{api}"
    _checks.check_choice(reduction, REDUCTIONS, "reduction", name)
    single = not isinstance(argnums, tuple | list)
    nums = _checks.check_argnums(argnums, len(primals), name)
    argnums = nums[0] if single else nums
    fns = tuple(_filter.as_pytree_callable(f) for f in fns)
    if isinstance(data, Batches):
        if batch_size_fn is not None:
            raise TypeError(f"{name}: `batch_size_fn` is for streamed batches; jhvp.batches "
                            "cuts its arrays along their leading axis.")
        problem = _Problem(fns, tuple(loss_args), kind, data.batch_size, reduction)
        opts = _cache.options(api, len(primals) + 1, argnums, False, "fwd_rev",
                              ("data", kind), wrt)
        op = _protocol.placed(_cache.run(opts, problem, (*primals, data.arrays), _device_body,
                                         shardings=True))
    else:
        arrays = isinstance(data, tuple) and data and all(_filter.is_array(a) for a in data)
        if (_filter.is_array(data) or isinstance(data, dict) or arrays
                or not isinstance(data, Iterable)):
            raise TypeError(
                f"{name}: `data` must be jhvp.batches(...) (arrays on the device) or a "
                f"re-iterable of batches (a list of tuples, a data loader), got "
                f"{type(data).__name__}. For arrays, pass data=jhvp.batches(x, y, batch_size=B)."
            )
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(f"{name}: `batch_size_fn` must be callable (batch -> its size).")
        problem = _Problem(fns, tuple(loss_args), kind, None, reduction)
        kernels = tuple(_cache.options(api, len(primals) + 1, argnums, False, "fwd_rev",
                                       (role, kind), wrt) for role in ("streamed", "apply"))
        op = StreamedOperator(problem, primals, data, kernels, batch_size_fn, api)
    if check_deterministic:
        _check_deterministic(op, name)
    return op


def _check_deterministic(op: Any, name: str) -> None:
    """Applies `op` twice to one random vector and raises if the products differ."""
    struct = op.in_structure()
    leaves, tree = jax.tree.flatten(struct)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    draws = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
    v = jax.tree.unflatten(tree, draws)
    first, second = op(v), op(v)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(first)) or 1.0
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(first), jax.tree.leaves(second), strict=True))
    eps = max(float(jnp.finfo(s.dtype).eps) for s in leaves)
    if diff > 100 * eps * scale * math.sqrt(max(1, len(getattr(op, "batch_sizes", (1,))))):
        raise RuntimeError(
            f"{name}: check_deterministic: two applications to the same vector differ by "
            f"{diff:.3g} (largest entry {scale:.3g}). The operator must be the same on every "
            "pass over the data; the usual causes are data augmentation, dropout (or other "
            "randomness in the loss), and shuffling where the loss depends on how examples are "
            "grouped (BatchNorm in training mode) or `drop_last` drops other examples."
        )


def check_options(data: Any, api: str, primals: tuple, *, reduction: str, batch_size_fn: Any,
                  check_deterministic: bool, has_aux: bool = False) -> None:
    """Raises for the dataset options given without `data`, and for has_aux with it."""
    name = f"jhvp.{api}"
    if any(isinstance(p, Batches) for p in primals):
        raise TypeError(f"{name}: a jhvp.batches(...) dataset is among the primals; pass it "
                        "as `data=` (the batches are then appended to the arguments).")
    if data is None:
        given = [k for k, v in (("reduction", reduction != "mean"),
                                ("batch_size_fn", batch_size_fn is not None),
                                ("check_deterministic", bool(check_deterministic))) if v]
        if given:
            raise TypeError(f"{name}: `{given[0]}` applies to dataset operators only; pass "
                            "`data=` (jhvp.batches(...) or a re-iterable of batches).")
    elif has_aux:
        raise TypeError(f"{name}: has_aux=True is not supported with `data=`: aux differs "
                        "from batch to batch. Build a one-batch operator for aux.")
