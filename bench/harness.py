"""The one timing harness: compile apart, warm-up, synchronised calls, interleaved rounds.

Every call is synchronised (`jax.block_until_ready`, or `torch.cuda.synchronize`), so what is
timed is the computation, not its dispatch. The methods of a case are timed in interleaved
rounds (a few calls of each method per round, round after round), so a slow drift of a shared
machine's speed falls on all methods alike and the ratios measured in one run stay honest.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import methods as M
from .cases import Case


@dataclasses.dataclass
class Budget:
    rounds: int  # interleaved rounds
    seconds_per_method: float  # steady-state timing budget per method and case
    max_calls_per_round: int = 200


QUICK = Budget(rounds=5, seconds_per_method=0.6)
FULL = Budget(rounds=9, seconds_per_method=3.0)
TINY = Budget(rounds=2, seconds_per_method=0.02, max_calls_per_round=3)

TOLERANCE = {"float32": 2e-3, "float64": 1e-8}  # max relative error vs the reference
FD_TOLERANCE = {"float32": 5e-2, "float64": 1e-5}  # finite differences are approximate


def _timed(thunk, device) -> float:
    t0 = time.perf_counter()
    M.synchronize(thunk(), device)
    return time.perf_counter() - t0


def run_case(case: Case, methods: list[str], device: str, dtype: str, budget: Budget,
             progress=None) -> list[dict]:
    """Times every applicable method on one case; returns one record per method."""
    thunks, records = {}, {}
    outputs = {}
    for name in methods:
        if progress:
            progress(case, name, "compile")
        t0 = time.perf_counter()
        thunk = M.build(name, case, device)
        if thunk is None:
            continue
        result = thunk()
        M.synchronize(result, device)
        compile_s = time.perf_counter() - t0  # tracing + compilation + first run (+ set-up)
        estimate = _timed(thunk, device)  # one warm call, to size the rounds
        thunks[name] = (thunk, estimate)
        outputs[name] = M.as_numpy_dict(result, case)
        records[name] = {"compile_s": compile_s, "samples": []}

    # Interleaved rounds. Each method gets k calls per round, k sized to the budget, and within a
    # framework the calls of its methods are spread evenly through the round (call-level round
    # robin), so a burst of load from a neighbour falls on every method in proportion. The two
    # frameworks take turns in blocks, each opened by an untimed call: torch's OpenMP workers
    # spin-wait after each parallel region and would slow whichever JAX call came next (measured
    # 8x on a 2-core machine), and XLA's thread pool would do the same to torch.
    per_round = budget.seconds_per_method / budget.rounds
    quota = {name: int(min(budget.max_calls_per_round, max(1, per_round / max(est, 1e-7))))
             for name, (_, est) in thunks.items()}
    blocks = []
    for framework in ("jax", "torch"):
        names = [n for n in quota if n.startswith("torch") == (framework == "torch")]
        schedule = sorted(((i + 0.5) / quota[n], j, n) for j, n in enumerate(names)
                          for i in range(quota[n]))
        if schedule:
            blocks.append([n for _, _, n in schedule])
    for r in range(budget.rounds):
        if progress and thunks:
            progress(case, next(iter(thunks)), f"round {r + 1}/{budget.rounds}")
        for block in blocks:
            M.synchronize(thunks[block[0]][0](), device)  # untimed: settle the thread pools
            for name in block:
                records[name]["samples"].append(_timed(thunks[name][0], device))

    reference = outputs.get("reference")
    exact = case.exact_hvp(case.params, case.tangent) if case.exact_hvp else None
    # G·v and F·v have their own references, computed by hand; H·v's does not apply to them.
    own = {kind: M.curvature_reference(kind, case)
           for kind, names in (("ggn", M.GGN_METHODS), ("fisher", M.FISHER_METHODS))
           if names & set(records)}
    medians = {n: float(np.median(r["samples"])) for n, r in records.items()}
    grad_unit = medians.get("jax_grad")
    out = []
    for name, rec in records.items():
        samples = np.asarray(rec["samples"])
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
            "median_s": medians[name],
            "spread_s": float(np.percentile(samples, 75) - np.percentile(samples, 25)),
            "min_s": float(samples.min()),
            "n_samples": int(samples.size),
            "compile_s": rec["compile_s"],
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
