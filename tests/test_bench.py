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
