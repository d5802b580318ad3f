"""Benchmark problems, each written in JAX and (when torch is importable) in torch, same maths.

A case holds numpy data: parameters as a dict of arrays (JAX side: a dict pytree; torch side: a
tuple of tensors in sorted-key order), constant data (a batch), and the tangent v. `loss_jax`
takes `(params_dict, *data)`; `loss_torch` takes `(*param_tensors, *data_tensors)`.

An Equinox case also holds the same maths as a module: `to_module` builds the model from the
params dict (its inexact-array leaves are those params), `module_loss` takes `(model, *data)`, and
`from_module` maps a model-shaped H·v back to the params dict, so every method is checked against
the same dict-form reference. Equinox is imported only when such a case is run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class Case:
    name: str
    family: str
    params: dict  # name -> np.ndarray
    data: tuple  # np.ndarrays, held fixed
    tangent: dict  # like params
    loss_jax: Callable
    loss_torch: Callable | None
    exact_hvp: Callable | None = None  # numpy reference, where the maths gives one
    dense_ok: bool = False  # small enough for the dense jax.hessian @ v
    methods: tuple[str, ...] | None = None  # the only methods that apply (None: every one)
    to_module: Callable | None = None  # params dict of JAX arrays -> Equinox module
    module_loss: Callable | None = None  # (module, *data) -> scalar
    from_module: Callable | None = None  # module-shaped pytree -> params dict
    # The loss split as model and output loss, for the GGN and Fisher methods (None: not split):
    # loss_jax(p, x, y) == out_loss(model(p, x), y); per_example(p, x, y) has shape (batch,).
    model: Callable | None = None
    out_loss: Callable | None = None
    per_example: Callable | None = None

    @property
    def needs_equinox(self) -> bool:
        return self.to_module is not None

    @property
    def n_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    @property
    def keys(self) -> list[str]:
        return sorted(self.params)


def _rng(seed):
    return np.random.default_rng(seed)


# ---- Rosenbrock -------------------------------------------------------------------------------


def _rosen_jax(p):
    import jax.numpy as jnp

    x = p["x"]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def _rosen_torch(x):
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def rosenbrock(n: int, dtype) -> Case:
    r = _rng(n)
    x = r.uniform(-1.0, 1.5, n).astype(dtype)
    v = r.standard_normal(n).astype(dtype)
    return Case(f"rosenbrock-{n:.0e}".replace("+0", ""), "rosenbrock", {"x": x}, (), {"x": v},
                _rosen_jax, _rosen_torch, dense_ok=n <= 2000)


# ---- MLP ---------------------------------------------------------------------------------------


def _mlp_model(p, x):
    import jax.numpy as jnp

    h = x
    n = len(p) // 2
    for i in range(n):
        h = h @ p[f"w{i}"] + p[f"b{i}"]
        if i < n - 1:
            h = jnp.tanh(h)
    return h


def _mse(out, y):
    import jax.numpy as jnp

    return jnp.mean((out - y) ** 2)


def _mlp_jax(p, x, y):
    return _mse(_mlp_model(p, x), y)


def _mse_per_example(model):
    # (batch,) losses whose mean is the loss: the MSE's mean runs over outputs too.
    def per_example(p, x, y):
        import jax.numpy as jnp

        return jnp.mean((model(p, x) - y) ** 2, axis=tuple(range(1, y.ndim)))

    return per_example


def _mlp_torch(*args):
    import torch

    n = (len(args) - 2) // 2
    # sorted keys: b0..b{n-1}, w0..w{n-1}
    bs, ws, (x, y) = args[:n], args[n:2 * n], args[2 * n:]
    h = x
    for i in range(n):
        h = h @ ws[i] + bs[i]
        if i < n - 1:
            h = torch.tanh(h)
    return ((h - y) ** 2).mean()


def mlp(sizes: tuple[int, ...], batch: int, dtype, label: str) -> Case:
    assert len(sizes) - 1 <= 10, "the torch side relies on b0..b9 sorting before w0..w9"
    r = _rng(len(sizes) * 1000 + batch)
    params, tangent = {}, {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = (r.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)
        params[f"b{i}"] = (0.1 * r.standard_normal(b)).astype(dtype)
        tangent[f"w{i}"] = r.standard_normal((a, b)).astype(dtype)
        tangent[f"b{i}"] = r.standard_normal(b).astype(dtype)
    x = r.standard_normal((batch, sizes[0])).astype(dtype)
    y = r.standard_normal((batch, sizes[-1])).astype(dtype)
    return Case(f"mlp-{label}", "mlp", params, (x, y), tangent, _mlp_jax, _mlp_torch,
                dense_ok=sum(p.size for p in params.values()) <= 2000, model=_mlp_model,
                out_loss=_mse, per_example=_mse_per_example(_mlp_model))


def _cross_entropy(out, labels):
    import jax.numpy as jnp

    # torch.nn.CrossEntropyLoss (mean): mean(logsumexp(z) - z[y]).
    return jnp.mean(_ce_per_example_logits(out, labels))


def _ce_per_example_logits(out, labels):
    import jax
    import jax.numpy as jnp

    return jax.nn.logsumexp(out, axis=-1) - jnp.take_along_axis(out, labels[:, None], -1)[:, 0]


def _mlp_ce_jax(p, x, labels):
    return _cross_entropy(_mlp_model(p, x), labels)


def _mlp_ce_per_example(p, x, labels):
    return _ce_per_example_logits(_mlp_model(p, x), labels)


def mlp_ce(sizes: tuple[int, ...], batch: int, dtype, label: str) -> Case:
    """The MLP of `mlp` with a cross-entropy loss on integer labels (the PyHessian twin's)."""
    base = mlp(sizes, batch, dtype, label)
    labels = _rng(batch + sizes[-1]).integers(0, sizes[-1], batch).astype(np.int32)
    return dataclasses.replace(base, name=f"mlp-ce-{label}", family="mlp-ce",
                               data=(base.data[0], labels), loss_jax=_mlp_ce_jax, loss_torch=None,
                               out_loss=_cross_entropy, per_example=_mlp_ce_per_example)


# ---- Equinox MLP ------------------------------------------------------------------------------
# `eqx.nn.MLP` as users write it: per-example `__call__` under `jax.vmap`, weights stored
# (out, in), the activation a callable field, sizes in static fields. Same maths as `_mlp_jax`
# with w{i} = layers[i].weight.T.

EQX_METHODS = ("jax_grad", "reference", "eqx_module", "eqx_partition", "jhvp_partitioned")


def _eqx_to_module(p):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    n = len(p) // 2
    sizes = [p["w0"].shape[0]] + [p[f"w{i}"].shape[1] for i in range(n)]
    assert len(set(sizes[1:-1])) <= 1, "eqx.nn.MLP has one hidden width"
    model = eqx.nn.MLP(sizes[0], sizes[-1], sizes[1] if n > 1 else sizes[-1], n - 1,
                       activation=jnp.tanh, key=jax.random.PRNGKey(0))

    def leaves(m):
        return [layer.weight for layer in m.layers] + [layer.bias for layer in m.layers]

    return eqx.tree_at(leaves, model, [p[f"w{i}"].T for i in range(n)]
                       + [p[f"b{i}"] for i in range(n)])


def _eqx_loss(model, x, y):
    import jax
    import jax.numpy as jnp

    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _eqx_from_module(tree) -> dict:
    out = {}
    for i, layer in enumerate(tree.layers):
        out[f"w{i}"], out[f"b{i}"] = np.asarray(layer.weight).T, np.asarray(layer.bias)
    return out


def eqx_mlp(sizes: tuple[int, ...], batch: int, dtype, label: str) -> Case:
    base = mlp(sizes, batch, dtype, label)
    return dataclasses.replace(base, name=f"eqx-mlp-{label}", family="eqx-mlp", loss_torch=None,
                               dense_ok=False, methods=EQX_METHODS, to_module=_eqx_to_module,
                               module_loss=_eqx_loss, from_module=_eqx_from_module)


# ---- transformer block -------------------------------------------------------------------------


def _block_jax(p, x, y, heads):
    return _mse(_block_model(p, x, heads), y)


def _block_model(p, x, heads):
    import jax
    import jax.numpy as jnp

    def norm(h, g):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-5) * g

    b, s, d = x.shape
    h = norm(x, p["ln1"])
    q, k, v = (jnp.reshape(h @ p[w], (b, s, heads, d // heads)) for w in ("wq", "wk", "wv"))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), axis=-1)
    o = jnp.reshape(jnp.einsum("bhqk,bkhd->bqhd", att, v), (b, s, d))
    x = x + o @ p["wo"]
    h = norm(x, p["ln2"])
    return x + jax.nn.gelu(h @ p["w1"], approximate=True) @ p["w2"]


def _block_torch(ln1, ln2, w1, w2, wk, wo, wq, wv, x, y, heads):
    import torch

    def norm(h, g):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * g

    b, s, d = x.shape
    h = norm(x, ln1)
    q, k, v = ((h @ w).reshape(b, s, heads, d // heads) for w in (wq, wk, wv))
    att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, d)
    x = x + o @ wo
    h = norm(x, ln2)
    x = x + torch.nn.functional.gelu(h @ w1, approximate="tanh") @ w2
    return ((x - y) ** 2).mean()


def transformer(d: int, seq: int, batch: int, heads: int, dtype) -> Case:
    r = _rng(d + seq)
    shapes = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "w1": (d, 4 * d),
              "w2": (4 * d, d), "ln1": (d,), "ln2": (d,)}
    params = {k: (r.standard_normal(s) / np.sqrt(s[0])).astype(dtype) for k, s in shapes.items()}
    params["ln1"] = (1 + 0.1 * r.standard_normal(d)).astype(dtype)
    params["ln2"] = (1 + 0.1 * r.standard_normal(d)).astype(dtype)
    tangent = {k: r.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    x = r.standard_normal((batch, seq, d)).astype(dtype)
    y = r.standard_normal((batch, seq, d)).astype(dtype)

    def loss_jax(p, x, y):
        return _block_jax(p, x, y, heads)

    def loss_torch(*args):
        return _block_torch(*args, heads=heads)

    def model(p, x):
        return _block_model(p, x, heads)

    return Case(f"transformer-d{d}", "transformer", params, (x, y), tangent, loss_jax, loss_torch,
                dense_ok=sum(p.size for p in params.values()) <= 2000, model=model,
                out_loss=_mse, per_example=_mse_per_example(model))


# ---- logistic regression -----------------------------------------------------------------------

LAMBDA = 1e-2


def _logreg_jax(p, X, y):
    import jax
    import jax.numpy as jnp

    z = X @ p["w"]
    return jnp.mean(jax.nn.softplus(-y * z)) + 0.5 * LAMBDA * jnp.sum(p["w"] ** 2)


def _logreg_torch(w, X, y):
    import torch

    z = X @ w
    return torch.nn.functional.softplus(-y * z).mean() + 0.5 * LAMBDA * (w**2).sum()


def logreg(m: int, d: int, dtype) -> Case:
    r = _rng(m + d)
    X = (r.standard_normal((m, d)) / np.sqrt(d)).astype(dtype)
    y = np.sign(r.standard_normal(m)).astype(dtype)
    w = (0.5 * r.standard_normal(d)).astype(dtype)
    v = r.standard_normal(d).astype(dtype)

    def exact(params, tangent):
        # H·v = Xᵀ D X v / m + λ v, D = σ(yz)(1 - σ(yz)): the independent check, in float64.
        Xd, wd, vd = X.astype(np.float64), params["w"].astype(np.float64), tangent["w"]
        s = 1.0 / (1.0 + np.exp(-(y * (Xd @ wd))))
        return {"w": Xd.T @ (s * (1 - s) * (Xd @ vd.astype(np.float64))) / m + LAMBDA * vd}

    return Case(f"logreg-{m}x{d}", "logreg", {"w": w}, (X, y), {"w": v}, _logreg_jax,
                _logreg_torch, exact_hvp=exact, dense_ok=d <= 2000)


# ---- suites ------------------------------------------------------------------------------------


def suite(kind: str, dtype, device: str) -> list[Case]:
    """The case list for `--quick`, the default full run, `tiny` (the tests' smoke run) or
    `batch` (the ~85k MLP at several batch sizes: how the comparison with torch depends on it).
    The full suite on a GPU adds a 5·10⁷-element Rosenbrock. The `eqx-mlp` cases need Equinox;
    `python -m bench` leaves them out, with a note, when it is not installed."""
    if kind == "batch":
        return [mlp((64, 256, 256, 10), b, dtype, f"85k-b{b}") for b in (8, 32, 128, 512)]
    if kind == "tiny":
        return [rosenbrock(100, dtype), logreg(64, 16, dtype), mlp((8, 16, 4), 8, dtype, "tiny"),
                eqx_mlp((8, 16, 4), 8, dtype, "tiny"), transformer(8, 4, 2, 2, dtype)]
    cases = [rosenbrock(100, dtype), rosenbrock(10_000, dtype), rosenbrock(1_000_000, dtype)]
    if kind == "full":
        cases.append(rosenbrock(10_000_000, dtype))
    if kind == "full" and device == "gpu":
        cases.append(rosenbrock(50_000_000, dtype))  # sized for a GPU's bandwidth
    cases += [
        mlp((64, 256, 256, 10), 128, dtype, "85k"),
        mlp((512, 1024, 1024, 256), 256, dtype, "1.8M"),
        eqx_mlp((64, 256, 256, 10), 128, dtype, "85k"),  # the same MLP as an Equinox module
    ]
    if kind == "full":
        cases.append(mlp((1024, 4096, 4096, 4096, 1024), 512, dtype, "42M"))
    cases += [transformer(64, 32, 8, 4, dtype), logreg(2000, 500, dtype)]
    if kind == "full":
        cases.append(transformer(256, 128, 16, 8, dtype))
    return cases
