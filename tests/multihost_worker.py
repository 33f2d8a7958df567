"""One of two processes that run a compressed MLP on a global 8-device CPU mesh.

Started by ``tests/test_multihost.py`` as ``python multihost_worker.py PORT PROCESS_ID OUT``
with 4 fake CPU devices per process. Process 0 writes the gathered logits to ``OUT``
(a ``.npy`` path). The test imports :func:`compressed_model`, :func:`batch` and
:func:`forward` to compute the same logits in one process.
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


def batch() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(16, WIDTH)).astype(np.float32)


def forward(params: dict, x: jax.Array) -> jax.Array:
    dense = jc.materialize(params)
    for name in ("dense1", "dense2"):
        x = jax.nn.relu(x @ dense[name]["kernel"] + dense[name]["bias"][None, :])
    return x @ dense["dense3"]["kernel"] + dense["dense3"]["bias"][None, :]


def main(port: str, process_id: int, out: str) -> None:
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

    from jax.experimental import multihost_utils

    from jaxcompress.parallel import data_parallel, tensor_parallel_specs
    from jaxcompress.sharding import place

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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
