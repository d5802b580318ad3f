"""The benchmark harness: a smoke run on tiny cases, its JSON schema, and every method's answer.

Every test that starts a subprocess (a bench run, bench.report, bench.dot_threads) is `slow`.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import X64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_KEYS = {"case", "method", "n_params", "dtype", "device", "median_s", "spread_s", "compile_s",
               "peak_bytes", "ratio_vs_reference", "ratio_vs_grad", "rel_err"}
HEADER_KEYS = {"jax", "jaxlib", "torch", "machine", "device", "device_kind", "dtype", "date"}
EQX_METHODS = {"eqx_module", "eqx_partition", "jhvp_partitioned"}


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    dtype = "float64" if X64 else "float32"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "tiny", "--dtype", dtype,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as fh:
        return json.load(fh), out, proc.stdout, dtype


@pytest.mark.slow
def test_outputs_and_schema(tiny_run):
    results, out, stdout, dtype = tiny_run
    assert HEADER_KEYS <= set(results["header"])
    records = results["records"]
    assert records
    for r in records:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert r["dtype"] == dtype and r["device"] == "cpu"
        assert r["median_s"] > 0 and r["spread_s"] >= 0 and r["compile_s"] > 0
        assert r["peak_bytes"] is None and "--memory" in r["peak_note"]
    assert (out / "results.md").read_text().startswith("# jhvp benchmark")
    assert (out / "results.png").stat().st_size > 10_000
    assert "| figure | measured | bar | met |" in stdout  # the summary table is printed


@pytest.mark.slow
def test_every_method_computes_the_right_hvp(tiny_run):
    records = tiny_run[0]["records"]
    methods = {r["method"] for r in records}
    assert {"reference", "jhvp_fwd_rev", "jhvp_rev_rev", "jhvp_rev_fwd", "jhvp_operator",
            "compat_hvp", "dense", "finite_diff"} <= methods
    for r in records:
        if r["method"] in ("jax_grad", "torch_grad"):
            assert r["ok"] is None
            continue
        assert r["ok"] is True, r
        assert r["rel_err"] <= r["tolerance"]
        if r["case"].startswith("logreg"):  # against the exact Xᵀ D X v + λ v
            assert r["rel_err_exact"] <= r["tolerance"], r


@pytest.mark.slow
def test_torch_methods_present_when_torch_is(tiny_run):
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed: the bench runs without its torch methods")
    methods = {r["method"] for r in tiny_run[0]["records"]}
    assert {"torch_grad", "torch_hvp", "torch_vhp", "torch_func"} <= methods


@pytest.mark.slow
def test_unknown_method_is_refused():
    proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "tiny", "--methods", "magic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown methods ['magic']" in proc.stderr


@pytest.mark.slow
def test_repeat_reports_each_repeats_ratio(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dtype = "float64" if X64 else "float32"
    proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "tiny", "--dtype", dtype,
                           "--cases", "rosenbrock-1e2", "--methods", "compat_hvp", "--repeat", "2",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert sorted((r["repeat"], r["method"]) for r in records) == [
        (0, "compat_hvp"), (0, "reference"), (1, "compat_hvp"), (1, "reference")]
    med = {(r["repeat"], r["method"]): r["median_s"] for r in records}
    ratios = [med[(i, "compat_hvp")] / med[(i, "reference")] for i in (0, 1)]
    row = next(line for line in (tmp_path / "repeats.md").read_text().splitlines()
               if line.startswith("| compat.hvp / reference, rosenbrock-1e2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == [f"{v:.2f}" for v in ratios]
    assert cells[5:7] == [f"{min(ratios):.2f}", f"{max(ratios):.2f}"]
    assert cells[7] == f"{sum(v <= 2.5 for v in ratios)} of 2"


@pytest.mark.slow
def test_report_rerenders_and_merges_saved_runs(tiny_run, tmp_path):
    results = tiny_run[0]
    first, second = tmp_path / "a", tmp_path / "b"
    for d, keep in ((first, "rosenbrock-1e2"), (second, None)):
        d.mkdir()
        recs = [r for r in results["records"] if (r["case"] == keep) == (keep is not None)]
        header = dict(results["header"], command=f"run {d.name}")
        (d / "results.json").write_text(json.dumps({"header": header, "records": recs}))
    proc = subprocess.run([sys.executable, "-m", "bench.report", str(first), str(second)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((first / "results.json").read_text())
    assert merged["header"]["command (2)"] == "run b"
    assert len(merged["records"]) == len(results["records"])
    text = (first / "results.md").read_text()
    assert all(f"### {c} (" in text for c in {r["case"] for r in results["records"]})
    assert (first / "results.png").stat().st_size > 10_000


@pytest.mark.slow
def test_summary_line_for_every_case(tiny_run):
    records, stdout = tiny_run[0]["records"], tiny_run[2]
    cases = list(dict.fromkeys(r["case"] for r in records))
    assert len(cases) >= 3 + _has("equinox")
    lines = {line.split(":", 1)[0]: line for line in stdout.splitlines()
             if line.split(":", 1)[0] in cases}
    assert list(lines) == cases, stdout[-3000:]  # one line per case, in order, not just the last
    for case in cases:
        for r in records:
            if r["case"] == case:
                assert f"{r['method']} " in lines[case], (case, r["method"])


@pytest.mark.slow
def test_equinox_module_hvp_matches_the_reference(tiny_run):
    if not _has("equinox"):
        pytest.skip("equinox is not installed: the bench leaves its eqx-mlp cases out")
    recs = {r["method"]: r for r in tiny_run[0]["records"] if r["case"] == "eqx-mlp-tiny"}
    assert EQX_METHODS | {"reference", "jax_grad"} == set(recs)
    for name in EQX_METHODS:
        assert recs[name]["ok"] is True and recs[name]["rel_err"] <= recs[name]["tolerance"], recs[name]


def test_bars_name_cases_that_exist(monkeypatch):
    # A bar keyed on a case name that no suite builds would silently never be reported.
    import numpy as np

    monkeypatch.syspath_prepend(ROOT)
    from bench import methods as M
    from bench import report
    from bench.cases import suite

    records = []
    for c in suite("quick", np.float32, "cpu"):
        for m in c.methods or (M.JAX_METHODS + M.TORCH_METHODS + M.EQX_METHODS):
            records.append({"case": c.name, "family": c.family, "method": m, "device": "cpu",
                            "n_params": c.n_params, "median_s": 1.0, "ratio_vs_reference": 1.0,
                            "ok": True if m not in ("jax_grad", "torch_grad") else None})
    figures = {what for what, *_ in report.bars(records)}
    assert {"fresh GGN·v / fresh H·v (reference), mlp-85k",
            "fresh GGN·v / fresh H·v (reference), transformer-d64",
            "GGNOperator apply / fresh H·v (reference), mlp-1.8M",
            "FisherOperator apply / gradient (jax_grad), mlp-85k",
            "Equinox module / eqx.partition by hand, eqx-mlp-85k",
            "compat.hvp / reference, mlp-85k", "compat.hvp / reference, rosenbrock-1e2",
            "jhvp fwd_rev / reference, rosenbrock n=100",
            "torch.autograd.functional.hvp / compat.hvp, mlp-85k (speed-up)",
            "HessianOperator apply / fresh jhvp.hvp, mlp-1.8M"} <= figures, figures


@pytest.mark.slow
def test_dot_threads_times_each_product_on_one_core_and_all(tmp_path):
    pytest.importorskip("torch", reason="bench.dot_threads compares against torch's products")
    proc = subprocess.run([sys.executable, "-m", "bench.dot_threads", "--json",
                           str(tmp_path / "dot.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| h", "| d"))]
    assert [r.split("|")[1].strip() for r in rows] == [
        "h @ W (forward)", "d @ W.T (backward, input)", "h.T @ d (backward, weight)"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 6
        times = [float(c.removesuffix(" µs")) for c in cells[:4]]
        ratios = [float(c.removesuffix("x")) for c in cells[4:]]
        assert all(math.isfinite(t) and t > 0 for t in times), row
        assert all(math.isfinite(r) and r > 0 for r in ratios), row
    figures = json.loads((tmp_path / "dot.json").read_text())
    assert set(figures["speedup"]) == {"hw", "dwt", "htd"}
    for key, by_framework in figures["speedup"].items():
        assert set(by_framework) == {"jax", "torch"}
        for fw, ratio in by_framework.items():
            assert math.isfinite(ratio) and ratio > 0, (key, fw, ratio)


# ---- GGN and empirical Fisher methods (issue #11) -----------------------------------------------

GGN_METHODS = {"ggn_fresh", "ggn_operator", "fisher_operator"}


def _installed(module):  # without importing it: curvlinops' import warns (torch.jit.script)
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_ggn_and_fisher_methods_match_their_own_references(tiny_run):
    records = tiny_run[0]["records"]
    for case in ("mlp-tiny", "transformer-d8"):
        recs = {r["method"]: r for r in records if r["case"] == case}
        assert GGN_METHODS <= set(recs), (case, set(recs))
        for name in GGN_METHODS:
            r = recs[name]
            assert r["ok"] is True and r["rel_err"] <= r["tolerance"], r
            assert r["checked_against"].startswith("hand-written"), r
    if _installed("curvlinops") and _installed("torch"):
        r = next(r for r in records if r["case"] == "mlp-tiny"
                 and r["method"] == "torch_curvlinops_ggn")
        assert r["ok"] is True and r["checked_against"].startswith("hand-written"), r


def test_ggn_and_fisher_references_are_dense_jacobian_products(monkeypatch):
    # The hand-written references (jvp, loss HVP, vjp) against dense Jacobians, and not H·v.
    import jax

    monkeypatch.syspath_prepend(ROOT)
    from bench import methods as M
    from bench.cases import mlp

    with jax.numpy_rank_promotion("allow"):  # the bench MLP broadcasts its biases
        _check_ggn_fisher_references(M, mlp)


def _check_ggn_fisher_references(M, mlp):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    dtype = np.float64 if X64 else np.float32
    case = mlp((3, 4, 2), 5, dtype, "t")
    p = {k: jnp.asarray(a) for k, a in case.params.items()}
    x, y = (jnp.asarray(a) for a in case.data)
    flat, unravel = ravel_pytree(p)
    v, _ = ravel_pytree({k: jnp.asarray(a) for k, a in case.tangent.items()})
    J = jax.jacobian(lambda q: case.model(unravel(q), x).ravel())(flat)
    z = case.model(p, x)
    H_out = jax.hessian(lambda zz: case.out_loss(zz.reshape(z.shape), y))(z.ravel())
    Je = jax.jacobian(lambda q: case.per_example(unravel(q), x, y))(flat)
    tol = 1e-10 if X64 else 1e-4
    for kind, want in (("ggn", J.T @ (H_out @ (J @ v))), ("fisher", Je.T @ (Je @ v) / 5)):
        got, _ = ravel_pytree(M.curvature_reference(kind, case))
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))
    hv = jax.jvp(jax.grad(lambda q: case.loss_jax(unravel(q), x, y)), (flat,), (v,))[1]
    assert float(jnp.max(jnp.abs(hv - J.T @ (H_out @ (J @ v))))) > 1e-3 * float(jnp.max(jnp.abs(hv)))


# ---- the curvature suite (issue #10) --------------------------------------------------------------

EIG_TOL = {"float32": 1e-4, "float64": 1e-7}


@pytest.fixture(scope="module")
def curvature_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curvature")
    dtype = "float64" if X64 else "float32"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "curvature-tiny", "--dtype",
                           dtype, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out, proc.stdout, dtype


@pytest.mark.slow
def test_curvature_answers_match_the_dense_reference(curvature_run):
    records, dtype = curvature_run[0]["records"], curvature_run[3]
    assert {r["task"] for r in records} == {"eig5", "eig1", "trace", "density"}
    for r in records:
        assert r["total_s"] > 0 and r["compile_s"] > 0 and r["num_matvecs"] > 0, r
        if r["method"] == "matvecs":  # the cost floor, no answer
            assert r["error"] is None
            continue
        assert r["error"] is not None, r
        assert "dense" in r["reference"] or "exact" in r["reference"], r
        if r["task"] in ("eig5", "eig1"):
            # PyHessian and its loop stop on a relative change of 1e-6: a looser answer. Top-5
            # from 32 Lanczos steps is limited by convergence, not rounding (2.5e-5 measured on
            # transformer-d8 in float64).
            slack = 1e-4 if r["method"] in ("pyhessian", "loop_power") else EIG_TOL[dtype]
            slack = max(slack, 1e-3) if r["task"] == "eig5" else slack
            assert r["error"] <= slack, r
            assert len(r["answer"]) == (5 if r["task"] == "eig5" else 1)
        elif r["task"] == "trace":  # unbiased estimates: within a few of their standard errors
            ref = r["reference_answer"]
            assert abs(r["answer"] - ref) <= 5 * r["stderr"] + 1e-3 * abs(ref), r
        else:
            assert r["error"] <= 0.05, r  # W1 / range of 4 SLQ probes


@pytest.mark.slow
def test_curvature_compares_pyhessian_matfree_and_scipy(curvature_run):
    records, out, stdout, _ = curvature_run
    methods = {(r["task"], r["method"]) for r in records["records"] if r["case"] == "mlp-ce-tiny"}
    assert {("eig5", "jhvp_eigh"), ("eig5", "loop_lanczos"), ("eig5", "scipy_eigsh"),
            ("eig1", "jhvp_eigh_rtol"), ("eig1", "loop_power"), ("trace", "jhvp_trace"),
            ("trace", "loop_hutchinson"), ("density", "jhvp_density"),
            ("density", "loop_slq")} <= methods
    if _installed("matfree"):
        assert {("eig5", "matfree_lanczos"), ("eig1", "matfree_lanczos"),
                ("trace", "matfree_hutchinson"), ("density", "matfree_slq")} <= methods
    if _installed("pyhessian"):
        assert {("eig5", "pyhessian"), ("eig1", "pyhessian"), ("trace", "pyhessian")} <= methods
        assert ("density", "pyhessian") not in methods
        for text in (stdout, (out / "results.md").read_text()):
            assert "PyHessian density() is broken" in text and "torch.eig" in text
    assert (out / "results.png").stat().st_size > 10_000
    assert (out / "results.md").read_text().startswith("# jhvp curvature benchmark")


@pytest.mark.slow
def test_curvature_report_rerenders(curvature_run, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(curvature_run[0]))
    proc = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### mlp-ce-tiny: top-5 eigenvalues" in (tmp_path / "results.md").read_text()


def test_curvature_bars_name_cases_that_exist(monkeypatch):
    import numpy as np

    monkeypatch.syspath_prepend(ROOT)
    from bench import curvature_methods as CM
    from bench import report
    from bench.curvature import suite

    records = []
    for case, tasks in suite("curvature", np.float32):
        for task in tasks:
            for m in CM.METHODS[task]:
                records.append({"case": case.name, "family": case.family, "task": task,
                                "method": m, "dtype": "float32", "device": "cpu",
                                "n_params": case.n_params, "median_s": 1.0, "total_s": 1.0,
                                "error": 1e-6})
    figures = {what for what, *_ in report.bars(records)}
    assert {"PyHessian eigenvalues(maxIter=200, tol=1e-6) / jhvp eigh(k=1, rtol), mlp-ce-85k "
            "(speed-up, time to answer)",
            "eigh(k=5, num_matvecs=32) / 32 operator applications, mlp-ce-85k",
            "eigh(k=5, num_matvecs=32) / 32 operator applications, mlp-ce-1.8M",
            "trace(num_matvecs=99, batch_size=33) / Python loop of 99 probes, rosenbrock-1e4",
            } <= figures, figures


# ---- the dataset suite (issue #17) -----------------------------------------------------------


@pytest.mark.slow
def test_dataset_suite_answers_match_the_dense_reference_and_the_torch_tools(tmp_path):
    pytest.importorskip("pyhessian", reason="the torch-side oracles are not installed")
    pytest.importorskip("curvlinops", reason="the torch-side oracles are not installed")
    dtype = "float64" if X64 else "float32"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "curvature-data-tiny",
                           "--dtype", dtype, "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "curvature_data.json").read_text())["records"]
    by = {(r["task"], r["method"]): r for r in records}
    assert {m for t, m in by if t == "application"} == {
        "jhvp_batches", "jhvp_streamed", "sum_of_8_hvp", "curvlinops_matvec",
        "pyhessian_dataloader_hv"}
    assert all(r["median_s"] > 0 for r in records)
    # Top eigenvalue: jhvp (both forms) to its tolerance of the dense eigh; PyHessian's power
    # iteration and curvlinops + eigsh, independent tools on the torch twin, agree with it.
    for method in ("jhvp_eigh_batches", "jhvp_eigh_streamed"):
        assert by[("top eigenvalue", method)]["error"] < EIG_TOL[dtype] * 10
    assert by[("top eigenvalue", "pyhessian_eigenvalues")]["error"] < 1e-3
    assert by[("top eigenvalue", "curvlinops_scipy_eigsh")]["error"] < 1e-3
    # Trace: jhvp's Hutch++ within 4 of its standard errors of the exact trace; both forms equal.
    device, streamed = by[("trace", "jhvp_trace_batches")], by[("trace", "jhvp_trace_streamed")]
    assert abs(device["answer"] - device["reference"]) <= 4 * device["stderr"]
    assert streamed["answer"] == pytest.approx(device["answer"], rel=1e-4)
