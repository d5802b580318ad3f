"""jhvp.compat against the real torch.autograd.functional: the same maths written twice.

Each case runs torch and jhvp.compat on the same data. Where torch raises, jhvp must raise the
same exception type with the same message (generated live from the installed torch, never
copied into this file); where torch returns, the structures, shapes and values must agree.
The families follow torch's own test_functional.py: error checks, strict error checks, outputs,
scalar inputs, create_graph.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import X64

from jhvp import compat

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the cross-checks against torch.autograd.functional "
    "need it (CI installs torch==2.13.0, CPU build)"
)
TF = torch.autograd.functional
RTOL = 1e-10 if X64 else 2e-5
_MISSING = object()


@dataclasses.dataclass
class Case:
    api: str
    name: str
    torch_fn: Callable
    jax_fn: Callable
    inputs: Any
    v: Any = _MISSING
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __str__(self):
        return f"{self.api}-{self.name}"


def _convert(x, make):
    """Numpy arrays become `make(x)`, inside tuples too; anything else (bad input) stays as is."""
    if isinstance(x, tuple):
        return tuple(_convert(e, make) for e in x)
    return make(x) if isinstance(x, np.ndarray) else x


def to_torch(x):
    return _convert(x, torch.tensor)


def to_jax(x):
    return _convert(x, jnp.asarray)


def run(api, fn, inputs, v, kwargs, convert):
    args = (fn, convert(inputs)) + (() if v is _MISSING else (convert(v),))
    try:
        with warnings.catch_warnings():
            if convert is to_torch:  # torch's own forward-mode path warns about torch.jit
                warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(TF if convert is to_torch else compat, api)(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 - the exception is what is compared
        return None, e


def assert_same(j, t, path="result"):
    if isinstance(t, tuple | list):
        assert type(j) is type(t), f"{path}: torch returns a {type(t).__name__}, jhvp a {type(j).__name__}"
        assert len(j) == len(t), f"{path}: lengths {len(j)} vs {len(t)}"
        for k, (a, b) in enumerate(zip(j, t, strict=True)):
            assert_same(a, b, f"{path}[{k}]")
        return
    assert isinstance(t, torch.Tensor)
    assert isinstance(j, jax.Array), f"{path}: expected an array, got {type(j).__name__}"
    assert tuple(j.shape) == tuple(t.shape), f"{path}: shapes {j.shape} vs {tuple(t.shape)}"
    np.testing.assert_allclose(np.asarray(j), t.detach().numpy(), rtol=RTOL, atol=RTOL, err_msg=path)


rng = np.random.default_rng(0)


def r(*shape):
    return rng.uniform(0.1, 1.0, size=shape)


inp4, v4, v3 = r(4), r(4), r(3)
inp44 = r(4, 4)
CASES: list[Case] = []


def add(api, name, tf, jf, inputs, v=_MISSING, **kwargs):
    CASES.append(Case(api, name, tf, jf, inputs, v, kwargs))


# ---- error checks (torch's *_err_check) ----
for api in ("vjp", "jvp"):
    add(api, "inputs-not-tensor", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], (inp4, 2), v3 if api == "vjp" else v4)
    add(api, "inputs-list", lambda a: 3 * a, lambda a: 3 * a, [inp4], v4)
    add(api, "inputs-string", lambda a: 3 * a, lambda a: 3 * a, "abc", v4)
    add(api, "outputs-not-tensor", lambda a: (3 * a.narrow(0, 0, 3), "bar"), lambda a: (3 * a[:3], "bar"), inp4, v3 if api == "vjp" else v4)
    add(api, "v-none", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], inp4)
    add(api, "v-two", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], inp4, (v4, v4) if api == "jvp" else (v3, v3))
    add(api, "v-size", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], inp4, v4[:2])
    add(api, "v-not-tensor", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], inp4, (v3, 2))
    add(api, "ok", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], inp4, v3 if api == "vjp" else v4)
    add(api, "tuple-v-length", lambda a, b: a * b, lambda a, b: a * b, (inp4, inp4), (v4,))
    add(api, "tuple-v-entry-size", lambda a, b: (a * b, a), lambda a, b: (a * b, a), (inp4, inp4), (v4, v3))

for api in ("hvp", "vhp"):
    foo = (lambda a: 3 * a.narrow(0, 0, 3).exp().sum(), lambda a: 3 * jnp.exp(a[:3]).sum())
    add(api, "inputs-not-tensor", *foo, (inp4, 2), v4)
    add(api, "outputs-not-tensor", lambda a: (3 * a.narrow(0, 0, 3), "bar"), lambda a: (3 * a[:3], "bar"), inp4, v4)
    add(api, "output-not-single", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], inp4, v4)
    add(api, "output-tuple", lambda a: (a.sum(), a.sum()), lambda a: (a.sum(), a.sum()), inp4, v4)
    add(api, "v-size", *foo, inp4, r(5))
    add(api, "v-not-tensor", *foo, inp4, (v4, 2))
    add(api, "v-none", *foo, inp4)
    add(api, "v-before-func", lambda a: (a, "bar"), lambda a: (a, "bar"), inp4, r(5))
    add(api, "ok", *foo, inp4, v4)
    add(api, "two-inputs", lambda a, b: (3 * b.narrow(0, 0, 3) * a.narrow(0, 0, 3)).sum(),
        lambda a, b: (3 * b[:3] * a[:3]).sum(), (inp4, r(5)), (v4, r(5)))

for api in ("jacobian", "hessian"):
    for vec in (False, True):
        red = (lambda a: 3 * a.narrow(0, 0, 3).exp().sum(), lambda a: 3 * jnp.exp(a[:3]).sum())
        add(api, f"inputs-not-tensor-{vec}", *red, (inp4, 2), vectorize=vec)
        add(api, f"outputs-not-tensor-{vec}", lambda a: (3 * a.narrow(0, 0, 3), "bar"), lambda a: (3 * a[:3], "bar"), inp4, vectorize=vec)
        add(api, f"ok-{vec}", *red, inp4, vectorize=vec)
    add(api, "bad-strategy-first", lambda a: a.sum(), lambda a: a.sum(), (inp4, 2),
        **{"strategy" if api == "jacobian" else "outer_jacobian_strategy": "sideways"})
    key = "strategy" if api == "jacobian" else "outer_jacobian_strategy"
    cube = (lambda a: (a**3).sum(), lambda a: (a**3).sum())
    add(api, "fwd-create-graph", *cube, inp4, create_graph=True, vectorize=True, **{key: "forward-mode"})
    add(api, "fwd-strict", *cube, inp4, strict=True, vectorize=True, **{key: "forward-mode"})
    add(api, "fwd-not-vectorized", *cube, inp4, **{key: "forward-mode"})
    add(api, "fwd-vectorized", *cube, inp4, vectorize=True, **{key: "forward-mode"})
    add(api, "strict-vectorize", *cube, inp4, strict=True, vectorize=True)
add("jacobian", "tuple-out", lambda a, b: (b, 3 * a.narrow(0, 0, 3)), lambda a, b: (b, 3 * a[:3]), (inp4, r(5)))
add("jacobian", "fwd-tuple", lambda a, b: (a * b, a.sum()), lambda a, b: (a * b, a.sum()), (inp4, v4), vectorize=True, strategy="forward-mode")
add("hessian", "output-not-single", lambda a: 3 * a.narrow(0, 0, 3), lambda a: 3 * a[:3], inp4)
add("hessian", "output-tuple", lambda a: (3 * a.narrow(0, 0, 3), 3 * a.narrow(0, 0, 3)), lambda a: (3 * a[:3], 3 * a[:3]), inp4)
add("hessian", "two-inputs", lambda a, b: (3 * b.narrow(0, 0, 3) * a.narrow(0, 0, 3)).sum(), lambda a, b: (3 * b[:3] * a[:3]).sum(), (inp4, r(5)))
add("hessian", "integer-input", lambda a: a.sum(), lambda a: a.sum(), np.arange(3))

# ---- strict error checks (torch's *_err_check_strict) ----
sg = jax.lax.stop_gradient
for api in ("vjp", "jvp", "jacobian"):
    add(api, "strict-detached", lambda a: a.detach(), lambda a: sg(a), inp4, *(() if api == "jacobian" else (v4,)), strict=True)
    add(api, "nonstrict-detached", lambda a: a.detach(), lambda a: sg(a), inp4, *(() if api == "jacobian" else (v4,)))
    add(api, "strict-disconnected-input", lambda a, b: 2 * a, lambda a, b: 2 * a, (inp4, v4), *(() if api == "jacobian" else ((v4, v4) if api == "jvp" else (v4,),)), strict=True)
    add(api, "nonstrict-disconnected-input", lambda a, b: 2 * a, lambda a, b: 2 * a, (inp4, v4), *(() if api == "jacobian" else ((v4, v4) if api == "jvp" else (v4,),)))
    add(api, "strict-cg-linear", lambda a: a.clone(), lambda a: a * 1.0, inp4, *(() if api == "jacobian" else (v4,)), strict=True, create_graph=True)
    add(api, "nonstrict-cg-linear", lambda a: a.clone(), lambda a: a * 1.0, inp4, *(() if api == "jacobian" else (v4,)), create_graph=True)
    add(api, "strict-cg-nonlinear", lambda a: a.exp(), lambda a: jnp.exp(a), inp4, *(() if api == "jacobian" else (v4,)), strict=True, create_graph=True)
for api in ("hvp", "vhp", "hessian"):
    extra = () if api == "hessian" else (v4,)
    add(api, "strict-detached", lambda a: a.detach().sum(), lambda a: sg(a).sum(), inp4, *extra, strict=True)
    add(api, "nonstrict-detached", lambda a: a.detach().sum(), lambda a: sg(a).sum(), inp4, *extra)
    add(api, "strict-linear", lambda a: (3 * a).sum(), lambda a: (3 * a).sum(), inp4, *extra, strict=True)
    add(api, "nonstrict-linear", lambda a: (3 * a).sum(), lambda a: (3 * a).sum(), inp4, *extra)
    two = () if api == "hessian" else ((v4, v4),)
    add(api, "strict-disconnected-input", lambda a, b: (a**3).sum(), lambda a, b: (a**3).sum(), (inp4, v4), *two, strict=True)
    add(api, "strict-separable", lambda a, b: (a**3).sum() + (b**3).sum(), lambda a, b: (a**3).sum() + (b**3).sum(), (inp4, v4), *two, strict=True)
    add(api, "strict-coupled", lambda a, b: (a**2 * b**2).sum(), lambda a, b: (a**2 * b**2).sum(), (inp4, v4), *two, strict=True)
    add(api, "strict-cg-square", lambda a: (a * a).sum(), lambda a: (a * a).sum(), inp4, *extra, strict=True, create_graph=True)
    add(api, "strict-cg-cube", lambda a: (a * a * a).sum(), lambda a: (a * a * a).sum(), inp4, *extra, strict=True, create_graph=True)
    add(api, "strict-ok", lambda a: a.exp().sum(), lambda a: jnp.exp(a).sum(), inp4, *extra, strict=True)

def _torch_chain(a):
    # a -> y -> z through the loop: z depends on a only from the second iteration on.
    x, y, z = a, torch.ones_like(a), torch.ones_like(a)
    for _ in range(3):
        x, y, z = x, x, y
    return 2 * z


def _jax_chain(a):
    def body(carry, _):
        x, y, _z = carry
        return (x, x, y), None

    (_, _, z), _ = jax.lax.scan(body, (a, jnp.ones_like(a), jnp.ones_like(a)), None, length=3)
    return 2 * z


for api in ("vjp", "jvp"):
    add(api, "strict-scan-carry-chain", _torch_chain, _jax_chain, inp4, v4, strict=True)
add("jacobian", "strict-scan-carry-chain", _torch_chain, _jax_chain, inp4, strict=True)

# ---- outputs and scalar inputs (torch's *_output, *_scalar) ----
add("vjp", "reducer", lambda x: x.sum(dim=1), lambda x: x.sum(axis=1), inp44, r(4))
add("vjp", "adder", lambda x, y: 2 * x + 3 * y, lambda x, y: 2 * x + 3 * y, (r(2), r(2)), r(2))
add("vjp", "adder-tuple-out", lambda x, y: (2 * x + 3 * y, x + y), lambda x, y: (2 * x + 3 * y, x + y), (r(2), r(2)), (r(2), r(2)))
add("vjp", "scalar-out", lambda x: x.sum(), lambda x: x.sum(), inp44, np.ones(()))
add("vjp", "scalar-out-v-none", lambda x: x.sum(), lambda x: x.sum(), inp44)
add("vjp", "expander", lambda x: x.unsqueeze(0).repeat(4), lambda x: jnp.repeat(x[None], 4), r(), r(4))
add("jvp", "reducer", lambda x: x.sum(dim=1), lambda x: x.sum(axis=1), inp44, np.ones((4, 4)))
add("jvp", "adder", lambda x, y: 2 * x + 3 * y, lambda x, y: 2 * x + 3 * y, (r(2), r(2)), (r(2), r(2)))
add("jvp", "adder-tuple-out", lambda x, y: (2 * x + 3 * y, x * y), lambda x, y: (2 * x + 3 * y, x * y), (r(2), r(2)), (r(2), r(2)))
add("jvp", "expander", lambda x: x.unsqueeze(0).repeat(4), lambda x: jnp.repeat(x[None], 4), r(), r())
add("jvp", "expander-v-none", lambda x: x.unsqueeze(0).repeat(4), lambda x: jnp.repeat(x[None], 4), r())
for vec in (False, True):
    add("jacobian", f"exp-reducer-{vec}", lambda x: x.exp().sum(dim=1), lambda x: jnp.exp(x).sum(axis=1), inp44, vectorize=vec)
    add("jacobian", f"identity-{vec}", lambda x: x.clone(), lambda x: x * 1.0, inp4, vectorize=vec)
    add("jacobian", f"add-exp-reducer-{vec}", lambda x, y: (x + y.exp()).sum(dim=1), lambda x, y: (x + jnp.exp(y)).sum(axis=1), (inp44, r(4, 4)), vectorize=vec)
    add("jacobian", f"scalar-out-{vec}", lambda x: x.sum(), lambda x: x.sum(), inp44, vectorize=vec)
    add("jacobian", f"scalar-in-{vec}", lambda x: x.unsqueeze(0).repeat(4), lambda x: jnp.repeat(x[None], 4), r(), vectorize=vec)
    add("jacobian", f"multi-in-out-{vec}", lambda x, y: ((x * x) @ y, x @ (x.sum(1) * y), y.sum()), lambda x, y: ((x * x) @ y, x @ (x.sum(1)[None, :] * y), y.sum()), (r(5, 3), r(3, 5)), vectorize=vec)
    add("hessian", f"pow-reducer-{vec}", lambda x: x.pow(3).sum(), lambda x: (x**3).sum(), r(2, 2), vectorize=vec)
    add("hessian", f"add-pow-reducer-{vec}", lambda x, y: (x + y).pow(3).sum(), lambda x, y: ((x + y) ** 3).sum(), (r(2, 2), r(2, 2)), vectorize=vec)
    add("hessian", f"scalar-{vec}", lambda x: x.sum(), lambda x: x.sum(), r(), vectorize=vec)
    add("hessian", f"bad-reducer-{vec}", lambda x: x.sum().view(1, 1, 1), lambda x: x.sum().reshape(1, 1, 1), inp44, vectorize=vec)
    add("hessian", f"multi-input-{vec}", lambda x, y, z: ((x.relu() * x) @ y.sin() @ z).sum(), lambda x, y, z: ((jax.nn.relu(x) * x) @ jnp.sin(y) @ z).sum(), (r(2, 3), r(3, 5), r(5, 5)), vectorize=vec)
    add("hessian", f"unrelated-input-{vec}", lambda x, y: (x**2).sum(), lambda x, y: (x**2).sum(), (r(2), r(3)), vectorize=vec)
add("hessian", "multi-input-fwd", lambda x, y: ((x.sin() * x) @ y.cos()).sum(), lambda x, y: ((jnp.sin(x) * x) @ jnp.cos(y)).sum(), (r(2, 3), r(3, 5)), vectorize=True, outer_jacobian_strategy="forward-mode")
for api in ("hvp", "vhp"):
    foo = (lambda a: 3 * a.narrow(0, 0, 3).exp().sum(), lambda a: 3 * jnp.exp(a[:3]).sum())
    add(api, "output", *foo, inp44, np.ones((4, 4)))
    add(api, "tuple-output", lambda a, b: (a + 3 * b.narrow(0, 0, 3)).exp().sum(), lambda a, b: jnp.exp(a + 3 * b[:3]).sum(), (r(3), r(4)), (r(3), r(4)))
    add(api, "scalar-in", lambda x: x.exp().sum(), lambda x: jnp.exp(x).sum(), r(), r())
    add(api, "scalar-in-v-none", lambda x: x.exp().sum(), lambda x: jnp.exp(x).sum(), r())
    add(api, "bad-reducer", lambda x: x.exp().sum().view(1, 1, 1), lambda x: jnp.exp(x).sum().reshape(1, 1, 1), inp44, r(4, 4))
    add(api, "rosenbrock", lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(),
        lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(), r(10), r(10))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_same_as_torch(case):
    t_res, t_err = run(case.api, case.torch_fn, case.inputs, case.v, case.kwargs, to_torch)
    j_res, j_err = run(case.api, case.jax_fn, case.inputs, case.v, case.kwargs, to_jax)
    if t_err is not None:
        assert j_err is not None, f"torch raised {type(t_err).__name__}: {t_err}; jhvp returned"
        assert type(j_err) is type(t_err), (type(j_err), j_err, type(t_err), t_err)
        assert str(j_err) == str(t_err)
    else:
        assert j_err is None, f"torch returned; jhvp raised {type(j_err).__name__}: {j_err}"
        assert_same(j_res, t_res)


def test_error_cases_are_really_exercised():
    # The table above must contain errors of every kind torch raises, or the comparison is weak.
    kinds = set()
    for case in CASES:
        _, err = run(case.api, case.torch_fn, case.inputs, case.v, case.kwargs, to_torch)
        if err is not None:
            kinds.add(type(err).__name__)
    assert kinds == {"TypeError", "RuntimeError", "AssertionError", "NotImplementedError"}


# ---- documented differences: asserted so they stay deliberate ----


def test_difference_pow_under_strict_create_graph():
    # torch accepts a.pow(2) (its backward uses a) but rejects a*a; jhvp rejects both.
    x, v = torch.tensor(inp4), torch.tensor(v4)
    TF.hvp(lambda a: a.pow(2).sum(), x, v, strict=True, create_graph=True)
    with pytest.raises(RuntimeError, match="hessian of the user-provided function is independent of input 0"):
        compat.hvp(lambda a: (a**2).sum(), jnp.asarray(inp4), jnp.asarray(v4), strict=True, create_graph=True)


# ---- create_graph: differentiable results, the same derivatives as torch ----

CG = [
    ("hvp", lambda a, b: (a.exp() * b).sum() + (a * b).pow(3).sum(), lambda a, b: (jnp.exp(a) * b).sum() + ((a * b) ** 3).sum(), (r(3), r(3)), (r(3), r(3))),
    ("vhp", lambda a, b: (a.exp() * b).sum() + (a * b).pow(3).sum(), lambda a, b: (jnp.exp(a) * b).sum() + ((a * b) ** 3).sum(), (r(3), r(3)), (r(3), r(3))),
    ("jvp", lambda a: a.sin() * a, lambda a: jnp.sin(a) * a, r(3), r(3)),
    ("vjp", lambda a: a.sin() * a, lambda a: jnp.sin(a) * a, r(3), r(3)),
    ("jacobian", lambda a: a.sin() * a.sum(), lambda a: jnp.sin(a) * a.sum(), r(3), _MISSING),
    ("hessian", lambda a: (a.sin() * a.sum()).sum(), lambda a: (jnp.sin(a) * a.sum()).sum(), r(3), _MISSING),
]


def _flat_sum(res):
    if isinstance(res, tuple):
        return sum(_flat_sum(e) for e in res)
    return (res * res).sum()


@pytest.mark.parametrize("api,tf,jf,inputs,v", CG, ids=[c[0] for c in CG])
def test_create_graph_gives_torch_derivatives(api, tf, jf, inputs, v):
    t_in = tuple(torch.tensor(x, requires_grad=True) for x in (inputs if isinstance(inputs, tuple) else (inputs,)))
    t_args = (t_in if isinstance(inputs, tuple) else t_in[0],) + (() if v is _MISSING else (to_torch(v),))
    t_res = getattr(TF, api)(tf, *t_args, create_graph=True)
    t_grad = torch.autograd.grad(_flat_sum(t_res), t_in)

    def j_scalar(*xs):
        args = (xs if isinstance(inputs, tuple) else xs[0],) + (() if v is _MISSING else (to_jax(v),))
        return _flat_sum(getattr(compat, api)(jf, *args, create_graph=True))

    j_in = tuple(jnp.asarray(x) for x in (inputs if isinstance(inputs, tuple) else (inputs,)))
    j_grad = jax.grad(j_scalar, argnums=tuple(range(len(j_in))))(*j_in)
    assert_same(tuple(j_grad), tuple(t_grad))

    def j_detached(*xs):
        args = (xs if isinstance(inputs, tuple) else xs[0],) + (() if v is _MISSING else (to_jax(v),))
        return _flat_sum(getattr(compat, api)(jf, *args))

    for g in jax.grad(j_detached, argnums=tuple(range(len(j_in))))(*j_in):
        np.testing.assert_array_equal(np.asarray(g), 0.0)
