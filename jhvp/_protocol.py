"""The operator protocol: what every jhvp operator shares, and how any operator enters a program.

`HessianOperator`, `GGNOperator` and `FisherOperator` are frozen dataclasses registered as pytrees
with at least the data fields `value`, `grad` and `_apply` (a `jax.tree_util.Partial` mapping the
flat differentiated tangent leaves to the flat result leaves) and the meta field
`_tangent_layout`; they inherit the rest from `SymmetricOperator`. `jhvp.curvature` and
`jhvp.interop` see an operator only through `structure` (the pytree of `jax.ShapeDtypeStruct` its
vectors have: `like=`, else `op.in_structure()`) and `run` (one compiled program with the
operator's arrays as arguments), so they serve these operators and user callables `v -> A v`
alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _cache, _checks, _filter, _select
from ._typing import PyTree


@dataclasses.dataclass(frozen=True)
class TangentLayout:
    """The accepted tangent structures: the gradient's, or the primals' own (statics ignored)."""

    diff_tree: Any
    full_tree: Any
    selection: tuple[int, ...]
    state_paths: tuple | None = None  # NNX modules: the differentiated variables' paths
    shardings: tuple | None = None  # the differentiated primals' NamedShardings (or None each)

    @staticmethod
    def of(layout: _cache.Layout) -> TangentLayout:
        """Returns the layout of one cache entry's tangents."""
        diff_tree, full_tree = layout.tangent_trees
        return TangentLayout(diff_tree, full_tree, layout.full_selection, layout.state_paths)


class SymmetricOperator:
    """A symmetric linear operator on the differentiated primals: `op(v)`, `op @ v`.

    A mixin for the registered dataclasses above; the subclass supplies the fields and, where
    true, `psd = True` (read by `jhvp.to_lineax` to add the positive-semidefinite tag).
    """

    psd: ClassVar[bool] = False
    value: jax.Array
    grad: PyTree
    _apply: Any
    _tangent_layout: TangentLayout

    def __call__(self, tangents: PyTree) -> PyTree:
        """Returns A·tangents in the gradient's structure (an nnx.State for an nnx.State)."""
        if _select.is_state(tangents):
            layout = self._tangent_layout
            out = apply_jitted(self, jax.tree.leaves(gradient_form(self, tangents)))
            paths = layout.state_paths
            assert paths is not None  # gradient_form raised for an operator without NNX paths
            return _select.to_state(out, tangents, paths)
        return apply_jitted(self, self._tangent_leaves(tangents))

    def __matmul__(self, tangents: PyTree) -> PyTree:
        return self(tangents)

    def _tangent_leaves(self, tangents: PyTree) -> list:
        leaves, tree = jax.tree.flatten(tangents)
        layout = self._tangent_layout
        if tree == layout.diff_tree:
            return leaves
        if tree == layout.full_tree:
            return [leaves[p] for p in layout.selection]
        _checks.check_tangents(self.grad, tangents, "tangents", f"jhvp.{type(self).__name__}")
        raise AssertionError("unreachable: check_tangents accepted a rejected structure")

    def transpose(self) -> Any:
        """Returns the operator itself: it is symmetric."""
        return self

    @property
    def T(self) -> Any:  # noqa: N802 (numpy's name)
        """The transpose, which is the operator itself."""
        return self

    @property
    def shape(self) -> tuple[int, int]:
        """(n, n), n being the number of scalar parameters in the gradient."""
        n = sum(jnp.size(leaf) for leaf in jax.tree.leaves(self.grad))
        return (n, n)

    def in_structure(self) -> PyTree:
        """Returns the structure of the vectors it applies to: `jax.ShapeDtypeStruct` leaves.

        Examples:
            >>> import jax.numpy as jnp, jhvp
            >>> x = jnp.ones(3, dtype=jnp.float32)  # float32 with or without JAX_ENABLE_X64
            >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 4), (x,))
            >>> op.in_structure()
            ShapeDtypeStruct(shape=(3,), dtype=float32)
        """
        leaves, tree = jax.tree.flatten(self.grad)
        placed = self._tangent_layout.shardings or (None,) * len(leaves)
        return jax.tree.unflatten(tree, [
            jax.ShapeDtypeStruct(jnp.shape(g), jnp.result_type(g),
                                 sharding=p if p is not None else named_sharding(g))
            for g, p in zip(leaves, placed, strict=True)
        ])

    def as_matrix(self) -> jax.Array:
        """Returns the dense n×n matrix, parameters ordered as `jax.flatten_util.ravel_pytree`.

        For small problems and tests only: it costs n applications (batched with `jax.vmap`, so
        n tangent passes at once) and n² memory.

        Examples:
            >>> import jax.numpy as jnp, jhvp
            >>> op = jhvp.hessian_operator(lambda p: p["a"] ** 2 * p["b"],
            ...                            ({"a": jnp.array(1.0), "b": jnp.array(3.0)},))
            >>> print(op.as_matrix())  # order: "a", "b"
            [[6. 2.]
             [2. 0.]]
        """
        flat, _ = ravel_pytree(self.grad)
        basis = jnp.eye(flat.size, dtype=flat.dtype)
        return _dense(self, basis)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.shape[0]}, value={self.value!r})"


