"""Bridges to SciPy and Lineax: operators as their linear operators, a loss as an objective.

`to_scipy` and `to_lineax` take what `jhvp.curvature` takes: a `jhvp.HessianOperator` (or another
jhvp operator), or any symmetric linear callable `v -> A v` on pytrees together with `like=`, a
pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v. `scipy_objective` turns a JAX
loss into the `fun`, `jac` and `hessp` that `scipy.optimize.minimize` calls; it warns with
`PrecisionWarning` when the loss computes in less than SciPy's float64.

SciPy and Lineax are optional: each function imports its library when called, and says which
extra to install when it is missing.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from . import _ad, _checks, _filter, _protocol, _select
from ._typing import Operator, PyTree

__all__ = ["PrecisionWarning", "ScipyObjective", "scipy_objective", "to_lineax", "to_scipy"]

def _require(module: str, extra: str, api: str) -> Any:
    try:
        # The top-level package first, so a blocked `sys.modules["scipy"] = None` counts as
        # missing even after `scipy.sparse.linalg` was imported.
        importlib.import_module(module.partition(".")[0])
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"jhvp.{api} needs the optional dependency {extra!r}, which is not installed. "
            f'Install it with: pip install "jhvp[{extra}]"'
        ) from err


def _matvec(flat_op: _protocol.FlatOperator, x: jax.Array) -> jax.Array:
    return flat_op.matvec(x.astype(flat_op.dtype))


def _matmat(flat_op: _protocol.FlatOperator, xs: jax.Array) -> jax.Array:
    return jax.vmap(flat_op.matvec, in_axes=1, out_axes=1)(xs.astype(flat_op.dtype))


def to_scipy(op: Operator, *, like: PyTree = None) -> Any:
    """Returns `op` as a `scipy.sparse.linalg.LinearOperator` on flat float64 vectors.

    Vector entries are ordered as `jax.flatten_util.ravel_pytree` orders the structure (`like`,
    else `op.in_structure()`). A float64 vector is cast to the operator's dtype, applied in one
    compiled call with the operator's arrays as arguments (ravel and unravel inside it), and
    copied back to the host as float64; `matmat` applies a block of columns in one
    `jax.vmap`-ed call. The operator is symmetric: `rmatvec` is `matvec`, `rmatmat` is `matmat`.

    A complex vector or block gives a complex128 result, as `scipy.sparse.linalg.aslinearoperator`
    of a float64 matrix does (so `gmres` or `cg` accept a complex right-hand side): A is real,
    so A(x + iy) = Ax + iAy, and the real and imaginary parts go through the operator together,
    as the columns of one compiled `matmat` call. The declared `dtype` stays float64, as SciPy's.

    Args:
        op: A jhvp operator, or a symmetric linear callable `v -> A v` on pytrees.
        like: The structure of v: a pytree of arrays or `jax.ShapeDtypeStruct`. Required for a
            plain callable; for a jhvp operator it overrides `op.in_structure()`.

    Returns:
        A float64 `scipy.sparse.linalg.LinearOperator` of shape (n, n), n the number of scalar
        entries of v.

    Raises:
        ImportError: SciPy is not installed.
        TypeError: `op` is a plain callable and `like` is None; a `like` leaf is not a
            floating-point array or `jax.ShapeDtypeStruct`.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, jhvp
        >>> from jhvp.interop import to_scipy
        >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 3), (jnp.array([1.0, 2.0]),))
        >>> A = to_scipy(op)
        >>> A.shape, A.dtype
        ((2, 2), dtype('float64'))
        >>> A @ np.array([1.0, 1.0])
        array([ 6., 12.])
        >>> B = to_scipy(lambda v: {"w": 2.0 * v["w"]}, like={"w": jnp.zeros(3)})
        >>> B.matmat(np.eye(3))[:, 0]
        array([2., 0., 0.])
        >>> A @ np.array([1.0 + 1.0j, 0.0])  # complex in, complex out: A x + i A y
        array([6.+6.j, 0.+0.j])
    """
    sla = _require("scipy.sparse.linalg", "scipy", "to_scipy")
    struct = _protocol.structure(op, like, "jhvp.to_scipy")
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(struct))

    def real_matmat(xs: np.ndarray) -> np.ndarray:
        out = _protocol.run(_matmat, op, struct, xs, api="jhvp.to_scipy", view=_protocol.flatten)
        return np.array(out, dtype=np.float64)

    def matvec(x: np.ndarray) -> np.ndarray:
        # scipy may pass an (n, 1) column; it reshapes what comes back itself.
        x = np.reshape(x, (n,))
        if np.iscomplexobj(x):  # A real: A(x + iy) = Ax + iAy, both in one call
            out = real_matmat(np.stack([x.real, x.imag], axis=1))
            return out[:, 0] + 1j * out[:, 1]
        y = _protocol.run(_matvec, op, struct, x, api="jhvp.to_scipy", view=_protocol.flatten)
        return np.array(y, dtype=np.float64)

    def matmat(xs: np.ndarray) -> np.ndarray:
        xs = np.asarray(xs)
        if np.iscomplexobj(xs):
            k = xs.shape[1]
            out = real_matmat(np.concatenate([xs.real, xs.imag], axis=1))
            return out[:, :k] + 1j * out[:, k:]
        return real_matmat(xs)

    return sla.LinearOperator(
        (n, n), matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat, dtype=np.float64
    )


def to_lineax(op: Operator, *, psd: bool = False, like: PyTree = None) -> Any:
    """Returns `op` as a `lineax.FunctionLinearOperator`, tagged symmetric.

    Its input structure is the `jax.ShapeDtypeStruct` pytree of v (`like`, else
    `op.in_structure()`). It always carries `lineax.symmetric_tag`, and
    `lineax.positive_semidefinite_tag` when `psd=True` or when the operator's class declares
    `psd = True` (the Gauss-Newton and Fisher operators do; a Hessian is PSD only near a
    minimum, so say so with `psd=True`). Solvers such as `lineax.CG` require these tags.

    Args:
        op: A jhvp operator, or a symmetric linear callable `v -> A v` on pytrees.
        psd: Whether to tag the operator positive semidefinite.
        like: The structure of v: a pytree of arrays or `jax.ShapeDtypeStruct`. Required for a
            plain callable; for a jhvp operator it overrides `op.in_structure()`.

    Returns:
        A `lineax.FunctionLinearOperator` whose `mv` applies `op`.

    Raises:
        ImportError: Lineax is not installed.
        TypeError: As `to_scipy`.

    Examples:
        >>> import jax.numpy as jnp, lineax as lx, jhvp
        >>> from jhvp.interop import to_lineax
        >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 2), (jnp.ones(2),))  # H = 2 I
        >>> A = to_lineax(op, psd=True)
        >>> lx.is_symmetric(A), lx.is_positive_semidefinite(A)
        (True, True)
        >>> sol = lx.linear_solve(A, jnp.array([2.0, 4.0]), lx.CG(rtol=1e-6, atol=1e-6))
        >>> print(sol.value)
        [1. 2.]
    """
    lx = _require("lineax", "lineax", "to_lineax")
    struct = _protocol.structure(op, like, "jhvp.to_lineax")
    tags = [lx.symmetric_tag]
    if psd or getattr(op, "psd", False) is True:  # a class attribute, or a streamed op's property
        tags.append(lx.positive_semidefinite_tag)
    return lx.FunctionLinearOperator(op, struct, tags)


class PrecisionWarning(UserWarning):
    """`scipy_objective` computes in a lower precision than SciPy's float64 (e.g. float32).

    SciPy's optimizers then see rounding noise in f, ∇f and H·p, and may stop with messages
    that do not name the cause. Pass `dtype=` to `scipy_objective` to choose the precision.
    """


def _cast_data(x: Any, dtype: np.dtype) -> Any:
    """A fixed floating (or complex) array in `dtype` (or its complex counterpart)."""
    if x is None:
        return None
    kind = jnp.result_type(x)
    if jnp.issubdtype(kind, jnp.complexfloating):
        return x.astype(np.complex128 if dtype == np.float64 else np.complex64)
    return x.astype(dtype) if jnp.issubdtype(kind, jnp.floating) else x


class _Selected:
    """Marks, in the fixed primals, where a leaf of x goes."""

    __slots__ = ("__weakref__",)


_SELECTED = _Selected()


class ScipyObjective:
    """A loss f as `scipy.optimize.minimize` calls it: float64 numpy vectors in and out.

    Build it with `scipy_objective`. `x` is the flat vector of the differentiated primals in
    `jax.flatten_util.ravel_pytree` order; the other primals are held fixed (their arrays are
    arguments of the compiled calls, never baked-in constants).

    Attributes:
        x0: The starting point: the differentiated primals, flat, float64.
        dtype: The dtype f is evaluated in: the differentiated primals' (after `dtype=`).

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> obj = jhvp.scipy_objective(lambda w: jnp.sum((w - 1.0) ** 2), (jnp.zeros(2),),
        ...                            dtype=jnp.float32)
        >>> isinstance(obj, jhvp.ScipyObjective), obj.fun(obj.x0), obj.jac(obj.x0).tolist()
        (True, 2.0, [-2.0, -2.0])
    """

    def __init__(
        self, f: Callable, primals: tuple, argnums: tuple[int, ...], single: bool, api: str,
        dtype: np.dtype | None = None, masks: list[list[bool]] | None = None,
    ):
        # x holds the selected leaves of the differentiated primals (`masks`, from `wrt=` and
        # the frameworks' rules); everything else, split by the one filter, is held fixed:
        # arrays as arguments of the compiled calls, the rest static.
        masks = masks or [[True] * len(jax.tree.leaves(primals[i])) for i in argnums]
        selected, templates = [], list(primals)
        for i, mask in zip(argnums, masks, strict=True):
            leaves, tree = jax.tree.flatten(primals[i])
            selected += [x for x, m in zip(leaves, mask, strict=True) if m]
            templates[i] = jax.tree.unflatten(tree, 
                [_SELECTED if m else x for x, m in zip(leaves, mask, strict=True)])
        if dtype is not None:
            selected = [jnp.asarray(x, dtype) for x in selected]
        flat0, unravel = ravel_pytree(selected)
        self.x0: np.ndarray = np.array(flat0, dtype=np.float64)
        self._single = single
        self.dtype: np.dtype = np.dtype(flat0.dtype)
        leaves, treedef, self._data, _ = _filter.partition(tuple(templates))
        if dtype is not None:
            self._data = [_cast_data(x, dtype) for x in self._data]
        dtype = self.dtype

        def rebuild(flat: jax.Array, data: list) -> list:
            args = list(_filter.combine(data, leaves, treedef))
            values = iter(unravel(flat))
            for i in argnums:
                args[i] = jax.tree.map(lambda x: next(values) if x is _SELECTED else x, args[i])
            return args

        def loss(flat: jax.Array, data: list) -> jax.Array:
            return f(*rebuild(flat, data))

        self._rebuild = rebuild
        self._argnums = argnums

        out = _checks.check_scalar_output(jax.eval_shape(loss, flat0, self._data), False, api)
        self._out_dtype = np.dtype(out.dtype)

        def value_and_grad(x: jax.Array, data: list) -> tuple[jax.Array, jax.Array]:
            return jax.value_and_grad(loss)(x.astype(dtype), data)

        def hessp(x: jax.Array, p: jax.Array, data: list) -> jax.Array:
            # jhvp's own forward-over-reverse route, on the flat vector.
            _, (hv,), _ = _ad.fwd_rev(lambda d: (loss(d[0], data), None), [x.astype(dtype)],
                                      [p.astype(dtype)])
            return hv

        self._value_and_grad = jax.jit(value_and_grad)
        self._hessp = jax.jit(hessp)
        self._x: np.ndarray | None = None  # the last point evaluated, with its value and grad
        self._value, self._grad = 0.0, self.x0

    def _evaluate(self, x: ArrayLike) -> tuple[float, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or not np.array_equal(x, self._x):
            value, grad = self._value_and_grad(x, self._data)
            self._value, self._grad = float(value), np.array(grad, dtype=np.float64)
            self._x = x.copy()
        return self._value, self._grad

    def fun(self, x: ArrayLike) -> float:
        """Returns f at the flat point x (shares one compiled evaluation with `jac`)."""
        return self._evaluate(x)[0]

    def jac(self, x: ArrayLike) -> np.ndarray:
        """Returns ∇f at the flat point x, flat, float64."""
        return self._evaluate(x)[1].copy()

    def hessp(self, x: ArrayLike, p: ArrayLike) -> np.ndarray:
        """Returns H·p at the flat point x (forward-over-reverse), flat, float64."""
        out = self._hessp(np.asarray(x, np.float64), np.asarray(p, np.float64), self._data)
        return np.array(out, dtype=np.float64)

    def unravel(self, x: ArrayLike) -> PyTree:
        """Returns the differentiated primal(s) at the flat point x, in `self.dtype`.

        The selected leaves come from x; the others (held fixed by `wrt=` or a framework's
        rule) are as they were given.
        """
        args = self._rebuild(jnp.asarray(np.asarray(x), self.dtype), self._data)
        out = tuple(args[i] for i in self._argnums)
        return out[0] if self._single else out

    def __repr__(self) -> str:
        return f"ScipyObjective(n={self.x0.size})"


def _check_dtype(dtype: Any, api: str) -> np.dtype | None:
    """Returns `dtype=` as a NumPy dtype: None, or a real floating dtype JAX can compute in."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{api}: `dtype` must be a real floating-point dtype such as jnp.float64, got "
            f"{dtype!r}."
        )
    if dt == np.float64 and not jax.config.read("jax_enable_x64"):
        raise TypeError(
            f"{api}: dtype=float64 needs JAX's 64-bit mode, which is off: JAX would compute in "
            'float32. Enable it at startup with `jax.config.update("jax_enable_x64", True)` '
            "(before creating arrays), or set the environment variable JAX_ENABLE_X64=1."
        )
    return dt


