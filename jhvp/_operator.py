"""HessianOperator: linearize the gradient once, apply it to many vectors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import _checks, _hvp
from ._tree import cast_like
from ._typing import PyTree


@jax.tree_util.register_pytree_node_class
class HessianOperator:
    """The Hessian H = ∇²f(primals) as a linear operator: `op(v)` and `op @ v` return H·v.

    Built by `hessian_operator`, which runs f's forward and reverse passes once and keeps their
    residuals (`jax.linearize` of the gradient). Each application then runs only the linear
    tangent pass: cheaper than a fresh `hvp` when many vectors are applied at one point (Krylov
    and CG solvers, Lanczos, power iteration), at the price of holding the residuals in memory,
    about what one reverse pass stores. For memory-bound f, where reading residuals costs more
    than recomputing them, it keeps the primals instead and each application is a fresh
    forward-over-reverse pass (see `hessian_operator`'s `strategy`). When every vector is known
    up front, `jax.vmap` of `hvp` over a stack of tangents needs no stored residuals.

    The operator is a pytree whose leaves are the value, the gradient, aux and the stored arrays,
    so it can be passed into a jitted function as an argument (closing over it instead would bake
    the arrays into the executable as constants). It composes with `jax.vmap` over tangents. It
    does not keep f alive: what it applies is a traced program, not f.

    Attributes:
        value: f(primals).
        grad: ∇f(primals), with the structure of the differentiated primals.
        aux: f's auxiliary output when built with `has_aux=True`, else None.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> op = jhvp.hessian_operator(lambda x: jnp.sum(jnp.sin(x)), (jnp.full(3, jnp.pi / 2),))
        >>> op.shape
        (3, 3)
        >>> step = jax.jit(lambda op, v: op @ v)  # the operator is an argument, not a constant
        >>> print(step(op, jnp.ones(3)))  # H = diag(-sin x)
        [-1. -1. -1.]
    """

    def __init__(self, value, grad, aux, apply: Callable, single: bool):
        self.value = value
        self.grad = grad
        self.aux = aux
        self._apply = apply
        self._single = single

    def __call__(self, tangents: PyTree) -> PyTree:
        """Returns H·tangents, with the structure of the gradient."""
        return _apply(self, tangents)

    def __matmul__(self, tangents: PyTree) -> PyTree:
        return _apply(self, tangents)

    def transpose(self) -> HessianOperator:
        """Returns the operator itself: a Hessian is symmetric."""
        return self

    @property
    def T(self) -> HessianOperator:  # noqa: N802 (numpy's name)
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
            >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 4), (jnp.ones(3),))
            >>> op.in_structure()
            ShapeDtypeStruct(shape=(3,), dtype=float32)
        """
        return jax.tree.map(lambda g: jax.ShapeDtypeStruct(jnp.shape(g), jnp.result_type(g)),
                            self.grad)

    def as_matrix(self) -> jax.Array:
        """Returns the dense n×n Hessian, parameters ordered as `jax.flatten_util.ravel_pytree`.

        For small problems and tests only: it costs n Hessian-vector products (batched with
        `jax.vmap`, so n tangent passes at once) and n² memory.

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
        n = self.shape[0]
        return f"HessianOperator(n={n}, value={self.value!r})"

    def tree_flatten(self):
        return (self.value, self.grad, self.aux, self._apply), self._single

    @classmethod
    def tree_unflatten(cls, single, children):
        return cls(*children, single=single)


def _apply_traced(op: HessianOperator, tangents: PyTree) -> PyTree:
    _checks.check_tangents(op.grad, tangents, "tangents", "HessianOperator")
    grad = (op.grad,) if op._single else tuple(op.grad)
    vecs = cast_like((tangents,) if op._single else tuple(tangents), grad)
    hv = op._apply(vecs)
    return hv[0] if op._single else hv


_apply = jax.jit(_apply_traced)


@jax.jit
def _dense(op: HessianOperator, basis: jax.Array) -> jax.Array:
    _, unravel = ravel_pytree(op.grad)
    return jax.vmap(lambda e: ravel_pytree(_apply_traced(op, unravel(e)))[0])(basis)


# XLA's cost model counts flops and bytes; a roofline weighs them. 10 flops per byte is a middle
# machine balance (CPUs ~5-20, GPUs ~20-100); the choice only has to separate compute-bound
# programs (matmuls: storing residuals saves recomputing them) from memory-bound ones (elementwise:
# reading stored residuals costs more than recomputing them from the primals).
_FLOPS_PER_BYTE = 10.0
STRATEGIES = ("auto", "linearize", "recompute")


def _estimated_cost(fn: Callable, *args) -> float | None:
    """Returns XLA's roofline estimate for jit(fn)(*args), or None where no cost model answers."""
    avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args)
    try:
        analysis = jax.jit(fn).lower(*avals).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - the cost model is advisory; fall back to linearizing
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis or "bytes accessed" not in analysis:
        return None
    return analysis["flops"] / _FLOPS_PER_BYTE + analysis["bytes accessed"]


