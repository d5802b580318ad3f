"""`python -m bench.dot_threads`: XLA:CPU's and torch's matrix products on one core and on all.

The ~85k MLP's H·v is mostly three shapes of matrix product (the forward `h @ W`, the backward
`d @ Wᵀ` and the weight gradient `hᵀ @ d`, batch 128, width 256). This times each alone, jitted in
JAX and eager in torch, in fresh processes pinned to one core and to every core, so it shows
how much of the machine each framework's matrix products use. Medians of 400 synchronised calls
of each, timed by the shared harness (`bench.harness`: JAX and torch in interleaved rounds); the
speed-up columns are each framework's time on one core over its time on all.
`--json PATH` also writes the times (µs) and speed-ups there.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

from . import harness

SHAPES = {"h @ W (forward)": "hw", "d @ W.T (backward, input)": "dwt", "h.T @ d (backward, weight)": "htd"}
# 4 rounds of 100 calls of each framework's product (fewer only for a call over 2.5 ms).
BUDGET = harness.Budget(rounds=4, seconds_per_method=1.0, max_calls_per_round=100)


def _median_us(jax_call, torch_call) -> tuple[float, float]:
    calls = {"jax": jax_call, "torch": torch_call}
    timings = harness.measure(list(calls), lambda fw: harness.Method(calls[fw], framework=fw),
                              "cpu", BUDGET)
    return tuple(timings[fw].summary()["median_s"] * 1e6 for fw in calls)


def worker() -> None:
    import jax
    import numpy as np
    import torch

    r = np.random.default_rng(0)
    h, d = (r.standard_normal((128, 256)).astype(np.float32) for _ in range(2))
    w = r.standard_normal((256, 256)).astype(np.float32)
    jh, jd, jw = (jax.device_put(a) for a in (h, d, w))
    th, td, tw = (torch.tensor(a) for a in (h, d, w))
    jax_fns = {"hw": jax.jit(lambda a, b: a @ b), "dwt": jax.jit(lambda a, b: a @ b.T),
               "htd": jax.jit(lambda a, b: a.T @ b)}
    args = {"hw": ((jh, jw), (th, tw)), "dwt": ((jd, jw), (td, tw)), "htd": ((jh, jd), (th, td))}
    torch_fns = {"hw": lambda a, b: a @ b, "dwt": lambda a, b: a @ b.T, "htd": lambda a, b: a.T @ b}
    out = {}
    for key in jax_fns:
        ja, ta = args[key]
        out[key] = _median_us(functools.partial(jax_fns[key], *ja),
                              functools.partial(torch_fns[key], *ta))
    print(json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dot_threads",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    all_cores = sorted(os.sched_getaffinity(0))
    results = {}
    for label, cores in (("1 core", all_cores[:1]), (f"{len(all_cores)} cores", all_cores)):
        proc = subprocess.run([sys.executable, "-m", "bench.dot_threads", "--worker"],
                              preexec_fn=lambda c=cores: os.sched_setaffinity(0, c),
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                              text=True, check=True)
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, many = results
    speedup = {key: {fw: results[one][key][i] / results[many][key][i]
                     for i, fw in enumerate(("jax", "torch"))} for key in SHAPES.values()}
    print("| product (128x256, 256x256) | " + " | ".join(f"JAX, {c} | torch, {c}" for c in results)
          + f" | speed-up on {many}, JAX | speed-up on {many}, torch |")
    print("|---|" + "---|---|" * len(results) + "---|---|")
    for name, key in SHAPES.items():
        cells = " | ".join(f"{results[c][key][0]:.0f} µs | {results[c][key][1]:.0f} µs"
                           for c in results)
        print(f"| {name} | {cells} | {speedup[key]['jax']:.2f}x | {speedup[key]['torch']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"products": SHAPES, "times_us": results, "speedup": speedup,
                       "speedup_cores": many}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