named_sharding = _filter.named_sharding


def placed(built: tuple) -> Any:
    """An operator from `_cache.run(..., shardings=True)`, holding its primals' shardings.

    The vectors `jhvp.curvature` creates (probes, bases, iterates) then get the parameters'
    layout (`in_structure()` carries it), whatever layout XLA chose for the gradient.
    """
    op, shardings = built
    if all(s is None for s in shardings):
        return op
    layout = dataclasses.replace(op._tangent_layout, shardings=shardings)
    return dataclasses.replace(op, _tangent_layout=layout)


def apply_traced(op: SymmetricOperator, vecs: list) -> PyTree:
    """A·v from flat tangent leaves, checked against the gradient and cast to its dtypes."""
    grads = jax.tree.leaves(op.grad)
    tree = jax.tree.structure(op.grad)
    for g, t in zip(grads, vecs, strict=True):
        if jnp.shape(g) != jnp.shape(t) or jnp.issubdtype(jnp.result_type(t), jnp.complexfloating):
            _checks.check_tangents(op.grad, jax.tree.unflatten(tree, vecs), "tangents",
                                  f"jhvp.{type(op).__name__}")
    vecs = [jnp.asarray(t, dtype=jnp.result_type(g)) for g, t in zip(grads, vecs, strict=True)]
    return jax.tree.unflatten(tree, op._apply(vecs))


apply_jitted = jax.jit(apply_traced)


@jax.jit
def _dense(op: SymmetricOperator, basis: jax.Array) -> jax.Array:
    _, unravel = ravel_pytree(op.grad)
    return jax.vmap(
        lambda e: ravel_pytree(apply_traced(op, jax.tree.leaves(unravel(e))))[0]
    )(basis)


def _leaf_struct(leaf: Any, path: tuple, api: str, name: str) -> jax.ShapeDtypeStruct:
    where = f"`{name}`{jax.tree_util.keystr(path)}"
    if isinstance(leaf, jax.ShapeDtypeStruct):
        struct = leaf
    elif _filter.is_array(leaf):
        struct = jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf),
                                      sharding=named_sharding(leaf))
    elif isinstance(leaf, float):
        struct = jax.ShapeDtypeStruct((), jnp.result_type(float))
    else:
        raise TypeError(
            f"{api}: every leaf of `{name}` must be an array, a "
            f"jax.ShapeDtypeStruct or a float; {where} is {type(leaf).__name__} ({leaf!r}). "
            "Pass a pytree of arrays or jax.ShapeDtypeStruct with the structure of v."
        )
    if not jnp.issubdtype(struct.dtype, jnp.floating):
        raise TypeError(
            f"{api}: vectors must be real floating point, but {where} has dtype "
            f"{struct.dtype}. Pass `{name}` with a float dtype (e.g. x.astype(jnp.float32))."
        )
    return struct


