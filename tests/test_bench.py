"""The benchmark harness: a smoke run on tiny cases, its JSON schema, and every method's answer."""

import json
import os
import subprocess
import sys

import pytest
from helpers import X64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_KEYS = {"case", "method", "n_params", "dtype", "device", "median_s", "spread_s", "compile_s",
               "peak_bytes", "ratio_vs_reference", "ratio_vs_grad", "rel_err"}
HEADER_KEYS = {"jax", "jaxlib", "torch", "machine", "device", "device_kind", "dtype", "date"}


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


def test_torch_methods_present_when_torch_is(tiny_run):
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed: the bench runs without its torch methods")
    methods = {r["method"] for r in tiny_run[0]["records"]}
    assert {"torch_grad", "torch_hvp", "torch_vhp", "torch_func"} <= methods


def test_unknown_method_is_refused():
    proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "tiny", "--methods", "magic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown methods ['magic']" in proc.stderr


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


def test_dot_threads_times_each_product_on_one_core_and_all():
    pytest.importorskip("torch", reason="bench.dot_threads compares against torch's products")
    proc = subprocess.run([sys.executable, "-m", "bench.dot_threads"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| h", "| d"))]
    assert [r.split("|")[1].strip() for r in rows] == [
        "h @ W (forward)", "d @ W.T (backward, input)", "h.T @ d (backward, weight)"]
    for row in rows:
        times = [float(c.split()[0]) for c in row.strip("|").split("|")[1:]]
        assert len(times) == 4 and all(t > 0 for t in times)
