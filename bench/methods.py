"""The methods under comparison: each turns a Case into a zero-argument thunk that computes H·v.

Thunks return the result in their framework's arrays; `as_numpy_dict` normalises it for the
error check. Building a thunk does no timed work except where the method's own set-up is part
of what it costs (the operator's linearization), which the harness counts as compile time.
Only the public jhvp API is used.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .cases import Case

JAX_METHODS = ["jax_grad", "reference", "jhvp_fwd_rev", "jhvp_rev_rev", "jhvp_rev_fwd",
               "jhvp_operator", "compat_hvp", "dense", "finite_diff", "ggn_fresh", "ggn_operator",
               "fisher_operator"]
TORCH_METHODS = ["torch_grad", "torch_hvp", "torch_vhp", "torch_func", "torch_curvlinops_ggn"]
# Not H·v: on the cases whose loss is split as model and output loss (`Case.model`), each checked
# against its own hand-written reference (`curvature_reference`), not against H·v.
GGN_METHODS = {"ggn_fresh", "ggn_operator", "torch_curvlinops_ggn"}
FISHER_METHODS = {"fisher_operator"}
# On the Equinox cases only (their `Case.methods`): the model passed to jhvp as a module, against
# the same model split by hand with `eqx.partition` (hand-written jvp-of-grad, and jhvp.hvp).
EQX_METHODS = ["eqx_module", "eqx_partition", "jhvp_partitioned"]
# Asked for by name only (--methods): the operator with its storage strategy forced.
EXTRA_METHODS = ["jhvp_operator_linearize", "jhvp_operator_recompute"]
GRAD_METHODS = {"jax_grad", "torch_grad"}  # the cost units, not H·v


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def equinox_available() -> bool:
    try:
        import equinox  # noqa: F401
    except ImportError:
        return False
    return True


def build(method: str, case: Case, device: str) -> Callable[[], object] | None:
    """Returns the thunk, or None when the method does not apply to this case."""
    if case.methods is not None and method not in case.methods:
        return None
    if method in GGN_METHODS | FISHER_METHODS:
        if case.model is None:
            return None
        if method == "torch_curvlinops_ggn":
            return _build_curvlinops(case, device)
        return _build_ggn(method, case)
    if case.needs_equinox:
        return _build_eqx(method, case)
    if method in EQX_METHODS:
        return None
    if method in TORCH_METHODS:
        return _build_torch(method, case, device)
    return _build_jax(method, case)


# ---- JAX ---------------------------------------------------------------------------------------


def _build_jax(method: str, case: Case):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import jhvp
    from jhvp import compat

    f = case.loss_jax
    put = jax.device_put
    p = {k: put(jnp.asarray(a)) for k, a in case.params.items()}
    v = {k: put(jnp.asarray(a)) for k, a in case.tangent.items()}
    data = tuple(put(jnp.asarray(a)) for a in case.data)

    if method == "jax_grad":
        grad = jax.jit(jax.grad(f))
        return lambda: grad(p, *data)
    if method == "reference":
        # The hand-written baseline every ratio is measured against.
        ref = jax.jit(lambda p, v, *data: jax.jvp(lambda q: jax.grad(f)(q, *data), (p,), (v,))[1])
        return lambda: ref(p, v, *data)
    if method.startswith("jhvp_") and not method.startswith("jhvp_operator"):
        mode = method[len("jhvp_"):]
        return lambda: jhvp.hvp(f, (p, *data), v, mode=mode)
    if method.startswith("jhvp_operator"):
        strategy = method[len("jhvp_operator_"):] or "auto"
        op = jhvp.hessian_operator(f, (p, *data), strategy=strategy)
        return lambda: op(v)
    if method == "compat_hvp":
        keys = case.keys

        def func(*leaves):  # torch style: a function of a tuple of arrays, data closed over
            return f(dict(zip(keys, leaves, strict=True)), *data)

        inputs = tuple(p[k] for k in keys)
        vs = tuple(v[k] for k in keys)
        return lambda: compat.hvp(func, inputs, vs)[1]
    if method == "dense":
        if not case.dense_ok:
            return None
        flat_v, _ = ravel_pytree(v)

        @jax.jit
        def dense(p, flat_v, *data):
            flat, unravel = ravel_pytree(p)
            H = jax.hessian(lambda z: f(unravel(z), *data))(flat)
            return unravel(H @ flat_v)

        return lambda: dense(p, flat_v, *data)
    if method == "finite_diff":
        # Central differences of the gradient, step ~ cbrt(machine eps) scaled to p and v.
        dtype = jnp.result_type(*jax.tree.leaves(p))
        eps_machine = float(jnp.finfo(dtype).eps)

        @jax.jit
        def fd(p, v, *data):
            pn = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(p)))
            vn = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(v)))
            h = eps_machine ** (1 / 3) * (1 + pn) / vn
            g = jax.grad(f)
            gp = g(jax.tree.map(lambda a, b: a + h * b, p, v), *data)
            gm = g(jax.tree.map(lambda a, b: a - h * b, p, v), *data)
            return jax.tree.map(lambda a, b: (a - b) / (2 * h), gp, gm)

        return lambda: fd(p, v, *data)
    raise ValueError(f"unknown method {method!r}")


# ---- GGN and empirical Fisher -----------------------------------------------------------------


def _split(case: Case):
    import jax.numpy as jnp

    p = {k: jnp.asarray(a) for k, a in case.params.items()}
    v = {k: jnp.asarray(a) for k, a in case.tangent.items()}
    x, y = (jnp.asarray(a) for a in case.data)
    return p, v, x, y


def _build_ggn(method: str, case: Case):
    import jax

    import jhvp

    p, v, x, y = _split(case)
    model, loss = case.model, case.out_loss
    if method == "ggn_fresh":  # build and apply in one jitted function of (params, data, v)
        fresh = jax.jit(lambda p, x, y, v: jhvp.ggn_operator(model, loss, (p, x),
                                                             loss_args=(y,))(v))
        return lambda: fresh(p, x, y, v)
    if method == "ggn_operator":
        op = jhvp.ggn_operator(model, loss, (p, x), loss_args=(y,))
    else:
        op = jhvp.empirical_fisher_operator(case.per_example, (p, x, y))
    apply = jax.jit(lambda op, v: op(v))  # the operator an argument, not baked-in constants
    return lambda: apply(op, v)


def curvature_reference(kind: str, case: Case) -> dict:
    """G·v = Jᵀ (∇²ℓ) J v or F·v = (1/N) Jᵀ (J v) by hand (jvp, loss HVP, vjp), as numpy."""
    import jax

    p, v, x, y = _split(case)
    if kind == "ggn":
        z, jv = jax.jvp(lambda q: case.model(q, x), (p,), (v,))
        hjv = jax.jvp(jax.grad(lambda z: case.out_loss(z, y)), (z,), (jv,))[1]
        out = jax.vjp(lambda q: case.model(q, x), p)[1](hjv)[0]
    else:
        losses, jv = jax.jvp(lambda q: case.per_example(q, x, y), (p,), (v,))
        out = jax.vjp(lambda q: case.per_example(q, x, y), p)[1](jv / losses.shape[0])[0]
    return {k: np.asarray(out[k], dtype=np.float64) for k in case.keys}


def _build_curvlinops(case: Case, device: str):
    """curvlinops' GGNLinearOperator matvec on the MLP as a torch module, same weights."""
    if case.family != "mlp" or not torch_available():
        return None
    try:
        from curvlinops import GGNLinearOperator
    except ImportError:
        return None
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    dtype = torch.float64 if case.params["w0"].dtype == np.float64 else torch.float32
    n = len(case.params) // 2
    layers = []
    for i in range(n):
        w = case.params[f"w{i}"]
        lin = torch.nn.Linear(*w.shape, dtype=dtype, device=dev)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(w.T))  # Linear computes x @ W.T + b
            lin.bias.copy_(torch.tensor(case.params[f"b{i}"]))
        layers += [lin] + ([torch.nn.Tanh()] if i < n - 1 else [])
    model = torch.nn.Sequential(*layers)
    x, y = (torch.tensor(a, device=dev) for a in case.data)
    params = list(model.parameters())  # w0, b0, w1, b1, ...
    G = GGNLinearOperator(model, torch.nn.MSELoss(), params, [(x, y)], check_deterministic=False)
    v = torch.cat([torch.tensor(case.tangent[f"w{i // 2}"].T if i % 2 == 0
                                else case.tangent[f"b{i // 2}"], device=dev).reshape(-1)
                   for i in range(2 * n)])
    sizes = [q.numel() for q in params]
    order = {f"w{i}": 2 * i for i in range(n)} | {f"b{i}": 2 * i + 1 for i in range(n)}

    def thunk():
        parts = torch.split(G @ v, sizes)  # views, in module order; weights back as (in, out)
        return tuple(parts[order[k]].reshape(params[order[k]].shape).T if k[0] == "w"
                     else parts[order[k]] for k in case.keys)

    return thunk


