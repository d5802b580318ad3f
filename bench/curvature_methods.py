"""The curvature suite's methods: each turns (task, case) into a set-up and a solve.

`setup()` builds what the method needs from the case's arrays (a `jhvp.HessianOperator`, a scipy
operator, PyHessian's `hessian` object, which runs its forward and create-graph backward pass) and
blocks; `solve(state)` answers the task and returns a dict of numpy values with `num_matvecs`:
`eigenvalues` (largest first), `trace` (and `stderr`), or quadrature `nodes` and `weights`.
Every JAX method applies the same operator; the hand-written loops are what users write today:
a jitted step and a host-side loop. Only jhvp's public API is used.
"""

from __future__ import annotations

import numpy as np

from .cases import Case

EIG5_MATVECS = 32  # eigh(k=5, num_matvecs=32) and its baselines
EIG1_MATVECS = 32  # the cap of eigh(k=1, rtol=...)
EIG1_RTOL = {"float32": 1e-4, "float64": 1e-8}
TRACE_MATVECS, TRACE_BATCH = 99, 33
DENSITY_PROBES, DENSITY_MATVECS = 4, 32
PYHESSIAN_EIG = {"maxIter": 200, "tol": 1e-6}
PYHESSIAN_TRACE = {"maxIter": TRACE_MATVECS, "tol": 1e-3}  # its default tol
SCIPY_TOL = {"float32": 1e-5, "float64": 1e-10}

METHODS = {
    "eig5": ["jhvp_eigh", "matvecs", "loop_lanczos", "scipy_eigsh", "matfree_lanczos",
             "pyhessian"],
    "eig1": ["jhvp_eigh_rtol", "loop_power", "scipy_eigsh", "matfree_lanczos", "pyhessian"],
    "trace": ["jhvp_trace", "jhvp_trace_hutchinson", "loop_hutchinson", "matfree_hutchinson",
              "pyhessian"],
    "density": ["jhvp_density", "loop_slq", "matfree_slq", "pyhessian"],
}
TORCH_ONLY = {"pyhessian"}


def available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _jax_state(case: Case):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import jhvp

    p = {k: jnp.asarray(a) for k, a in case.params.items()}
    data = tuple(jnp.asarray(a) for a in case.data)
    op = jax.block_until_ready(jhvp.hessian_operator(case.loss_jax, (p, *data)))
    _, unravel = ravel_pytree(op.grad)
    return op, unravel


def _flat_matvec(unravel):
    """matvec(x, op) on flat vectors: the form matfree and the hand loops take."""
    from jax.flatten_util import ravel_pytree

    return lambda x, op: ravel_pytree(op(unravel(x)))[0]


def build(task: str, method: str, case: Case, dtype: str):
    """Returns (setup, solve), or None when the method does not apply to the case."""
    if method == "pyhessian":
        if case.family != "mlp-ce" or not available("pyhessian") or task == "density":
            return None
        return _pyhessian(task, case, dtype)
    if method.startswith("matfree") and not available("matfree"):
        return None
    if method == "scipy_eigsh" and not available("scipy"):
        return None
    return _jax(task, method, case, dtype)


# ---- JAX: jhvp, the hand loops, matfree, scipy -------------------------------------------------


