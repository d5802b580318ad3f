"""The main suite's run of one case: its H·v methods timed by the shared harness, each answer
checked against its reference, one record per method."""

from __future__ import annotations

from . import harness
from . import methods as M
from .cases import Case

TOLERANCE = {"float32": 2e-3, "float64": 1e-8}  # max relative error vs the reference
FD_TOLERANCE = {"float32": 5e-2, "float64": 1e-5}  # finite differences are approximate


def run_case(case: Case, methods: list[str], device: str, dtype: str, budget: harness.Budget,
             progress=None) -> list[dict]:
    """Times every applicable method on one case; returns one record per method."""

    def build(name):
        thunk = M.build(name, case, device)
        return thunk and harness.Method(thunk, framework="torch" if name.startswith("torch")
                                        else "jax")

    timings = harness.measure(methods, build, device, budget,
                              keep=lambda out: M.as_numpy_dict(out, case),
                              progress=progress and (lambda name, stage: progress(case, name, stage)))
    outputs = {name: t.output for name, t in timings.items()}
    reference = outputs.get("reference")
    exact = case.exact_hvp(case.params, case.tangent) if case.exact_hvp else None
    # G·v and F·v have their own references, computed by hand; H·v's does not apply to them.
    own = {kind: M.curvature_reference(kind, case)
           for kind, names in (("ggn", M.GGN_METHODS), ("fisher", M.FISHER_METHODS))
           if names & set(timings)}
    stats = {name: t.summary() for name, t in timings.items()}
    medians = {name: s["median_s"] for name, s in stats.items()}
    grad_unit = medians.get("jax_grad")
    out = []
    for name in timings:
        is_hvp = name not in M.GRAD_METHODS
        unit = medians.get("torch_grad") if name.startswith("torch") else grad_unit
        kind = "ggn" if name in M.GGN_METHODS else "fisher" if name in M.FISHER_METHODS else None
        err = M.rel_err(outputs[name], reference) if is_hvp and reference is not None else None
        err_exact = M.rel_err(outputs[name], exact) if is_hvp and exact is not None else None
        if kind:
            err, err_exact = M.rel_err(outputs[name], own[kind]), None
        tol = (FD_TOLERANCE if name == "finite_diff" else TOLERANCE)[dtype]
        checked = [e for e in (err, err_exact) if e is not None]
        out.append({
            "case": case.name,
            "family": case.family,
            "method": name,
            "framework": "torch" if name.startswith("torch") else "jax",
            "n_params": case.n_params,
            "dtype": dtype,
            "device": device,
            **stats[name],  # median_s, spread_s (IQR), min_s, n_samples, compile_s
            "peak_bytes": None,
            "peak_note": "not measured (run with --memory)",
            "ratio_vs_reference": medians[name] / medians["reference"] if "reference" in medians else None,
            "ratio_vs_grad": medians[name] / unit if unit else None,
            "rel_err": err,
            "rel_err_exact": err_exact,
            "checked_against": (f"hand-written {'Jᵀ H_ℓ J v' if kind == 'ggn' else '(1/N) Jᵀ(J v)'}"
                                if kind else "H·v reference"),
            "tolerance": tol,
            "ok": all(e <= tol for e in checked) if is_hvp else None,
        })
    return out