def structure(op: Any, like: PyTree, api: str, *, name: str = "like") -> PyTree:
    """Returns the structure of the vectors `op` applies to: a pytree of `jax.ShapeDtypeStruct`.

    `like` wins when given (arrays or ShapeDtypeStructs, converted); else `op.in_structure()`.
    `name` is the argument's name in error messages (`lanczos` passes "v0").

    Raises:
        TypeError: `op` is a plain callable and `like` is None; a `like` leaf that is not an
            array, ShapeDtypeStruct or float; a non-floating dtype.
        ValueError: The structure has no array leaves.
    """
    if like is None:
        if not hasattr(op, "in_structure"):
            raise TypeError(
                f"{api}: `op` is a plain callable; pass `like=` (a pytree of "
                "arrays or jax.ShapeDtypeStruct with the structure of v)."
            )
        like = op.in_structure()
    with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    if not with_path:
        raise ValueError(
            f"{api}: the vectors `op` applies to have no array leaves "
            f"(structure {treedef}); pass `like=` with at least one array."
        )
    return jax.tree.unflatten(treedef, [_leaf_struct(x, p, api, name) for p, x in with_path])


class TreeOperator(NamedTuple):
    """An operator seen as a map on vectors with its structure, built at trace time by `on_trees`.

    Its vectors have `struct`'s leaves, every one in `dtype` (the structure's promoted dtype, as
    `jax.flatten_util.ravel_pytree` would give); `matvec` casts each leaf to the operator's own
    dtype on the way in and back on the way out. Nothing is concatenated: each leaf keeps its
    shape, and so the sharding XLA gives it.
    """

    matvec: Callable[[PyTree], PyTree]
    """A vector -> A·vector, both with `struct`'s structure and leaves of `dtype`."""
    struct: PyTree
    """The vectors' structure: `jax.ShapeDtypeStruct` leaves (with a sharding where known)."""
    n: int
    """The number of scalar entries of a vector."""
    dtype: Any
    """The dtype of every leaf of a vector."""
    streamed: Any = None
    """The `jhvp.StreamedOperator` behind `matvec`, or None: the algorithm then runs outside
    `jax.jit` and its loops through `jhvp.curvature._flow`."""

    def to_struct(self, tree: PyTree) -> PyTree:
        """Casts each leaf of `tree` (leading axes allowed) to its structure's dtype."""
        return jax.tree.map(lambda x, s: x.astype(s.dtype), tree, self.struct)


class FlatOperator(NamedTuple):
    """An operator seen as a map on flat vectors (`jhvp.interop`, whose SciPy needs them)."""

    matvec: Callable[[jax.Array], jax.Array]
    """(n,) -> (n,): unravel, apply the operator, ravel."""
    n: int
    """The number of scalar entries of a vector."""
    dtype: Any
    """The dtype of the flat vectors."""
    unravel: Callable[[jax.Array], PyTree]
    """(n,) -> a pytree with the operator's structure."""
    ravel: Callable[[PyTree], jax.Array]
    """A pytree with the operator's structure -> (n,)."""


def _check_output(out: PyTree, struct: PyTree, api: str, name: str) -> None:
    want, want_def = jax.tree_util.tree_flatten_with_path(struct)
    got, got_def = jax.tree_util.tree_flatten_with_path(out)
    if want_def != got_def:  # type: ignore[operator]  # JAX gap: PyTreeDef is an untyped alias
        want_paths = [jax.tree_util.keystr(p) for p, _ in want]
        got_paths = [jax.tree_util.keystr(p) for p, _ in got]
        first = next(
            (w for w, g in zip(want_paths, got_paths, strict=False) if w != g),
            (want_paths + got_paths)[min(len(want_paths), len(got_paths))],
        )
        raise ValueError(
            f"{api}: `{name}` does not match what op returns: the structures differ "
            f"first at leaf {first or '<root>'} ({name}: {want_def}; op returned: {got_def}). "
            f"Pass `{name}` with the structure of op's input and output vectors."
        )
    for (path, w), (_, g) in zip(want, got, strict=True):
        if tuple(w.shape) != tuple(jnp.shape(g)):
            raise ValueError(
                f"{api}: `{name}` does not match what op returns: leaf "
                f"{jax.tree_util.keystr(path) or '<root>'} has shape {tuple(w.shape)} in `{name}` "
                f"but {tuple(jnp.shape(g))} in op's output. Pass `{name}` with the shapes of v."
            )