def _jax(task: str, method: str, case: Case, dtype: str):  # noqa: C901 (one branch per method)
    import jax
    import jax.numpy as jnp

    import jhvp
    from jhvp import curvature

    key = jax.random.key(0)
    k = 5 if task == "eig5" else 1
    m = EIG5_MATVECS if task == "eig5" else EIG1_MATVECS

    def setup():
        return _jax_state(case)

    if method == "jhvp_eigh":
        def solve(state):
            out = curvature.eigh(state[0], key, k=k, num_matvecs=m)
            return {"eigenvalues": np.asarray(out.eigenvalues), "num_matvecs": int(out.num_matvecs)}
    elif method == "jhvp_eigh_rtol":
        def solve(state):
            out = curvature.eigh(state[0], key, k=1, num_matvecs=m, rtol=EIG1_RTOL[dtype])
            return {"eigenvalues": np.asarray(out.eigenvalues), "num_matvecs": int(out.num_matvecs)}
    elif method == "matvecs":
        # The floor, as a user writes it: the operator's application jitted once and called m
        # times back to back on vectors in the parameters' structure (no ravel, no Lanczos).
        compiled = {}

        def solve(state):
            op, _ = state
            if not compiled:
                def apply(op, v):
                    w = op @ v
                    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(w)))
                    return jax.tree.map(lambda x: x / norm, w)

                compiled["f"] = jax.jit(apply)
            v = jax.tree.map(jnp.ones_like, op.grad)
            for _ in range(m):
                v = compiled["f"](op, v)
            jax.block_until_ready(v)
            return {"num_matvecs": m}
    elif method in ("jhvp_trace", "jhvp_trace_hutchinson"):
        how = "hutch++" if method == "jhvp_trace" else "hutchinson"

        def solve(state):
            out = curvature.trace(state[0], key, num_matvecs=TRACE_MATVECS, method=how,
                                  batch_size=TRACE_BATCH)
            return {"trace": float(out.estimate), "stderr": float(out.stderr),
                    "num_matvecs": int(out.num_matvecs)}
    elif method == "jhvp_density":
        def solve(state):
            # All probes vmapped at once, as matfree's SLQ below runs them (the default,
            # batch_size=1, keeps one Lanczos basis alive at a time instead).
            out = curvature.spectral_density(state[0], key, num_probes=DENSITY_PROBES,
                                             num_matvecs=DENSITY_MATVECS,
                                             batch_size=DENSITY_PROBES)
            return {"nodes": np.asarray(out.nodes), "weights": np.asarray(out.weights),
                    "num_matvecs": DENSITY_PROBES * DENSITY_MATVECS}
    elif method.startswith("loop_"):
        return setup, _loop(task, method, k, m, key)
    elif method.startswith("matfree_"):
        return setup, _matfree(task, k, m, key)
    elif method == "scipy_eigsh":
        def solve(state):
            from scipy.sparse.linalg import LinearOperator, eigsh

            A = jhvp.to_scipy(state[0])
            count = [0]

            def mv(x):
                count[0] += 1
                return A.matvec(x)

            counted = LinearOperator(A.shape, matvec=mv, rmatvec=mv, dtype=A.dtype)
            v0 = np.random.default_rng(0).standard_normal(A.shape[0])
            vals = eigsh(counted, k=k, which="LA", tol=SCIPY_TOL[dtype], v0=v0,
                         return_eigenvectors=False)
            return {"eigenvalues": np.sort(vals)[::-1], "num_matvecs": count[0]}
    else:
        raise ValueError(f"unknown curvature method {method!r}")
    return setup, solve


