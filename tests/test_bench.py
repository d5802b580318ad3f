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
    assert {"Equinox module / eqx.partition by hand, eqx-mlp-85k",
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