def on_trees(op: Any, struct: PyTree, api: str, name: str = "like") -> TreeOperator:
    """Returns `op` as a `TreeOperator` on vectors with `struct`'s structure.

    Called at trace time. The first application checks (once, at trace time) that `op` returns
    vectors of `struct`'s shapes.
    """
    leaves = jax.tree.leaves(struct)
    dtype = jnp.result_type(*(s.dtype for s in leaves))
    checked: list[bool] = []

    def matvec(x: PyTree) -> PyTree:
        x = jax.tree.map(lambda v, s: v.astype(s.dtype), x, struct)
        if checked:
            out = op(x)
        else:
            try:
                out = op(x)
            except (TypeError, ValueError) as err:
                # Most often the structure has the wrong shapes for op: say so, not a bare
                # dot_general.
                raise ValueError(
                    f"{api}: `{name}` does not match what op accepts: applying op to a "
                    f"vector with the structure of `{name}` ({struct}) raised "
                    f"{type(err).__name__}: {err}"
                ) from err
            _check_output(out, struct, api, name)
            checked.append(True)
        return jax.tree.map(lambda v: jnp.asarray(v, dtype), out)

    streamed = op if getattr(op, "_streams", False) else None
    return TreeOperator(matvec, struct, size(struct), dtype, streamed)


def flatten(op: Any, struct: PyTree, api: str, name: str = "like") -> FlatOperator:
    """Returns `op` as a `FlatOperator` over `jax.flatten_util.ravel_pytree` order.

    For `jhvp.interop`, the one place that ravels. Called at trace time: the zeros used to build
    `unravel` are dead code XLA removes.
    """
    tree_op = on_trees(op, struct, api, name)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, tree_op.dtype), struct)
    flat, unravel = ravel_pytree(zeros)
    dtype = flat.dtype

    def ravel(tree: PyTree) -> jax.Array:
        return jnp.asarray(ravel_pytree(tree)[0], dtype)

    def matvec(x: jax.Array) -> jax.Array:
        return ravel(tree_op.matvec(unravel(x)))

    def unravel_struct(x: jax.Array) -> PyTree:
        return tree_op.to_struct(unravel(x))

    return FlatOperator(matvec, tree_op.n, dtype, unravel_struct, ravel)


def gradient_form(op: Any, vector: PyTree) -> PyTree:
    """A vector in the gradient's structure, also when given in the primals' full structure.

    `op @ v` accepts both forms (static leaves repeated, or None there), and for an NNX module
    an `nnx.State` (what `nnx.grad` returns); the algorithms of `jhvp.curvature` take the
    gradient's. Any other vector is returned as it is.
    """
    layout = getattr(op, "_tangent_layout", None)
    if not isinstance(layout, TangentLayout):
        return vector
    if _select.is_state(vector):
        if layout.state_paths is None:
            raise TypeError(f"jhvp.{type(op).__name__}: an nnx.State vector, but the operator "
                            "was not built from an NNX module.")
        try:
            return _select.from_state(vector, layout.diff_tree, layout.state_paths)
        except ValueError as err:
            raise ValueError(f"jhvp.{type(op).__name__}: {err}") from None
    leaves, tree = jax.tree.flatten(vector)
    if tree != layout.diff_tree and tree == layout.full_tree:
        return layout.diff_tree.unflatten([leaves[p] for p in layout.selection])
    return vector


_PROGRAMS = _cache.table("operator programs")