def _loop(task, method, k, m, key):
    """What users write today: one jitted step, the iteration a Python loop on the host."""
    import jax
    import jax.numpy as jnp

    steps = {}

    def compiled(unravel):
        if not steps:
            mv = _flat_matvec(unravel)

            @jax.jit
            def lanczos_step(op, Q, j, beta):
                v, v_prev = Q[j], jnp.where(j > 0, Q[j - 1], jnp.zeros_like(Q[j]))
                w = mv(v, op)
                alpha = jnp.vdot(v, w)
                w = w - alpha * v - beta * v_prev
                w = w - Q.T @ (Q @ w)  # full reorthogonalisation (rows past j are zero)
                beta = jnp.linalg.norm(w)
                return Q.at[j + 1].set(w / beta), alpha, beta

            @jax.jit
            def power_step(op, v):
                w = mv(v, op)
                return w / jnp.linalg.norm(w), jnp.vdot(v, w)

            @jax.jit
            def probe(key, i, n_like):
                return jax.random.rademacher(jax.random.fold_in(key, i), n_like.shape,
                                             n_like.dtype)

            steps.update(lanczos=lanczos_step, power=power_step, probe=probe,
                         vdot=jax.jit(jnp.vdot), mv=jax.jit(mv))
        return steps

    def lanczos(op, s, v0):
        Q = jnp.zeros((m + 1, v0.size), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
        alphas, betas, beta = [], [], jnp.zeros((), v0.dtype)
        for j in range(m):
            Q, alpha, beta = s["lanczos"](op, Q, j, beta)
            alphas.append(float(alpha))
            betas.append(float(beta))
        T = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
        return np.linalg.eigh(T)

    def solve(state):
        op, unravel = state
        s = compiled(unravel)
        n, dtype = op.shape[0], op.value.dtype
        if method == "loop_lanczos":
            v0 = jax.random.normal(key, (n,), dtype)
            theta, _ = lanczos(op, s, v0)
            return {"eigenvalues": theta[::-1][:k], "num_matvecs": m}
        if method == "loop_power":  # PyHessian's algorithm and stopping rule, in JAX
            v = jax.random.normal(key, (n,), dtype)
            v = v / jnp.linalg.norm(v)
            lam, used = None, 0
            for _ in range(PYHESSIAN_EIG["maxIter"]):
                used += 1
                v, new = s["power"](op, v)
                new = float(new)
                if lam is not None and abs(lam - new) / (abs(lam) + 1e-6) < PYHESSIAN_EIG["tol"]:
                    lam = new
                    break
                lam = new
            return {"eigenvalues": np.array([lam]), "num_matvecs": used}
        like = jnp.zeros(n, dtype)
        if method == "loop_hutchinson":
            samples = []
            for i in range(TRACE_MATVECS):
                v = s["probe"](key, i, like)
                samples.append(s["vdot"](v, s["mv"](v, op)))
            samples = np.asarray(jnp.stack(samples), np.float64)
            return {"trace": float(samples.mean()),
                    "stderr": float(samples.std(ddof=1) / np.sqrt(samples.size)),
                    "num_matvecs": TRACE_MATVECS}
        if method == "loop_slq":
            nodes, weights = [], []
            for i in range(DENSITY_PROBES):
                theta, S = lanczos(op, s, s["probe"](key, i, like))
                nodes.append(theta)
                weights.append(S[0] ** 2)
            return {"nodes": np.array(nodes), "weights": np.array(weights),
                    "num_matvecs": DENSITY_PROBES * DENSITY_MATVECS}
        raise ValueError(f"unknown loop method {method!r}")

    return solve


def _matfree(task, k, m, key):
    """matfree 0.6.3 on the flat matvec of the same operator (its `matvec(v, *params)` form)."""
    import jax
    import jax.numpy as jnp
    from matfree import decomp, eig, stochtrace

    cache = {}

    def program(op, unravel):
        if "f" in cache:
            return cache["f"]
        mv = _flat_matvec(unravel)
        n, dtype = op.shape[0], op.value.dtype
        if task in ("eig5", "eig1"):
            eigh = eig.eigh_partial(decomp.tridiag_sym(m))

            def f(op):  # all m Ritz values, ascending: the caller takes the top k
                vals, _ = eigh(mv, jax.random.normal(key, (n,), dtype), op)
                return vals[::-1][:k]
        elif task == "trace":
            sampler = stochtrace.sampler_signs(jnp.zeros(n, dtype), num=TRACE_MATVECS)
            f = stochtrace.estimator_monte_carlo_mean_and_sem(stochtrace.monte_carlo_trace(),
                                                              sampler)
            f = (lambda est: lambda op: est(mv, key, op))(f)
        else:  # density: no helper in matfree; SLQ from its tridiagonalisation
            tridiag = decomp.tridiag_sym(DENSITY_MATVECS)
            probes = stochtrace.sampler_signs(jnp.zeros(n, dtype), num=DENSITY_PROBES)

            def f(op):
                def one(v):
                    _, T, *_ = tridiag(mv, v / jnp.linalg.norm(v), op)
                    theta, S = jnp.linalg.eigh(T)
                    return theta, S[0] ** 2

                return jax.vmap(one)(probes(key))
        cache["f"] = jax.jit(f)
        return cache["f"]

    def solve(state):
        op, unravel = state
        out = program(op, unravel)(op)
        if task in ("eig5", "eig1"):
            return {"eigenvalues": np.asarray(out), "num_matvecs": m}
        if task == "trace":
            return {"trace": float(out[0]), "stderr": float(out[1]), "num_matvecs": TRACE_MATVECS}
        return {"nodes": np.asarray(out[0]), "weights": np.asarray(out[1]),
                "num_matvecs": DENSITY_PROBES * DENSITY_MATVECS}

    return solve


# ---- PyHessian on the torch twin -----------------------------------------------------------------


def torch_twin(case: Case, dtype: str):
    """The MLP as `torch.nn.Sequential` of Linear/Tanh with CrossEntropyLoss, same weights."""
    import torch

    tdtype = torch.float64 if dtype == "float64" else torch.float32
    n = len(case.params) // 2
    layers = []
    for i in range(n):
        w = case.params[f"w{i}"]
        lin = torch.nn.Linear(*w.shape, dtype=tdtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(w.T))  # Linear computes x @ W.T + b
            lin.bias.copy_(torch.tensor(case.params[f"b{i}"]))
        layers += [lin] + ([torch.nn.Tanh()] if i < n - 1 else [])
    x, labels = case.data
    return (torch.nn.Sequential(*layers), torch.nn.CrossEntropyLoss(),
            (torch.tensor(x, dtype=tdtype), torch.tensor(labels, dtype=torch.long)))


def _pyhessian(task, case, dtype):
    import sys
    import warnings

    import pyhessian
    import torch

    ph = sys.modules["pyhessian.hessian"]  # the module: the package re-exports a class by its name

    count = [0]
    if not getattr(ph, "_bench_counted", False):  # count its H·v products
        inner = ph.hessian_vector_product

        def counted(*args, **kwargs):
            ph._bench_count[0] += 1
            return inner(*args, **kwargs)

        ph.hessian_vector_product, ph._bench_counted = counted, True
    ph._bench_count = count

    def setup():
        torch.set_default_dtype(torch.float64 if dtype == "float64" else torch.float32)
        model, criterion, data = torch_twin(case, dtype)
        with warnings.catch_warnings():  # its backward(create_graph=True) warns of a ref cycle
            warnings.simplefilter("ignore", UserWarning)
            return pyhessian.hessian(model, criterion, data=data, cuda=False)

    def solve(h):
        torch.manual_seed(0)
        count[0] = 0
        if task == "trace":
            samples = np.asarray(h.trace(**PYHESSIAN_TRACE), np.float64)
            stderr = samples.std(ddof=1) / np.sqrt(samples.size) if samples.size > 1 else np.nan
            return {"trace": float(samples.mean()), "stderr": float(stderr),
                    "num_matvecs": count[0]}
        vals, _ = h.eigenvalues(top_n=5 if task == "eig5" else 1, **PYHESSIAN_EIG)
        return {"eigenvalues": np.array(vals), "num_matvecs": count[0]}

    return setup, solve


def pyhessian_density_note(case: Case, dtype: str) -> str:
    """Calls PyHessian's density() once, briefly, and says how it fails (or that it ran)."""
    if not available("pyhessian"):
        return "PyHessian is not installed"
    import warnings

    import pyhessian
    import torch

    model, criterion, data = torch_twin(case, dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            h = pyhessian.hessian(model, criterion, data=data, cuda=False)
        h.density(iter=2, n_v=1)
    except Exception as err:  # noqa: BLE001 (its failure is what we report)
        return (f"PyHessian density() is broken on torch {torch.__version__}: it calls "
                f"`torch.eig`, removed from torch ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:120]}); not timed")
    return f"PyHessian density() ran on torch {torch.__version__}; not timed here"
