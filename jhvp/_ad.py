"""The AD routes to H·v, value and gradient, and the messages for JAX's known AD failures.

Every route takes `loss(d) -> (value, aux)`, a function of the differentiated leaves `d` (a flat
list of arrays), and returns the value and aux alongside its product, so callers that want them
(`value_grad_hvp`, `jhvp.compat`) pay for no second pass and callers that do not let XLA drop them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from . import _checks


def _value_and_grad(loss: Callable) -> Callable:
    def grad_with_value(d):
        (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(d)
        return grad, (value, aux)

    return grad_with_value


def fwd_rev(loss: Callable, diff: list, vecs: list):
    """H·v as the directional derivative of the gradient: one forward pass over the reverse."""
    _, hv, (value, aux) = jax.jvp(_value_and_grad(loss), (diff,), (vecs,), has_aux=True)
    return value, hv, aux


def rev_rev(loss: Callable, diff: list, vecs: list):
    """vᵀH through the VJP of the gradient; equals H·v because H is symmetric."""
    _, pullback, (value, aux) = jax.vjp(_value_and_grad(loss), diff, has_aux=True)
    (vh,) = pullback(vecs)
    return value, vh, aux


def rev_fwd(loss: Callable, diff: list, vecs: list):
    """∇ of the directional derivative <∇f, v>: reverse mode over one forward pass."""

    def directional(d):
        value, dot, aux = jax.jvp(loss, (d,), (vecs,), has_aux=True)
        return dot, (value, aux)

    hv, (value, aux) = jax.grad(directional, has_aux=True)(diff)
    return value, hv, aux


ROUTES: dict[str, Callable] = {"fwd_rev": fwd_rev, "rev_rev": rev_rev, "rev_fwd": rev_fwd}


def _value_grad(loss: Callable) -> Callable:
    def value_grad(d):
        (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(d)
        return (value, grad), aux

    return value_grad


def value_grad_hvp(loss: Callable, diff: list, vecs: list):
    """f, ∇f and H·v from one forward-over-reverse pass: (value, grad, hv, aux)."""
    (value, grad), (_, hv), aux = jax.jvp(_value_grad(loss), (diff,), (vecs,), has_aux=True)
    return value, grad, hv, aux


def linearize(loss: Callable, diff: list):
    """Linearizes the gradient once: (value, grad, linear, aux); `linear(v)[1]` is H·v."""
    (value, grad), linear, aux = jax.linearize(_value_grad(loss), diff, has_aux=True)
    return value, grad, linear, aux


def guarded(route: Callable, mode: str, api: str, *args):
    """Runs an AD route, turning JAX's known AD failures into errors that say what to do."""
    try:
        return route(*args)
    except (ValueError, TypeError, NotImplementedError) as err:
        better = _checks.explain_ad_failure(err, mode, api)
        if better is None:
            raise
        raise better from err
