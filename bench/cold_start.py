"""`python -m bench.cold_start`: time to a first answer, each call in a fresh process.

In a notebook people call `eigh` once: what they wait for is tracing and XLA compilation, which
the warm timings of `python -m bench --suite curvature` leave out. Each task runs in its own
Python process on the cross-entropy MLP of ~85k parameters (`mlp-ce-85k`), timed from before
the first jhvp call (data already on the device, JAX imported and initialised) to
`block_until_ready` of its answer; the same call again in that process gives the warm time.
PyHessian's top eigenvalue on the torch twin is timed the same way, when it is installed.

    python -m bench.cold_start [--repeat 3] [--out DIR] [--cache DIR]

`--cache DIR` turns on JAX's persistent compilation cache in DIR (run twice: the second run's
first calls read the programs compiled by the first).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

TASKS = ("hvp", "operator", "operator+eigh", "operator+trace", "operator+density", "pyhessian-eig")
DESCRIPTION = {
    "hvp": "`jhvp.hvp(loss, (params, x, y), v)`",
    "operator": "`jhvp.hessian_operator(loss, (params, x, y))`",
    "operator+eigh": "operator + `curvature.eigh(op, key, k=1, rtol=1e-6)`",
    "operator+trace": "operator + `curvature.trace(op, key, num_matvecs=99)`",
    "operator+density": "operator + `curvature.spectral_density(op, key, num_probes=4, "
                        "num_matvecs=32)`",
    "pyhessian-eig": "PyHessian `hessian(...)` + `eigenvalues(top_n=1, maxIter=200, tol=1e-6)`",
}
BARS = {"operator+eigh": 2.0, "operator+trace": 2.5, "operator+density": 2.5}


def _case():
    from . import cases as C

    return C.mlp_ce((64, 256, 256, 10), 128, "float32", "85k")


def _jax_call(task: str, case):
    """Returns call() -> answer for one JAX task, its inputs already on the device."""
    import jax
    import jax.numpy as jnp

    import jhvp
    from jhvp import curvature

    params = {k: jnp.asarray(a) for k, a in case.params.items()}
    data = tuple(jnp.asarray(a) for a in case.data)
    tangent = {k: jnp.asarray(a) for k, a in case.tangent.items()}
    key = jax.random.key(0)
    jax.block_until_ready((params, data, tangent, key))

    def call():
        if task == "hvp":
            return jhvp.hvp(case.loss_jax, (params, *data), tangent)
        op = jhvp.hessian_operator(case.loss_jax, (params, *data))
        if task == "operator":
            return op
        if task == "operator+eigh":
            return curvature.eigh(op, key, k=1, rtol=1e-6).eigenvalues
        if task == "operator+trace":
            return curvature.trace(op, key, num_matvecs=99).estimate
        return curvature.spectral_density(op, key, num_probes=4, num_matvecs=32).density

    return call


def _pyhessian_call(case):
    import warnings

    import pyhessian
    import torch

    from .curvature_methods import torch_twin

    model, criterion, data = torch_twin(case, "float32")

    def call():
        torch.manual_seed(0)
        with warnings.catch_warnings():  # its backward(create_graph=True) warns of a ref cycle
            warnings.simplefilter("ignore", UserWarning)
            h = pyhessian.hessian(model, criterion, data=data, cuda=False)
            return h.eigenvalues(top_n=1, maxIter=200, tol=1e-6)[0]

    return call


def child(task: str) -> dict:
    """Times one task's first and second call in this (fresh) process."""
    import jax

    case = _case()
    if task == "pyhessian-eig":
        call, ready = _pyhessian_call(case), (lambda out: out)
    else:
        jax.devices()  # the runtime's start-up is not the call's
        call, ready = _jax_call(task, case), jax.block_until_ready
    times = []
    for _ in range(2):
        start = time.perf_counter()
        ready(call())
        times.append(time.perf_counter() - start)
    return {"task": task, "first_s": times[0], "warm_s": times[1]}


def _available(task: str) -> bool:
    if task != "pyhessian-eig":
        return True
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "pyhessian"))


def measure(tasks, repeat: int, cache: str | None) -> list[dict]:
    """Each task `repeat` times, each time in a fresh process; medians."""
    env = dict(os.environ)
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    root = pathlib.Path(__file__).resolve().parent.parent
    out = []
    for task in tasks:
        runs = []
        for _ in range(repeat):
            proc = subprocess.run([sys.executable, "-m", "bench.cold_start", "--child", task],
                                  cwd=root, env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"{task} failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out.append({"task": task, "repeat": repeat,
                    "first_s": statistics.median(r["first_s"] for r in runs),
                    "warm_s": statistics.median(r["warm_s"] for r in runs),
                    "first_all": [round(r["first_s"], 3) for r in runs]})
        print(f"{task}: first {out[-1]['first_s']:.2f} s, warm {out[-1]['warm_s']:.3f} s "
              f"(first calls {out[-1]['first_all']})", flush=True)
    return out


def table(rows: list[dict]) -> str:
    """The Markdown table of the results."""
    lines = ["| task | first call (fresh process) | warm call | bar |", "|---|---|---|---|"]
    for r in rows:
        bar = BARS.get(r["task"])
        met = "" if bar is None else f"≤ {bar} s: {'yes' if r['first_s'] <= bar else '**no**'}"
        lines.append(f"| {DESCRIPTION[r['task']]} | {r['first_s']:.2f} s | "
                     f"{r['warm_s'] * 1e3:.1f} ms | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per task")
    parser.add_argument("--out", type=pathlib.Path, help="write cold_start.json and .md here")
    parser.add_argument("--cache", help="JAX's persistent compilation cache directory")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    tasks = [t for t in args.tasks if _available(t)]
    rows = measure(tasks, args.repeat, args.cache)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cold_start.json").write_text(json.dumps(rows, indent=1))
        (args.out / "cold_start.md").write_text(
            "# First calls, each in a fresh process (mlp-ce-85k, float32)\n\n"
            f"`python -m bench.cold_start --repeat {args.repeat}`; medians.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
