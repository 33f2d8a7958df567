"""One of two processes that run a compressed MLP on a global 8-device CPU mesh.

Started by ``tests/test_multihost.py`` as ``python multihost_worker.py PORT PROCESS_ID OUT``
with 4 fake CPU devices per process. First process 0 writes the gathered logits of a
compressed model to ``OUT.logits.npy``; the test imports :func:`compressed_model`,
:func:`batch` and :func:`forward` to compute the same logits in one process. Then the
processes compress a sharded model together (one global pruning threshold), save it
(each process its own blocks), load it back onto the mesh, and process 0 writes every
array of the compressed and the reloaded tree to ``OUT.arrays.npz`` (in
:func:`flat_arrays` order); the test compares them with :func:`save_chain` run in one
process.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc

# Exit status telling the test that CPU collectives are not available here.
NO_COLLECTIVES = 77
WIDTH = 64


def compressed_model() -> dict:
    """A 3-layer MLP, one compression per layer, the same in every process."""
    rng = np.random.default_rng(0)
    sizes = [(WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, 16)]
    params = {
        f"dense{i}": {
            "kernel": jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=shape[1]) * 0.1, jnp.float32),
        }
        for i, shape in enumerate(sizes, start=1)
    }
    compress = jc.chain(
        jc.quantize(8, axis=-1, where="dense1/kernel"),
        jc.prune(0.5, where="dense2/kernel"),
        jc.low_rank(rank=8, where="dense3/kernel"),
    )
    # One compiled call is quicker than many eager dispatches.
    return jax.jit(compress)(params)[0]


def dense_model() -> dict:
    """An uncompressed 3-layer MLP, the same in every process."""
    rng = np.random.default_rng(2)
    sizes = [(WIDTH, 2 * WIDTH)] * 3  # one shape: one set of compiled programs
    return {
        f"dense{i}": {
            "kernel": (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32),
            "bias": (rng.normal(size=shape[1]) * 0.1).astype(np.float32),
        }
        for i, shape in enumerate(sizes, start=1)
    }


def save_chain() -> jc.Transform:
    """Global magnitude pruning then 4-bit k-means on the kernels."""
    kernels = "kernel$"
    return jc.chain(jc.prune(0.6, scope="global", where=kernels), jc.cluster(bits=4, where=kernels))


def flat_arrays(tree) -> list[np.ndarray]:
    """Every array of a (compressed) tree, children included, in a fixed order."""
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def batch() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(16, WIDTH)).astype(np.float32)


def forward(params: dict, x: jax.Array) -> jax.Array:
    dense = jc.materialize(params)
    for name in ("dense1", "dense2"):
        x = jax.nn.relu(x @ dense[name]["kernel"] + dense[name]["bias"][None, :])
    return x @ dense["dense3"]["kernel"] + dense["dense3"]["bias"][None, :]


def _join(port: str, process_id: int) -> None:
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as error:  # an option this jax does not know
        print(f"no gloo CPU collectives: {error}", file=sys.stderr)
        sys.exit(NO_COLLECTIVES)
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert (jax.device_count(), jax.local_device_count()) == (8, 4)


def run_forward(process_id: int, out: str) -> None:
    from jax.experimental import multihost_utils

    from jaxcompress.runtime.parallel import data_parallel, tensor_parallel_specs
    from jaxcompress.runtime.sharding import place

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    compressed = compressed_model()
    placed = place(compressed, mesh, tensor_parallel_specs(compressed, mesh, style="alternate"))
    # Really global: each process holds only its own devices' shards.
    assert not placed["dense1"]["kernel"].codes.is_fully_addressable

    # Each process feeds only the rows of the batch its devices hold.
    x = batch()
    sharding = data_parallel(mesh)
    rows = [index[0] for index in sharding.addressable_devices_indices_map(x.shape).values()]
    local = x[min(r.start for r in rows) : max(r.stop for r in rows)]
    global_x = jax.make_array_from_process_local_data(sharding, local, x.shape)

    logits = multihost_utils.process_allgather(jax.jit(forward)(placed, global_x), tiled=True)
    if process_id == 0:
        np.save(out, np.asarray(logits))


def run_save(process_id: int, out: str) -> None:
    from pathlib import Path

    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    dense = dense_model()
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, P("data", "model") if x.ndim == 2 else P("model")), dense
    )
    # Each process makes only its own devices' shards: nothing is global on one host.
    sharded = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        dense,
        shardings,
    )
    assert not sharded["dense1"]["kernel"].is_fully_addressable
    compressed, _ = save_chain()(sharded)
    path = Path(out).with_name("model.jxc")
    jc.save(path, compressed)
    assert Path(f"{path}.part1").exists()
    loaded = jc.load(path, sharding=shardings)
    assert loaded["dense1"]["kernel"].mask.sharding.spec == P("data", "model")
    arrays = [
        multihost_utils.process_allgather(x, tiled=True)
        for tree in (compressed, loaded)
        for x in jax.tree.leaves(tree)
    ]
    if process_id == 0:
        np.savez(out, *[np.asarray(a) for a in arrays])


def main(port: str, process_id: int, out: str) -> None:
    # One jax.distributed start for both checks: starting the processes dominates.
    _join(port, process_id)
    run_forward(process_id, f"{out}.logits.npy")
    run_save(process_id, f"{out}.arrays.npz")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