def _apply_linearized(linear: Callable, vecs: tuple) -> tuple:
    return linear(vecs)[1]


def _apply_recompute(jaxpr, out_tree, consts: list, primals: tuple, vecs: tuple) -> tuple:
    # A traced program, not f itself: the operator must outlive the user's f without the jit
    # caches holding f alive, exactly as the linearized program does.
    flat = jax.core.eval_jaxpr(jaxpr, consts, *jax.tree.leaves((primals, vecs)))
    return jax.tree.unflatten(out_tree, flat)


def _build(get_f, kind: str, argnums: tuple[int, ...], single: bool, has_aux: bool, mode: str):
    api = "hessian_operator"
    strategy = kind.split(":")[1]

    def recompute(primals: tuple, vecs: tuple) -> tuple:
        loss = _hvp.make_loss(get_f(), primals, argnums, has_aux, api)
        diff = tuple(primals[i] for i in argnums)
        return _hvp.guarded(_hvp.ROUTES["fwd_rev"], "fwd_rev", api, loss, diff, vecs)[0]

    def impl(primals: tuple) -> HessianOperator:
        diff = _hvp.split_primals(primals, argnums, api)
        loss = _hvp.make_loss(get_f(), primals, argnums, has_aux, api)

        def value_and_grad(d):
            (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(d)
            return (value, grad), aux

        (value, grad), linear, aux = _hvp.guarded(
            lambda: jax.linearize(value_and_grad, diff, has_aux=True), "fwd_rev", api
        )
        chosen = strategy
        if chosen == "auto":
            stored = _estimated_cost(_apply_linearized, linear, diff)
            fresh = _estimated_cost(recompute, primals, diff)
            chosen = "recompute" if None not in (stored, fresh) and fresh < stored else "linearize"
        if chosen == "recompute":
            program, out_shape = jax.make_jaxpr(recompute, return_shape=True)(primals, diff)
            body = functools.partial(_apply_recompute, program.jaxpr, jax.tree.structure(out_shape))
            apply = jax.tree_util.Partial(body, program.consts, primals)
        else:
            apply = jax.tree_util.Partial(_apply_linearized, linear)
        return HessianOperator(value, grad[0] if single else grad, aux, apply, single)

    impl.__name__ = impl.__qualname__ = f"jhvp_hessian_operator_{strategy}"
    return jax.jit(impl)


def hessian_operator(
    f: Callable,
    primals: Sequence[Any],
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    strategy: str = "auto",
) -> HessianOperator:
    """Returns the Hessian H = ∇²f(primals) as a `HessianOperator` that applies H·v.

    Linearizes the gradient once (`jax.linearize` of `jax.grad`, compiled and cached like `hvp`):
    the forward and reverse passes of f run now, and each later `op(v)` runs only the tangent
    pass over their stored residuals. Memory: the residuals of one reverse pass, kept alive as
    long as the operator is.

    Stored residuals pay off where f is compute-bound (matrix products: an application costs
    about 0.75x a fresh `hvp` on an MLP). Where f is memory-bound (elementwise maths such as
    Rosenbrock), reading several residual arrays costs more than recomputing them from the
    primals, measured up to 4x slower. With `strategy="auto"` the operator asks XLA's cost model
    (flops and bytes of both compiled programs, once per input shape) which is cheaper and, for
    memory-bound f, keeps only the primals and runs a fresh forward-over-reverse pass per
    application. The cost model counts arithmetic and memory traffic, not kernel launches: on a
    GPU, problems small enough that a call is mostly launch overhead were measured up to 1.4x
    slower with stored residuals (an H100: a 500-parameter logistic regression, a 49k-parameter
    transformer block; `bench/RESULTS.md`), so pass `strategy="recompute"` there.

    Args:
        f: A function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
        primals: A tuple of f's positional arguments, each any pytree.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        has_aux: Whether f returns `(scalar, aux)`; aux is kept as `op.aux`.
        strategy: "auto" (default; see above), "linearize" (always store the residuals) or
            "recompute" (store the primals, recompute per application).

    Returns:
        A `HessianOperator` with `op(v)`, `op @ v`, `op.value`, `op.grad`, `op.aux`.

    Raises:
        TypeError: As `hvp`.
        ValueError: As `hvp`; an unknown `strategy`; applying the operator to a vector of the
            wrong structure.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 3), (jnp.array([1.0, 2.0]),))
        >>> print(op @ jnp.array([1.0, 1.0]))
        [ 6. 12.]
        >>> print(jax.vmap(op)(jnp.eye(2)))  # rows of H
        [[ 6.  0.]
         [ 0. 12.]]
        >>> print(op.value, op.grad)
        9.0 [ 3. 12.]
    """
    primals = _checks.check_primals(primals, "hessian_operator")
    _checks.check_choice(strategy, STRATEGIES, "strategy", "hessian_operator")
    kind = f"hessian_operator:{strategy}"
    fn = _hvp.compiled(f, kind, len(primals), argnums, has_aux, "fwd_rev", _build)
    return fn(primals)