# ---- Equinox -----------------------------------------------------------------------------------


def _build_eqx(method: str, case: Case):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import jhvp

    if method == "reference":  # the dict-form MLP: the baseline and the correctness check
        return _build_jax(method, case)
    loss = case.module_loss
    model = case.to_module({k: jnp.asarray(a) for k, a in case.params.items()})
    # v is shaped like eqx.filter(model, eqx.is_inexact_array): arrays there, None elsewhere.
    tangent = case.to_module({k: jnp.asarray(a) for k, a in case.tangent.items()})
    v = eqx.filter(tangent, eqx.is_inexact_array)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    data = tuple(jnp.asarray(a) for a in case.data)

    def partitioned(p, *data):  # defined once: the same function object on every call
        return loss(eqx.combine(p, static), *data)

    if method == "jax_grad":  # the cost unit: the gradient of the split model
        grad = jax.jit(jax.grad(partitioned))
        return lambda: grad(params, *data)
    if method == "eqx_module":
        return lambda: jhvp.hvp(loss, (model, *data), v)
    if method == "eqx_partition":
        hand = jax.jit(lambda p, v, *data: jax.jvp(
            jax.grad(lambda q: partitioned(q, *data)), (p,), (v,))[1])
        return lambda: hand(params, v, *data)
    if method == "jhvp_partitioned":
        return lambda: jhvp.hvp(partitioned, (params, *data), v)
    return None