def _precision_warning(obj: ScipyObjective, requested: np.dtype | None, api: str) -> str | None:
    """The warning's text when f computes below float64 in a dtype nobody asked for, else None."""
    cast_down = jnp.finfo(obj._out_dtype).bits < jnp.finfo(obj.dtype).bits
    low = obj._out_dtype if cast_down else obj.dtype
    if jnp.finfo(low).bits >= 64 or low == requested:
        return None
    source = f"f returns {low}" if cast_down else f"the differentiated primals are {low}"
    fixes = []
    if cast_down:
        fixes.append(f"return f's value in {obj.dtype}, as its primals (not cast to {low})")
    if jnp.finfo(obj.dtype).bits < 64:
        fixes.append("pass `dtype=jnp.float64` (it casts the differentiated primals and "
                     "floating data)")
        if not jax.config.read("jax_enable_x64"):
            fixes[-1] += (' after enabling JAX\'s 64-bit mode: `jax.config.update('
                          '"jax_enable_x64", True)` at startup, or JAX_ENABLE_X64=1')
    fix = " and ".join(fixes)
    return (
        f"{api}: {source}, so f, its gradient and H·p are computed in {low} while "
        "SciPy's optimizers work in float64; their line searches and trust regions then see "
        "rounding noise and can stop early or fail with messages that do not name the cause "
        '("A bad approximation caused failure to predict improvement", "Desired error not '
        f'necessarily achieved due to precision loss"). To fix it, {fix}. To keep {low} on '
        f"purpose, pass `dtype=jnp.{low}`, which silences this warning."
    )


