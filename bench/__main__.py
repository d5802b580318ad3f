"""`python -m bench`: time H·v methods on a suite of problems; write JSON, Markdown and a plot.

Examples:
    python -m bench --quick                      # the README's main job, a few minutes on 2 cores
    python -m bench --out bench/results-full     # the full CPU run (bench/RESULTS.md)
    python -m bench --device gpu --quick         # on a CUDA machine
    python -m bench --cases mlp-85k --methods reference jhvp_fwd_rev compat_hvp torch_hvp
    python -m bench --cases mlp-85k --methods compat_hvp torch_hvp --repeat 10  # the spread
    python -m bench --cases eqx-mlp-85k          # an Equinox module against eqx.partition by hand
    python -m bench --suite curvature            # eigenvalues, traces, densities vs PyHessian...
    python -m bench --suite curvature --memory   # their memory per device, 1 and 8 devices
    python -m bench --suite curvature-data       # the same over a dataset (N = 4096, 8 batches)
    python -m bench.report DIR [DIR ...]         # re-render (and merge) saved runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# No module of the bench imports jax or torch at import time: `configure` must come first.
from . import curvature, harness, hvp, report
from . import formatting as F
from . import methods as M
from .cases import suite


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small suite (README's main job)")
    ap.add_argument("--suite", choices=["quick", "full", "tiny", "batch", "curvature",
                                        "curvature-tiny", "curvature-data",
                                        "curvature-data-tiny"], default=None,
                    help="case suite (default: full, or quick with --quick); curvature: "
                         "eigenvalues, traces and densities against PyHessian, matfree, scipy")
    ap.add_argument("--out", default=os.path.join("bench", "results"), help="output directory")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--cases", nargs="+", default=None, help="case names or prefixes")
    ap.add_argument("--methods", nargs="+", default=None, help="method names (reference is added)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--memory", action="store_true",
                    help="measure peak memory, one subprocess per (case, method); with --suite "
                         "curvature: memory per device of each algorithm, 1 and 8 devices")
    ap.add_argument("--rounds", type=int, default=None, help="override the interleaved rounds")
    ap.add_argument("--seconds", type=float, default=None, help="override seconds per method")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure everything N times over, one after another; writes each "
                         "repeat's figures and their spread to repeats.md")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.suite = args.suite or ("quick" if args.quick else "full")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.repeat > 1 and args.memory:
        ap.error("--repeat measures time; run --memory on its own")
    return args


def configure(args) -> None:
    # Before jax is imported: the platform and the float width are process-wide settings.
    os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
    if args.device == "gpu":
        # The same maths as torch: IEEE float32 matrix products (JAX's GPU default would use
        # TF32, torch's does not), and no preallocation, so torch shares the card fairly.
        os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if args.dtype == "float64":
        os.environ["JAX_ENABLE_X64"] = "1"


def header(args) -> dict:
    import jax
    import jaxlib

    try:
        import jhvp

        jhvp_version = jhvp.__version__
    except ImportError:
        jhvp_version = "not importable"
    torch_version = "not installed"
    if M.torch_available():
        import torch

        torch_version = torch.__version__
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "suite": args.suite,
        "device": args.device,
        "device_kind": jax.devices()[0].device_kind,
        "dtype": args.dtype,
        "machine": f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.platform()}",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": torch_version,
        "matmul_precision": ("float32 (JAX 'highest', torch allow_tf32=False)"
                             if args.device == "gpu" else "float32"),
        "jhvp": jhvp_version,
    }


def select(args):
    dtype = np.float64 if args.dtype == "float64" else np.float32
    cases = suite(args.suite, dtype, args.device)
    if not M.equinox_available():  # main prints a note saying so
        cases = [c for c in cases if not c.needs_equinox]
    if args.cases:
        cases = [c for c in cases if any(c.name == s or c.name.startswith(s) for s in args.cases)]
        if not cases:
            sys.exit(f"no case matches {args.cases}; see bench/cases.py"
                     + ("" if M.equinox_available() else
                        " (the eqx-mlp cases need equinox, which is not installed)"))
    methods = (list(M.JAX_METHODS) + (list(M.EQX_METHODS) if M.equinox_available() else [])
               + (list(M.TORCH_METHODS) if M.torch_available() else []))
    if args.methods:
        known = M.JAX_METHODS + M.EQX_METHODS + M.TORCH_METHODS + M.EXTRA_METHODS
        unknown = set(args.methods) - set(known)
        if unknown:
            sys.exit(f"unknown methods {sorted(unknown)}; known: {known}")
        methods = ["reference"] + [m for m in args.methods if m != "reference"]
    return cases, methods


def worker(args) -> None:
    """Runs one (case, method) in this fresh process and prints its peak memory as JSON."""
    # Build only what this method needs: importing torch for a JAX method would count its memory.
    dtype = np.float64 if args.dtype == "float64" else np.float32
    case = next(c for c in suite(args.suite, dtype, args.device) if c.name == args.worker[0])
    method = args.worker[1]
    if method == "none":  # the baseline: the JAX runtime and the case's data, no method
        import jax.numpy as jnp

        jnp.zeros(1).block_until_ready()
    else:
        thunk = M.build(method, case, args.device)
        for _ in range(3):
            M.synchronize(thunk(), args.device)
    if args.device == "gpu":
        if method.startswith("torch"):
            import torch

            peak = torch.cuda.max_memory_allocated()
        else:
            import jax

            peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
        note = "device memory, peak in use"
    else:
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark on Linux.
        with open("/proc/self/status") as fh:
            peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
        note = "peak RSS of a fresh process running only this method (includes the runtime)"
    print(json.dumps({"peak_bytes": peak, "peak_note": note}))


def measure_memory(args, case, records) -> None:
    def run(method):
        cmd = [sys.executable, "-m", "bench", "--suite", args.suite, "--device", args.device,
               "--dtype", args.dtype, "--worker", case.name, method]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            return {"peak_bytes": None, "peak_note": "worker failed: " + out.stderr[-300:]}
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = run("none")
    for r in records:
        got = run(r["method"])
        r.update(got)
        r["peak_baseline_bytes"] = base.get("peak_bytes")


def main(argv=None) -> int:
    args = parse(argv)
    configure(args)
    if args.worker:
        worker(args)
        return 0
    if args.suite.startswith("curvature-data"):  # the full-dataset case (N = 4096, 8 batches)
        from . import curvature_data

        return curvature_data.main(args, header(args))
    if args.suite.startswith("curvature"):
        if args.memory:
            # Per-device working memory of each algorithm on an FSDP-sharded model, 1 and 8
            # simulated devices (bench/sharded_memory.py): the table of bench/RESULTS.md.
            from . import sharded_memory

            table = sharded_memory.table(sharded_memory.run(1), sharded_memory.run(8))
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "curvature_memory.md"), "w") as fh:
                fh.write(table + "\n")
            print(table)
            return 0
        if args.repeat > 1:
            sys.exit("--repeat applies to the H·v suites, not to --suite curvature")
        return curvature.main(args, header(args))
    cases, methods = select(args)
    budget = {"quick": harness.QUICK, "full": harness.FULL, "tiny": harness.TINY,
              "batch": harness.FULL}[args.suite]
    if args.rounds or args.seconds:
        budget = harness.Budget(args.rounds or budget.rounds, args.seconds or budget.seconds_per_method)
    head = header(args)
    print(f"jhvp bench: {len(cases)} cases × {len(methods)} methods on {head['device_kind']} "
          f"({args.dtype}); jax {head['jax']}, torch {head['torch']}", flush=True)
    if head["torch"] == "not installed":
        print("note: torch is not installed, so the torch methods are left out "
              "(pip install torch to compare against torch.autograd.functional)", flush=True)
    if not M.equinox_available():
        print("note: equinox is not installed, so the eqx-mlp cases and the eqx methods are left "
              "out (pip install equinox to time an Equinox model passed to jhvp as a module)",
              flush=True)
    start = time.perf_counter()
    units, done = len(cases) * len(methods), [0]

    def progress(case, method, stage):
        if stage == "compile":
            done[0] += 1
        elif not stage.startswith("round"):
            return
        elapsed = time.perf_counter() - start
        eta = elapsed / max(done[0], 1) * (units - done[0])
        print(f"  [{done[0]:>3}/{units}] {case.name:<18} {method:<16} {stage:<10} "
              f"elapsed {elapsed:6.1f}s  ETA ~{eta:5.0f}s", flush=True)

    records = []
    units *= args.repeat
    for repeat in range(args.repeat):
        for case in cases:
            recs = hvp.run_case(case, methods, args.device, args.dtype, budget, progress)
            if args.memory:
                measure_memory(args, case, recs)
            for r in recs:
                r["repeat"] = repeat
            records += recs
            if args.repeat == 1:  # a run cut short keeps its cases
                report.write_all(args.out, head, records, plot=False)
            else:
                report.write_repeats(args.out, head, records)
            ref = next((r for r in recs if r["method"] == "reference"), None)
            print(f"{case.name}: " + ", ".join(
                f"{r['method']} {F.fmt_s(r['median_s'])}"
                + (f" ({r['ratio_vs_reference']:.2f}x)" if ref else "") for r in recs), flush=True)
    head["wall_s"] = round(time.perf_counter() - start, 1)
    if args.repeat > 1:
        print("\n" + report.write_repeats(args.out, head, records))
        print(f"\nwrote {args.out}/results.json, repeats.md in {head['wall_s']} s")
        return 0
    notes = report.write_all(args.out, head, records)
    print("\n" + F.bars_table(report.bars(records)))
    for n in notes:
        print("note:", n)
    print(f"\nwrote {args.out}/results.json, results.md, results.png in {head['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