# ---- torch -------------------------------------------------------------------------------------


def _build_torch(method: str, case: Case, device: str):
    if case.loss_torch is None or not torch_available():
        return None
    import torch
    import torch.autograd.functional as TF

    dev = "cuda" if device == "gpu" else "cpu"
    if device == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated: IEEE float32
    keys = case.keys
    params = tuple(torch.tensor(case.params[k], device=dev) for k in keys)
    v = tuple(torch.tensor(case.tangent[k], device=dev) for k in keys)
    data = tuple(torch.tensor(a, device=dev) for a in case.data)
    f = case.loss_torch

    def func(*ps):
        return f(*ps, *data)

    if method == "torch_grad":
        leaves = tuple(t.clone().requires_grad_(True) for t in params)
        return lambda: torch.autograd.grad(func(*leaves), leaves)
    if method == "torch_hvp":
        return lambda: TF.hvp(func, params, v)[1]
    if method == "torch_vhp":
        return lambda: TF.vhp(func, params, v)[1]
    if method == "torch_func":
        grad = torch.func.grad(lambda ps: func(*ps))
        return lambda: torch.func.jvp(grad, (params,), (v,))[1]
    raise ValueError(f"unknown method {method!r}")


# ---- normalising results -----------------------------------------------------------------------


def as_numpy_dict(result, case: Case) -> dict:
    """Returns the thunk's result as {param name: float64 numpy array}."""
    if case.from_module is not None and not isinstance(result, dict):
        result = case.from_module(result)
    if isinstance(result, dict):
        return {k: np.asarray(result[k], dtype=np.float64) for k in case.keys}
    leaves = result if isinstance(result, tuple | list) else (result,)
    out = {}
    for k, leaf in zip(case.keys, leaves, strict=True):
        if hasattr(leaf, "detach"):
            leaf = leaf.detach().cpu().numpy()
        out[k] = np.asarray(leaf, dtype=np.float64)
    return out


def rel_err(a: dict, b: dict) -> float:
    """max |a - b| / max |b| over all leaves."""
    num = max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in b)
    den = max(float(np.max(np.abs(b[k]))) if b[k].size else 0.0 for k in b)
    return num / den if den > 0 else num


def synchronize(result, device: str) -> None:
    """Waits for the result: `jax.block_until_ready`, or a CUDA synchronisation for torch."""
    if _is_torch(result):
        if device == "gpu":
            import torch

            torch.cuda.synchronize()
        return
    import jax

    jax.block_until_ready(result)


def _is_torch(result) -> bool:
    leaf = result
    while isinstance(leaf, tuple | list | dict):
        if not leaf:
            return False
        leaf = next(iter(leaf.values())) if isinstance(leaf, dict) else leaf[0]
    return type(leaf).__module__.startswith("torch")
