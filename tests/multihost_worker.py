"""One process of the 2-process CPU test in test_multihost.py.

Usage: python multihost_worker.py COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID

Follows README.md, "Sharded and multi-device inputs": initialize jax.distributed before any other
JAX call (imports create no backend), build the mesh from all processes' devices, assemble the global batch from each
process's part, call jhvp on the global arrays and read the results back with process_allgather.
Prints one JSON line with the largest relative error against an unsharded computation on the full
batch. (Everything runs under ``main`` so that pytest's --doctest-modules can import this file.)
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jhvp


def loss(params, x, y):
    pred = jnp.tanh(x @ params["w"]) @ params["v"]
    return jnp.mean((pred - y) ** 2)


def rel_err(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def curvature(op, b, *, gather=True):
    """eigh, trace and solve on `op`, as numpy (gathered from all processes when `gather`)."""
    key = jax.random.key(7)
    eig = jhvp.curvature.eigh(op, key, 2, num_matvecs=20)
    tr = jhvp.curvature.trace(op, key, num_matvecs=30)
    x = jhvp.curvature.solve(op, b, damping=10.0, rtol=0.0, max_steps=15).x
    out = (eig.eigenvalues, tr.estimate, x)
    eigenvalues, trace, x = process_allgather(out, tiled=True) if gather else out
    return {"eigenvalues": np.asarray(eigenvalues), "trace": np.asarray(trace),
            "solve.w": np.asarray(x["w"]), "solve.v": np.asarray(x["v"])}


def main(coordinator, num_processes, process_id):
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=60)

    # As tests/conftest.py does for the test process.
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.config.jax_cpu_collectives_implementation == "gloo"  # the default, as README says
    assert jax.process_count() == num_processes and jax.process_index() == process_id
    assert jax.local_device_count() == 2 and jax.device_count() == 2 * num_processes, jax.devices()
    dt = np.float64 if jax.config.jax_enable_x64 else np.float32

    # Same seed in every process: identical parameters, tangent and full batch everywhere.
    rng = np.random.default_rng(0)
    batch, d_in, hidden = 32, 6, 8
    params = {"w": rng.standard_normal((d_in, hidden)).astype(dt),
              "v": rng.standard_normal(hidden).astype(dt)}
    tangent = {"w": rng.standard_normal((d_in, hidden)).astype(dt),
               "v": rng.standard_normal(hidden).astype(dt)}
    x_full = rng.standard_normal((batch, d_in)).astype(dt)
    y_full = rng.standard_normal(batch).astype(dt)

    # Reference: plain forward-over-reverse on the full, unsharded batch, on one local device.
    dev = jax.local_devices()[0]
    xd, yd = jax.device_put(x_full, dev), jax.device_put(y_full, dev)
    expected = jax.jvp(jax.grad(lambda p: loss(p, xd, yd)), (jax.device_put(params, dev),),
                       (jax.device_put(tangent, dev),))[1]
    expected = jax.tree.map(np.asarray, expected)
    reference_op = jhvp.hessian_operator(loss, (jax.device_put(params, dev), xd, yd))
    expected_curvature = curvature(reference_op, jax.device_put(tangent, dev), gather=False)

    # --- as in the README ------------------------------------------------------------------------
    mesh = Mesh(np.array(jax.devices()).reshape(-1, 2), ("data", "model"))  # all hosts' devices
    rows = np.array_split(np.arange(batch), jax.process_count())[jax.process_index()]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", None)), x_full[rows])
    y = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), y_full[rows])
    params["w"] = jax.device_put(params["w"], NamedSharding(mesh, P(None, "model")))
    params["v"] = jax.device_put(params["v"], NamedSharding(mesh, P("model")))
    tangent = jax.tree.map(lambda t, p: jax.device_put(t, p.sharding), tangent, params)
    hv = jhvp.hvp(loss, (params, x, y), tangent)
    hv_op = jhvp.hessian_operator(loss, (params, x, y)) @ tangent
    hv, hv_op = process_allgather((hv, hv_op), tiled=True)  # numpy, the same in every process
    # ---------------------------------------------------------------------------------------------
    # jhvp.curvature on the operator of the sharded problem: the same program as on one device.
    found_curvature = curvature(jhvp.hessian_operator(loss, (params, x, y)), tangent)

    assert x.shape == (batch, d_in) and not x.is_fully_addressable, x.sharding
    assert len(x.addressable_shards) == 2
    errors = {f"{which}.{name}": rel_err(out[name], expected[name])
              for which, out in (("hvp", hv), ("operator", hv_op)) for name in expected}
    errors |= {f"curvature.{name}": rel_err(found_curvature[name], want)
               for name, want in expected_curvature.items()}
    print(json.dumps({"process": process_id, "dtype": np.dtype(dt).name,
                      "max_rel_err": max(errors.values()), "errors": errors}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
