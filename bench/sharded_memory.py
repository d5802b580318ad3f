"""Working memory of the curvature programs on a model sharded FSDP-style, per device.

`python -m bench.sharded_memory --devices 8` (simulated CPU devices: XLA_FLAGS is set here, in
a fresh process) prints one JSON object; `python -m bench --suite curvature-memory` runs it on 1
and 8 devices and writes the table of bench/RESULTS.md. The model: a two-layer tanh MLP, two
512 × 512 weights sharded on their first axis (`P("fsdp", None)`) and the batch on the same axis;
one parameter vector is 2.1 MB in float32. Each program is compiled inside `jax.jit` with the
parameters as its argument and read with `compiled.memory_analysis()` (per device): temporary
bytes, in full parameter vectors. An algorithm's *own* memory is that minus the temporary memory
of `jax.vmap(op)` over its batch of probes (1 for eigh, lanczos and solve), so that what the H·v
products themselves need is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

WIDTH = 512
BATCH = 64
BATCH_SIZE = 2  # probes in flight, for the probe estimators


def programs(jax, jnp, jhvp, x, key):
    """{name: (fn(params) -> result, probes in flight)}: the programs measured."""
    curvature = jhvp.curvature

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2

    def op_of(p):
        return jhvp.hessian_operator(loss, (p, x))

    def ones(p):
        return jax.tree.map(jnp.ones_like, p)

    def vmapped(b):
        return lambda p: jax.vmap(op_of(p))(jax.tree.map(lambda a: jnp.stack([a] * b), ones(p)))

    return {
        "vmap(op), 1 vector": (vmapped(1), 0),
        "vmap(op), 2 vectors": (vmapped(2), 0),
        "hvp": (lambda p: jhvp.hvp(loss, (p, x), ones(p)), 1),
        "eigh(k=2, num_matvecs=32)": (lambda p: curvature.eigh(op_of(p), key, 2,
                                                               num_matvecs=32), 1),
        "lanczos(op, v0, 32)": (lambda p: curvature.lanczos(op_of(p), ones(p), 32), 1),
        "trace(30), hutch++": (lambda p: curvature.trace(
            op_of(p), key, num_matvecs=30, method="hutch++", batch_size=BATCH_SIZE), 2),
        "trace(30), xtrace": (lambda p: curvature.trace(
            op_of(p), key, num_matvecs=30, method="xtrace", batch_size=BATCH_SIZE), 2),
        "trace(30), hutchinson": (lambda p: curvature.trace(
            op_of(p), key, num_matvecs=30, method="hutchinson", batch_size=BATCH_SIZE), 2),
        "diagonal(30)": (lambda p: curvature.diagonal(
            op_of(p), key, num_matvecs=30, batch_size=BATCH_SIZE), 2),
        "spectral_density(4, 32)": (lambda p: curvature.spectral_density(
            op_of(p), key, num_probes=4, num_matvecs=32, batch_size=BATCH_SIZE), 2),
        "solve(max_steps=20)": (lambda p: curvature.solve(op_of(p), ones(p), max_steps=20), 1),
        # The defaults (no batch_size): what a user gets without asking.
        "trace(30), default": (lambda p: curvature.trace(op_of(p), key, num_matvecs=30), None),
        "diagonal(30), default": (lambda p: curvature.diagonal(op_of(p), key,
                                                                num_matvecs=30), None),
        "spectral_density(4, 32), default": (lambda p: curvature.spectral_density(
            op_of(p), key, num_probes=4, num_matvecs=32), None),
    }


def measure(devices: int) -> dict:
    """Runs in this process (XLA_FLAGS already set): {program: bytes and vectors}."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jhvp

    assert len(jax.devices()) == devices, (len(jax.devices()), devices)
    mesh = jax.make_mesh((devices,), ("fsdp",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("fsdp", None))
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (WIDTH, WIDTH)) / WIDTH ** 0.5,
              "w2": jax.random.normal(k2, (WIDTH, WIDTH)) / WIDTH ** 0.5}
    params = jax.device_put(params, rows)
    x = jax.device_put(jax.random.normal(k3, (BATCH, WIDTH)), rows)
    vector = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    out = {"devices": devices, "vector_bytes": vector, "programs": {}}
    for name, (fn, probes) in programs(jax, jnp, jhvp, x, jax.random.key(1)).items():
        compiled = jax.jit(fn).lower(params).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        out["programs"][name] = {"temp_bytes": int(temp), "vectors": temp / vector,
                                 "probes": probes}
    out["answers"], out["layouts"] = answers(jax, jnp, jhvp, params, x)
    return out


