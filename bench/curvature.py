"""`python -m bench --suite curvature`: top-5 and top eigenvalues, traces and spectral densities.

Each (case, task) is answered by jhvp's `curvature` functions, by the hand-written loops users
write today (a jitted step, a Python loop), by `scipy.sparse.linalg.eigsh` on `jhvp.to_scipy(op)`,
by matfree on the same operator's flat matvec, and, on the cross-entropy MLP, by PyHessian on a
torch twin with the same weights. Per method, timed by the shared harness (`bench.harness`): the
warm time to answer (median over the rounds; methods interleaved within a round), its set-up
(operator, scipy wrapper, PyHessian's graph) timed apart, the first call (compile) apart, the
matvecs used, and the error against a reference named in each record (dense `numpy.linalg.eigh`
of `op.as_matrix()` where small; else a float64 host Lanczos with full reorthogonalisation, or
the exact diagonal, or a long Hutchinson).
"""

from __future__ import annotations

import time

import numpy as np

from . import cases as C
from . import curvature_methods as CM
from . import curvature_report as R
from . import formatting as F
from . import harness

ROUNDS = {"curvature": 3, "curvature-tiny": 1}


def suite(kind: str, dtype) -> list[tuple[C.Case, tuple[str, ...]]]:
    """(case, tasks) pairs for `curvature` or `curvature-tiny` (the tests' run)."""
    every = ("eig5", "eig1", "trace", "density")
    if kind == "curvature-tiny":
        return [(C.mlp_ce((8, 16, 4), 16, dtype, "tiny"), every),
                (C.transformer(8, 4, 2, 2, dtype), ("eig5", "trace")),
                (C.rosenbrock(100, dtype), ("trace",))]
    return [(C.mlp_ce((64, 256, 256, 10), 128, dtype, "85k"), every),
            (C.mlp_ce((512, 1024, 1024, 256), 256, dtype, "1.8M"), ("eig5",)),
            (C.transformer(64, 32, 8, 4, dtype), every),
            (C.rosenbrock(10_000, dtype), ("trace",))]


# ---- references --------------------------------------------------------------------------------

DENSE_MAX = 3000  # op.as_matrix() and numpy eigh up to this n
DIAG_MAX = 20_000  # the exact trace from diagonal_exact up to this n; a long Hutchinson above


def _host_lanczos(A, m: int, seed: int = 1) -> np.ndarray:
    """Ritz values of m float64 Lanczos steps with full reorthogonalisation (twice), on the host."""
    n = A.shape[0]
    Q = np.zeros((m + 1, n))
    q = np.random.default_rng(seed).standard_normal(n)
    Q[0] = q / np.linalg.norm(q)
    alphas, betas = [], []
    for j in range(m):
        w = A.matvec(Q[j])
        alphas.append(Q[j] @ w)
        for _ in range(2):
            w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        betas.append(np.linalg.norm(w))
        Q[j + 1] = w / betas[-1]
    T = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
    return np.sort(np.linalg.eigvalsh(T))[::-1]


class Reference:
    """The converged answers for one case, computed once, each saying how it was obtained."""

    def __init__(self, case: C.Case):
        import jax
        import jax.numpy as jnp

        import jhvp

        self.case = case
        op, _ = CM._jax_state(case)
        self.n = op.shape[0]
        self._op = op
        self.spectrum = None
        if self.n <= DENSE_MAX:
            H = np.asarray(op.as_matrix(), np.float64)
            self.spectrum = np.sort(np.linalg.eigvalsh((H + H.T) / 2))[::-1]
            self.eig_how = "numpy.linalg.eigh of op.as_matrix() (dense, float64)"
        self._trace = None
        self._jax, self._jnp, self._jhvp = jax, jnp, jhvp

    def eigenvalues(self, k: int) -> tuple[np.ndarray, str]:
        if self.spectrum is not None:
            return self.spectrum[:k], self.eig_how
        m = min(self.n, 96 if self.n > 1e6 else 160)
        if not hasattr(self, "_ritz"):
            self._ritz = _host_lanczos(self._jhvp.to_scipy(self._op), m)
        return self._ritz[:k], (f"{m}-step Lanczos, float64 on the host, full "
                                f"reorthogonalisation (operator in the run's dtype)")

    def trace(self) -> tuple[float, float, str]:
        """(trace, its standard error, how)."""
        if self._trace is None:
            jhvp, jax = self._jhvp, self._jax
            if self.spectrum is not None:
                self._trace = (float(self.spectrum.sum()), 0.0, "exact: trace of op.as_matrix()")
            elif self.n <= DIAG_MAX:
                d = jhvp.curvature.diagonal_exact(self._op, batch_size=500).estimate
                total = sum(float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(d))
                self._trace = (total, 0.0, "exact: sum of curvature.diagonal_exact (n matvecs)")
            else:
                m = 2000
                out = jhvp.curvature.trace(self._op, jax.random.key(12345), num_matvecs=m,
                                           method="hutchinson", batch_size=100)
                self._trace = (float(out.estimate), float(out.stderr),
                               f"Hutchinson, {m} probes (another key); its stderr is given")
        return self._trace


