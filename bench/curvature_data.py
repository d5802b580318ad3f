"""`python -m bench --suite curvature-data`: curvature of a loss over a whole dataset.

The cross-entropy MLP (~85k parameters; ~1.8M for the application alone) over N = 4096
examples in 8 batches of 512: one H·v of the full-dataset Hessian, its top eigenvalue and its
trace, by jhvp on the device (`jhvp.batches`) and streamed (a list of NumPy batches), by
PyHessian's dataloader mode on the torch twin (same weights, same batches) and by curvlinops'
`HessianLinearOperator` over the same list of batches (matvec; `scipy.sparse.linalg.eigsh` on
its scipy view; its `hutchinson_trace`). Warm times are medians over interleaved rounds (each
method once per round, after one untimed call); errors are against a float64 host Lanczos on the
full-dataset operator (eigenvalue) and a 600-matvec Hutch++ (trace; its standard error given).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

from . import cases as C
from . import curvature_methods as CM

N, BATCH = 4096, 512
TRACE_MATVECS = 99
SIZES = {"85k": (64, 256, 256, 10), "1.8M": (512, 1024, 1024, 256), "tiny": (8, 16, 4)}
TINY = {"N": 200, "BATCH": 32}  # --suite curvature-data-tiny (the tests' run): 7 batches, last 8


def _problem(label: str, n: int, dtype):
    return C.mlp_ce(SIZES[label], n, dtype, label)


def _jax_side(case, batch: int):
    import jax
    import jax.numpy as jnp

    import jhvp

    params = {k: jnp.asarray(a) for k, a in case.params.items()}
    x, labels = case.data
    device = jhvp.hessian_operator(case.loss_jax, (params,),
                                   data=jhvp.batches(jnp.asarray(x), jnp.asarray(labels),
                                                     batch_size=batch))
    loader = [(x[i:i + batch], labels[i:i + batch]) for i in range(0, x.shape[0], batch)]
    streamed = jhvp.hessian_operator(case.loss_jax, (params,), data=loader)
    v = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(0).standard_normal(a.shape),
                                           a.dtype), params)
    apply = jax.jit(lambda op, v: op @ v)
    hvp = jax.jit(lambda p, xb, yb, v: jhvp.hvp(case.loss_jax, (p, xb, yb), v))
    on_device = [(jnp.asarray(xb), jnp.asarray(yb)) for xb, yb in loader]

    def sum_of_batches():
        out = [hvp(params, xb, yb, v) for xb, yb in on_device]
        return jax.block_until_ready(out)

    return {"device": device, "streamed": streamed, "v": v, "params": params,
            "loader": loader, "apply": lambda: jax.block_until_ready(apply(device, v)),
            "apply_streamed": lambda: jax.block_until_ready(streamed @ v),
            "sum_of_batches": sum_of_batches}


def _torch_side(case, dtype: str, batch: int):
    import torch

    # PyHessian and the probes below draw vectors in the default dtype: the run's.
    torch.set_default_dtype(torch.float64 if dtype == "float64" else torch.float32)
    model, criterion, (x, labels) = CM.torch_twin(case, dtype)
    loader = [(x[i:i + batch], labels[i:i + batch]) for i in range(0, x.shape[0], batch)]
    return model, criterion, loader, torch


def _pyhessian(model, criterion, loader):
    import warnings

    import pyhessian

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pyhessian.hessian(model, criterion, dataloader=loader, cuda=False)


def _curvlinops(model, criterion, loader):
    from curvlinops import HessianLinearOperator

    return HessianLinearOperator(model, criterion, list(model.parameters()), loader,
                                 check_deterministic=False)


def _framework(name: str) -> str:
    return "torch" if name.startswith(("pyhessian", "curvlinops")) else "jax"


def _timed(methods: dict, rounds: int) -> dict:
    """Median seconds per method over interleaved rounds, after one untimed call each.

    Where the framework changes, a pause first: PyTorch's OpenMP threads spin on the cores for
    a while after its last call, and the next JAX call would pay for it (measured up to 1.2x).
    """
    out = {name: fn() for name, fn in methods.items()}  # warm-up (compiles), and the answers
    times = {name: [] for name in methods}
    last = None
    for _ in range(rounds):
        for name, fn in methods.items():
            if _framework(name) != last:
                time.sleep(0.5)
                last = _framework(name)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "answer": out[name]}
            for name, t in times.items()}


def _applications(label: str, dtype, rounds: int, with_torch: bool, n: int = N,
                  batch: int = BATCH) -> list[dict]:
    case = _problem(label, n, dtype)
    j = _jax_side(case, batch)
    methods = {"jhvp_batches": j["apply"], "jhvp_streamed": j["apply_streamed"],
               "sum_of_8_hvp": j["sum_of_batches"]}
    # JAX's methods interleaved with each other only: interleaved with PyTorch's, the one-program
    # application measured up to 1.6x slower than alone (each framework's threads and caches).
    timed = _timed(methods, rounds)
    if with_torch:
        model, criterion, loader, torch = _torch_side(case, np.dtype(dtype).name, batch)
        lin = _curvlinops(model, criterion, loader)
        h = _pyhessian(model, criterion, loader)
        vt = torch.randn(sum(p.numel() for p in model.parameters()))
        vlist = [torch.randn_like(p) for p in model.parameters()]
        timed.update(_timed({"curvlinops_matvec": lambda: lin @ vt,
                             "pyhessian_dataloader_hv": lambda: h.dataloader_hv_product(vlist)},
                            rounds))
    base = timed["sum_of_8_hvp"]["median_s"]
    return [{"case": f"mlp-ce-{label}", "task": "application", "method": name,
             "median_s": t["median_s"], "min_s": t["min_s"],
             "ratio_to_sum_of_batches": t["median_s"] / base} for name, t in timed.items()]


def _reference_top(op, steps: int) -> float:
    """The top Ritz value of a float64 host Lanczos with full reorthogonalisation."""
    import jhvp

    from .curvature import _host_lanczos

    return float(_host_lanczos(jhvp.to_scipy(op), steps)[0])


def _answers(dtype, rounds: int, label: str = "85k", n: int = N,
             batch: int = BATCH) -> list[dict]:
    import jax
    import scipy.sparse.linalg as sla

    import jhvp

    case = _problem(label, n, dtype)
    j = _jax_side(case, batch)
    model, criterion, loader, torch = _torch_side(case, np.dtype(dtype).name, batch)
    lin = _curvlinops(model, criterion, loader)
    h = _pyhessian(model, criterion, loader)
    key = jax.random.key(0)
    rtol = 1e-6 if np.dtype(dtype) == np.float64 else 1e-5
    count = {}  # method -> the operator applications its last answer used

    def jhvp_top(name, op):
        def run():
            out = jhvp.curvature.eigh(op, key, 1, rtol=rtol)
            count[name] = int(out.num_matvecs)
            return float(out.eigenvalues[0])
        return run

    def jhvp_trace(name, op):
        def run():
            out = jhvp.curvature.trace(op, key, num_matvecs=TRACE_MATVECS)
            count[name] = TRACE_MATVECS
            return float(out.estimate), float(out.stderr)
        return run

    inner = h.dataloader_hv_product
    calls = [0]

    def counted(v):
        calls[0] += 1
        return inner(v)

    h.dataloader_hv_product = counted

    def pyhessian_top():
        torch.manual_seed(0)
        calls[0] = 0
        value = float(h.eigenvalues(maxIter=200, tol=1e-6, top_n=1)[0][0])
        count["pyhessian_eigenvalues"] = calls[0]
        return value

    def pyhessian_trace():
        torch.manual_seed(0)
        calls[0] = 0
        s = np.asarray(h.trace(maxIter=TRACE_MATVECS, tol=1e-3), np.float64)
        count["pyhessian_trace"] = calls[0]
        return float(s.mean()), float(s.std(ddof=1) / np.sqrt(s.size))

    scipy_lin = lin.to_scipy()
    eigsh_calls = [0]

    def scipy_matvec(x):
        eigsh_calls[0] += 1
        return scipy_lin.matvec(x)

    counted_lin = sla.LinearOperator(scipy_lin.shape, matvec=scipy_matvec, dtype=scipy_lin.dtype)

    def curvlinops_top():
        eigsh_calls[0] = 0
        value = float(sla.eigsh(counted_lin, k=1, which="LA", tol=1e-5)[0][0])
        count["curvlinops_scipy_eigsh"] = eigsh_calls[0]
        return value

    def curvlinops_trace():
        import curvlinops

        torch.manual_seed(0)
        count["curvlinops_hutchinson_trace"] = TRACE_MATVECS
        return float(curvlinops.hutchinson_trace(lin, TRACE_MATVECS)), float("nan")

    top = _timed({"jhvp_eigh_batches": jhvp_top("jhvp_eigh_batches", j["device"]),
                  "jhvp_eigh_streamed": jhvp_top("jhvp_eigh_streamed", j["streamed"]),
                  "pyhessian_eigenvalues": pyhessian_top,
                  "curvlinops_scipy_eigsh": curvlinops_top}, rounds)
    trace = _timed({"jhvp_trace_batches": jhvp_trace("jhvp_trace_batches", j["device"]),
                    "jhvp_trace_streamed": jhvp_trace("jhvp_trace_streamed", j["streamed"]),
                    "pyhessian_trace": pyhessian_trace,
                    "curvlinops_hutchinson_trace": curvlinops_trace}, rounds)
    n_params = j["device"].shape[0]
    if n_params <= 3000:  # dense: exact references
        dense = np.asarray(j["device"].as_matrix(), np.float64)
        ref_top = float(np.linalg.eigvalsh((dense + dense.T) / 2)[-1])
        ref_trace, ref_err = float(np.trace(dense)), 0.0
    else:
        ref_top = _reference_top(j["device"], 120)
        ref = jhvp.curvature.trace(j["device"], jax.random.key(99), num_matvecs=600,
                                   batch_size=50)
        ref_trace, ref_err = float(ref.estimate), float(ref.stderr)
    base_top = top["pyhessian_eigenvalues"]["median_s"]
    records = [{"case": f"mlp-ce-{label}", "task": "top eigenvalue", "method": name,
                "median_s": t["median_s"], "answer": t["answer"],
                "error": abs(t["answer"] - ref_top) / abs(ref_top),
                "reference": ref_top, "speedup_vs_pyhessian": base_top / t["median_s"],
                "num_matvecs": count.get(name)}
               for name, t in top.items()]
    base_trace = trace["pyhessian_trace"]["median_s"]
    records += [{"case": f"mlp-ce-{label}", "task": "trace", "method": name,
                 "median_s": t["median_s"], "answer": t["answer"][0], "stderr": t["answer"][1],
                 "error": abs(t["answer"][0] - ref_trace) / abs(ref_trace),
                 "reference": ref_trace, "reference_stderr": ref_err,
                 "speedup_vs_pyhessian": base_trace / t["median_s"],
                 "num_matvecs": count.get(name)}
                for name, t in trace.items()]
    return records


def table(records: list[dict]) -> str:
    lines = ["| case | task | method | median | ratio / speed-up | answer | rel. error | H·v |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        ratio = r.get("ratio_to_sum_of_batches", r.get("speedup_vs_pyhessian"))
        kind = "x sum" if "ratio_to_sum_of_batches" in r else "x PyH"
        answer = r.get("answer")
        lines.append(
            f"| {r['case']} | {r['task']} | {r['method']} | {r['median_s'] * 1e3:.1f} ms | "
            f"{ratio:.2f} {kind} | {'' if answer is None else f'{answer:.6g}'} | "
            f"{'' if r.get('error') is None else format(r['error'], '.1e')} | "
            f"{r.get('num_matvecs') or ''} |")
    return "\n".join(lines)


def main(args, header: dict) -> int:
    dtype = np.float64 if args.dtype == "float64" else np.float32
    rounds = args.rounds or 5
    torch_ok = CM.available("pyhessian") and CM.available("curvlinops")
    if not torch_ok:
        print("note: pyhessian or curvlinops is not installed: the torch methods are left out")
    records, start = [], time.perf_counter()
    if args.suite == "curvature-data-tiny":
        records += _applications("tiny", dtype, 1, torch_ok, TINY["N"], TINY["BATCH"])
        if torch_ok:
            records += _answers(dtype, 1, "tiny", TINY["N"], TINY["BATCH"])
    else:
        for label in ("85k", "1.8M"):
            records += _applications(label, dtype, rounds, torch_ok and label == "85k")
            print(table(records), flush=True)
        if torch_ok:
            records += _answers(dtype, max(1, rounds // 2))
    header["wall_s"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "curvature_data.json"), "w") as fh:
        json.dump({"header": header, "records": records}, fh, indent=1, default=str)
    md = table(records)
    with open(os.path.join(args.out, "curvature_data.md"), "w") as fh:
        fh.write(md + "\n")
    print("\n" + md)
    print(f"\nwrote {args.out}/curvature_data.json, curvature_data.md in {header['wall_s']} s")
    return 0