def answers(jax, jnp, jhvp, params, x):
    """The results themselves (eager calls, outside any jit) and their leaves' layouts."""
    import numpy as np

    curvature = jhvp.curvature
    op = jhvp.hessian_operator(lambda p, x: jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2,
                               (params, x))
    key = jax.random.key(1)
    b = jax.tree.map(jnp.ones_like, params)
    results = {
        "eigh": curvature.eigh(op, key, 2, num_matvecs=32),
        "trace": curvature.trace(op, key, num_matvecs=30),
        "diagonal": curvature.diagonal(op, key, num_matvecs=30),
        "solve": curvature.solve(op, b, damping=1.0, max_steps=20),
    }
    sample = np.random.default_rng(0).integers(0, WIDTH, size=(2, 16))

    def picked(tree):  # 16 entries of each weight, and the leading axis if any
        return {k: np.asarray(v)[..., sample[0], sample[1]].tolist() for k, v in tree.items()}

    found = {
        "eigenvalues": np.asarray(results["eigh"].eigenvalues).tolist(),
        "eigenvectors": picked(results["eigh"].eigenvectors),
        "trace": float(results["trace"].estimate),
        "diagonal": picked(results["diagonal"].estimate),
        "solution": picked(results["solve"].x),
    }
    def spec(a):  # the partition spec without trailing Nones: P("fsdp", None) is ('fsdp',)
        axes = list(a.sharding.spec)
        while axes and axes[-1] is None:
            axes.pop()
        return str(tuple(axes))

    layouts = {
        "eigenvectors": spec(results["eigh"].eigenvectors["w1"]),
        "diagonal": spec(results["diagonal"].estimate["w1"]),
        "solution": spec(results["solve"].x["w1"]),
        "params": spec(params["w1"]),
    }
    return found, layouts


def run(devices: int) -> dict:
    """`measure(devices)` in a fresh process with that many simulated CPU devices."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_ENABLE_X64", None)
    done = subprocess.run([sys.executable, "-m", "bench.sharded_memory", "--devices",
                           str(devices)], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"bench.sharded_memory --devices {devices} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def own(result: dict, name: str) -> float:
    """The program's own memory in vectors: minus vmap(op) over its probes in flight."""
    progs = result["programs"]
    probes = progs[name]["probes"]
    base = {0: 0.0, None: 0.0, 1: progs["vmap(op), 1 vector"]["vectors"],
            2: progs["vmap(op), 2 vectors"]["vectors"]}[probes]
    return progs[name]["vectors"] - base


def table(one: dict, eight: dict) -> str:
    """The Markdown table of bench/RESULTS.md."""
    lines = ["| program | total, 1 device | total, 8 devices | own, 1 device | own, 8 devices "
             "| own 8 / own 1 |", "|---|---|---|---|---|---|"]
    for name in one["programs"]:
        a, b = one["programs"][name]["vectors"], eight["programs"][name]["vectors"]
        if one["programs"][name]["probes"] in (0, None):
            lines.append(f"| {name} | {a:.1f} | {b:.1f} | | | |")
            continue
        oa, ob = own(one, name), own(eight, name)
        ratio = f"{ob / oa:.2f}" if oa > 0.05 else "-"
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {oa:.1f} | {ob:.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="run 1 and 8 devices, print the table")
    args = ap.parse_args()
    if args.table:
        print(table(run(1), run(8)))
    else:
        print(json.dumps(measure(args.devices)))