def scipy_objective(
    f: Callable,
    primals: Sequence[Any],
    *,
    argnums: int | Sequence[int] = 0,
    dtype: Any = None,
    wrt: Any = None,
) -> ScipyObjective:
    """Returns f as a `ScipyObjective`: `fun`, `jac` and `hessp` on flat float64 vectors.

    For `scipy.optimize.minimize`'s Newton-type methods (`trust-krylov`, `trust-ncg`,
    `Newton-CG`), which need only H·p. `fun` and `jac` come from one compiled
    `jax.value_and_grad`, remembered for the last x, so a `fun` and a `jac` at the same point
    cost one evaluation; `hessp` is one compiled forward-over-reverse H·p. Each is compiled once
    per `ScipyObjective`. SciPy itself is not needed to build one.

    f is evaluated in the differentiated primals' dtype. SciPy works in float64; under JAX's
    default (float32) its optimizers see rounding noise and may fail with messages that point
    elsewhere, so this warns once, when built, unless `dtype=` asked for that precision. For
    float64, enable x64 and pass `dtype=jnp.float64`.

    Args:
        f: A function of `*primals` returning a real scalar.
        primals: A tuple of f's positional arguments; the differentiated ones give `x0`.
        argnums: Which arguments are optimised, as in `jax.grad`; with a tuple, x concatenates
            them in order. The others (data, a batch) are held fixed.
        wrt: Which leaves of the optimised arguments x holds, as in `jhvp.hvp` (a pytree
            prefix of bools, a callable on a leaf, an NNX filter; Flax NNX modules: only
            `nnx.Param` by default). The others are held fixed.
        dtype: The floating dtype to compute in, or None for the primals' own. The
            differentiated primals and the floating arrays among the fixed ones are cast to it
            (complex ones to its complex counterpart); `unravel` returns it. float64 needs
            `jax.config.update("jax_enable_x64", True)` (or JAX_ENABLE_X64=1).

    Returns:
        A `ScipyObjective` with `x0`, `dtype`, `fun(x)`, `jac(x)`, `hessp(x, p)` and
        `unravel(x)`.

    Raises:
        TypeError: `f` is not callable; `primals` is not a tuple or list; a differentiated leaf
            is not a floating-point array or float; f does not return a real scalar; `dtype`
            is not a real floating dtype, or is float64 with JAX's 64-bit mode off.
        ValueError: `argnums` is out of range or repeats an argument.

    Warns:
        PrecisionWarning: (a `UserWarning`) f computes in less than float64 (the primals' or
            its result's dtype) and `dtype=` did not ask for it. Once per objective, when built.

    Examples:
        >>> import jax.numpy as jnp, numpy as np
        >>> from scipy.optimize import minimize
        >>> from jhvp.interop import scipy_objective
        >>> f = lambda w, x, y: jnp.sum((x @ w - y) ** 2)  # least squares in w; x, y fixed
        >>> primals = (jnp.zeros(2), jnp.eye(2), jnp.array([1.0, 2.0]))
        >>> obj = scipy_objective(f, primals, dtype=jnp.float32)  # float32 by choice: no warning
        >>> res = minimize(obj.fun, obj.x0, jac=obj.jac, hessp=obj.hessp, method="trust-krylov")
        >>> print(np.round(obj.unravel(res.x), 4))
        [1. 2.]
    """
    api = "jhvp.scipy_objective"
    _checks.check_callable(f, api)
    primals = _checks.check_primals(primals, api)
    nums = _checks.check_argnums(argnums, len(primals), api)
    requested = _check_dtype(dtype, api)
    single = not isinstance(argnums, tuple | list)
    selection = _select.normalise(wrt, single, api)
    masks = []
    for k, i in enumerate(nums):
        chosen = selection if single or selection is None else selection[k]
        with_path = jax.tree_util.tree_flatten_with_path(primals[i])[0]
        mask = _select.mask(chosen, primals[i], api) or [True] * len(with_path)
        predicate = _select.leaf_predicate(chosen)
        if predicate is not None:
            mask = [m and bool(predicate(x)) for m, (_, x) in zip(mask, with_path, strict=True)]
        masks.append(mask)
        for position, ((path, leaf), m) in enumerate(zip(with_path, mask, strict=True)):
            if not m:
                continue
            where = f"primals[{i}]{jax.tree_util.keystr(path)}"
            if not (_filter.is_array(leaf) or isinstance(leaf, float)):
                raise TypeError(
                    f"{api}: differentiated primals must be pytrees of floating-point "
                    f"arrays, but {where} is {type(leaf).__name__} ({leaf!r}). Move it to an "
                    "argument left out of `argnums`, or deselect it with `wrt=`."
                )
            _checks.check_differentiable_leaf(leaf, where, api,
                                              _select.advice(primals[i], position))
    obj = ScipyObjective(f, primals, nums, single, api, requested, masks)
    message = _precision_warning(obj, requested, api)
    if message is not None:
        warnings.warn(message, PrecisionWarning, stacklevel=2)
    return obj