def compiler_options() -> dict[str, Any] | None:
    """XLA options for the programs `run` compiles: code generation at -O1 on the CPU backend.

    A curvature program is a loop of many small per-leaf vector kernels around the operator's
    application, and XLA:CPU's default -O2 code generation is most of its first call: on the
    ~85k-parameter MLP (`python -m bench.cold_start`), `eigh`'s compilation took 4.5 s at -O2
    and 2.8 s at -O1, `trace(99)`'s 4.0 s and 3.2 s, with warm times equal within noise there,
    on the 1.8M MLP (eigh) and on Rosenbrock 10⁴ and 10⁶ (trace). Other backends keep their
    defaults.
    """
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None


def run(impl: Callable, op: Any, struct: PyTree, *args: Any, api: str, name: str = "like",
        view: Callable = on_trees, progress: bool = False, budget: int | None = None,
        **config: Any) -> Any:
    """Runs `impl(view(op, ...), *args, **config)` as one compiled program, `op` an argument.

    `view` is `on_trees` (a `TreeOperator`: `jhvp.curvature`) or `flatten` (`jhvp.interop`).

    The operator's arrays are traced arguments, never closed over: closing over them bakes them
    into the executable as constants (measured 3.4x slower on a 2M-element problem). Its other
    leaves (functions, Python scalars) and its structure are static, keyed through the one
    filter (`_filter.partition`), weakly: a callable passed here is not kept alive, and its
    compiled program goes when it does. `config` is static. Inside a user's `jax.jit` this is an
    ordinary nested call. `name` is the argument that gave `struct`, for error messages.

    A `jhvp.StreamedOperator` (data on the host) cannot be an argument: `impl` then runs
    outside `jax.jit`, its loops as Python loops of compiled steps (`jhvp.curvature._flow`),
    with a tqdm bar over `budget` matvecs × batches when `progress` is true.
    """
    if getattr(op, "_streams", False):
        return _run_streamed(impl, op, struct, args, api, name, view, progress, budget, config)
    leaves, treedef, arrays, op_key = _filter.partition(op)
    struct_leaves, struct_tree = jax.tree.flatten(struct)
    key = (impl, view, op_key, struct_tree, tuple(struct_leaves), api, name,
           tuple(sorted(config.items())))

    def make_jitted(slot: _cache.Slot) -> Callable:
        def program(arrays: list, args: tuple):
            op = _filter.combine(arrays, slot.leaves, slot.treedef)
            return impl(view(op, struct, api, name), *args, **config)

        program.__name__ = program.__qualname__ = f"jhvp_{api.rpartition('.')[2]}"
        nested, options = jax.jit(program), compiler_options()
        if options is None:
            return nested
        # XLA takes compiler options only for a program it compiles on its own: inside a
        # user's jax.jit this is one more call in their program, compiled with their options.
        alone = jax.jit(program, compiler_options=options)

        def call(*args: Any) -> Any:
            try:
                return alone(*args)
            except ValueError as err:  # staged into an enclosing jit, which JAX detects
                if "can only be passed to top-level" not in str(err):
                    raise
                return nested(*args)

        return call

    entry = _cache.lookup(_PROGRAMS, key, lambda: _cache.Entry(make_jitted))
    return entry.call(leaves, treedef, arrays, args)


def _run_streamed(impl, op, struct, args, api, name, view, progress, budget, config):
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            raise ImportError(f"{api}: progress=True needs tqdm, an optional extra: "
                              "pip install 'jhvp[progress]' (or pip install tqdm).") from err
        total = None if budget is None else budget * op.num_batches
        bar = tqdm(total=total, desc=api.rpartition(".")[2], unit="batch")
    op.progress = bar
    try:
        return impl(view(op, struct, api, name), *args, **config)
    finally:
        op.progress = None
        if bar is not None:
            bar.close()


def size(struct: PyTree) -> int:
    """Returns n, the number of scalar entries of a vector with structure `struct`."""
    return sum(int(np.prod(s.shape, dtype=np.int64)) for s in jax.tree.leaves(struct))