def eig_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max_i |λ̂_i − λ_i| / max_i |λ_i|: relative to the largest, so tiny λ do not blow it up."""
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - ref[: got.size])) / np.max(np.abs(ref)))


def wasserstein(nodes, weights, spectrum) -> float:
    """W1 between the quadrature measure (averaged over probes) and the exact spectral measure,
    divided by the spectrum's range: 0 is exact, and it needs no smoothing width."""
    nodes, weights = np.ravel(nodes).astype(np.float64), np.ravel(weights).astype(np.float64)
    weights = weights / weights.sum()
    pts = np.concatenate([nodes, spectrum])
    mass = np.concatenate([weights, -np.full(spectrum.size, 1.0 / spectrum.size)])
    order = np.argsort(pts)
    cdf = np.cumsum(mass[order])[:-1]
    w1 = float(np.sum(np.abs(cdf) * np.diff(pts[order])))
    return w1 / float(spectrum.max() - spectrum.min())


# ---- the run -----------------------------------------------------------------------------------


def _score(task, answer, ref: Reference) -> dict:
    if task in ("eig5", "eig1"):
        if "eigenvalues" not in answer:
            return {"error": None, "reference": "- (matvecs only)"}
        want, how = ref.eigenvalues(answer["eigenvalues"].size)
        return {"error": eig_error(answer["eigenvalues"], want), "reference": how,
                "answer": [float(x) for x in answer["eigenvalues"]],
                "reference_answer": [float(x) for x in want]}
    if task == "trace":
        tr, tr_err, how = ref.trace()
        return {"error": abs(answer["trace"] - tr) / abs(tr), "reference": how,
                "answer": answer["trace"], "stderr": answer.get("stderr"),
                "reference_answer": tr, "reference_stderr": tr_err}
    if ref.spectrum is None:
        return {"error": None, "reference": "- (no dense spectrum at this size)"}
    return {"error": wasserstein(answer["nodes"], answer["weights"], ref.spectrum),
            "reference": "W1 to the exact spectrum (dense eigh) / its range"}


def run_task(case, task, dtype, rounds, ref, methods=None, progress=print) -> list[dict]:
    """Times each method's answer to the task with the shared harness, set-up apart; scores it."""
    import jax.numpy as jnp

    def build(name):
        pair = CM.build(task, name, case, dtype)
        return pair and harness.Method(pair[1], setup=pair[0],
                                       framework="torch" if name in CM.TORCH_ONLY else "jax")

    # Each framework's block opens with a cheap untimed call, not with a method's whole answer.
    settle_op, unravel = CM._jax_state(case)
    settle_v = unravel(jnp.ones(settle_op.shape[0], settle_op.value.dtype))

    def report_round(_, stage):
        if stage.startswith("round"):
            progress(f"  {case.name:<16} {task:<8} {stage}")

    names = [n for n in CM.METHODS[task] if not methods or n in methods]
    timings = harness.measure(names, build, "cpu", harness.one_call(rounds),
                              settle={"jax": lambda: settle_op(settle_v), "torch": _torch_settle},
                              progress=report_round)
    return [{"case": case.name, "family": case.family, "task": task, "method": name,
             "framework": "torch" if name in CM.TORCH_ONLY else "jax",
             "n_params": case.n_params, "dtype": dtype, "device": "cpu",
             **t.summary(),  # median_s (solve), setup_s, total_s, spread_s (IQR of the total)...
             "num_matvecs": t.output["num_matvecs"], **_score(task, t.output, ref)}
            for name, t in timings.items()]


def _torch_settle():
    """Opens the torch block: a small product, milliseconds where PyHessian's answer takes seconds."""
    import torch

    return torch.ones(256, 256) @ torch.ones(256, 256)


def main(args, header: dict) -> int:
    dtype = np.float64 if args.dtype == "float64" else np.float32
    pairs = suite(args.suite, dtype)
    if args.cases:
        pairs = [p for p in pairs if any(p[0].name.startswith(s) for s in args.cases)]
    rounds = args.rounds or ROUNDS[args.suite]
    notes = [CM.pyhessian_density_note(pairs[0][0] if pairs[0][0].family == "mlp-ce" else
                                       C.mlp_ce((8, 16, 4), 16, dtype, "tiny"), args.dtype)]
    for lib in ("pyhessian", "matfree", "scipy"):
        if not CM.available(lib):
            notes.append(f"{lib} is not installed: its methods are left out")
    notes.append("PyHessian needs a torch nn.Module and criterion: it runs on the cross-entropy "
                 "MLP cases (mlp-ce-*) only, and not on the ~1.8M one (1000 H·v per answer)")
    header["notes"] = notes
    for n in notes:
        print("note:", n, flush=True)
    records, start = [], time.perf_counter()
    for case, tasks in pairs:
        ref = Reference(case)
        for task in tasks:
            methods = args.methods
            if case.n_params > 1e6:  # the bar's pair, and matfree: no PyHessian at this size
                methods = methods or ["jhvp_eigh", "matvecs", "matfree_lanczos"]
            recs = run_task(case, task, args.dtype, rounds, ref, methods,
                            progress=lambda s: print(s, flush=True))
            records += recs
            R.write_all(args.out, header, records, plot=False)
            print(f"{case.name} {task}: " + ", ".join(
                f"{r['method']} {F.fmt_s(r['total_s'])} (err {F.fmt(r['error'], '.1e')}, "
                f"{r['num_matvecs']} mv)" for r in recs), flush=True)
    header["wall_s"] = round(time.perf_counter() - start, 1)
    for n in R.write_all(args.out, header, records):
        print("note:", n)
    print("\n" + F.bars_table(R.bars(records)))
    print(f"\nwrote {args.out}/results.json, results.md, results.png in {header['wall_s']} s")
    return 0
