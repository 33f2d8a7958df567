"""What every Pallas kernel here shares: targets, tile arithmetic, padding, the NT dot.

A platform is named as :func:`jax.export.export` names it. ``"cuda"`` and ``"rocm"``
run the GPU kernels (Pallas on the Triton backend; on ``"cuda"`` the weight-only
int8/int4 family prefers its Mosaic GPU body, :mod:`.quantized_mgpu`); ``"tpu"`` runs
the TPU kernels (Mosaic TPU). The two differ in their memory model, so each kernel
family has two bodies:

- GPU: a ``(row tiles, column tiles)`` grid; each program holds pointers to whole
  rows of its operands and walks the contracted axis itself (``fori_loop``), loading
  one ``(bn, bk)`` tile of codes at a time. Triton wants every loaded shape a power of
  two and dots at least 16 wide.
- TPU: a ``(row tiles, column tiles, contracted tiles)`` grid whose last axis runs in
  order; Pallas copies each ``(bn, bk)`` tile into VMEM and the kernel adds its
  product to a float32 VMEM accumulator. Block shapes respect the ``(8, 128)`` tiling
  (``(32, 128)`` for 8-bit codes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.arrays.serving import QuantizedMatrix

__all__ = [
    "code_layout",
    "GPU_PLATFORMS",
    "TPU_PLATFORMS",
    "compute_dtype",
    "dot_nt",
    "export_disabled_checks",
    "next_power_of_2",
    "pad_to",
    "round_up",
    "target_of",
]

GPU_PLATFORMS = ("cuda", "rocm")
TPU_PLATFORMS = ("tpu",)

# Triton IR has no compatibility guarantee, so jax.export refuses its custom call unless
# told to serialize it anyway.
_TRITON_CALL = "__gpu$xla.gpu.triton"


def target_of(platform: str) -> str | None:
    """``"gpu"`` or ``"tpu"``: which kernel bodies run on ``platform``; ``None`` for others.

    Example:
        >>> target_of("cuda"), target_of("tpu"), target_of("cpu")
        ('gpu', 'tpu', None)
    """
    if platform in GPU_PLATFORMS:
        return "gpu"
    if platform in TPU_PLATFORMS:
        return "tpu"
    return None


def export_disabled_checks(platform: str) -> list[jax.export.DisabledSafetyCheck]:
    """The safety checks :func:`jax.export.export` must skip for these kernels on ``platform``.

    The Triton kernels lower to Triton's custom call, which ``jax.export`` refuses by
    default (Triton IR has no compatibility guarantee); ``tpu_custom_call`` and the Mosaic
    GPU kernel's ``mosaic_gpu_v2`` need nothing.

    Example:
        >>> len(export_disabled_checks("cuda")), export_disabled_checks("tpu")
        (1, [])
    """
    if target_of(platform) == "gpu":
        return [jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)]
    return []


def round_up(n: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is at least ``n``.

    Example:
        >>> round_up(300, 128), round_up(256, 128)
        (384, 256)
    """
    return -(-n // multiple) * multiple


def next_power_of_2(n: int) -> int:
    """The least power of two that is at least ``n`` (and at least 1).

    Example:
        >>> next_power_of_2(5), next_power_of_2(16)
        (8, 16)
    """
    return 1 << max(n - 1, 0).bit_length()


def pad_to(array: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``array`` zero-padded at the end of each axis to ``shape`` (no copy when it fits).

    Example:
        >>> import jax.numpy as jnp
        >>> pad_to(jnp.ones((1, 2)), (2, 3)).tolist()
        [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    pads = [(0, want - have) for have, want in zip(array.shape, shape, strict=True)]
    if not any(after for _, after in pads):
        return array
    return jnp.pad(array, pads)


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype the tiles are multiplied in: 16-bit floats stay, anything else is float32.

    Codes of up to 8 bits are exact in bfloat16, so a bfloat16 activation meets its
    weights' codes in a bfloat16 dot with float32 accumulation.

    Example:
        >>> import jax.numpy as jnp
        >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.float32)
        (dtype(bfloat16), dtype('float32'))
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return dtype
    return jnp.dtype(jnp.float32)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` with float32 accumulation: ``(m, k)`` and ``(n, k)`` give ``(m, n)``.

    Example:
        >>> import jax.numpy as jnp
        >>> dot_nt(jnp.ones((1, 2)), jnp.ones((3, 2))).tolist()
        [[2.0, 2.0, 2.0]]
    """
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def code_layout(leaf: QuantizedMatrix) -> tuple[int, int | None] | str:
    """``(code width, group size or None)`` of a serving matrix, or why no kernel takes it.

    The checks every weight-only kernel body shares: codes laid out ``(N, K)`` (``K // 2``
    bytes when packed), at most 4 bits when packed, and packed halves that do not split
    a scale group.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> q = jc.quantize(bits=4, axis=-1, group_size=128)
        >>> code_layout(to_serving(q({"w": jnp.ones((512, 256))})[0]["w"]))
        (256, 128)
    """
    k, n = leaf.matrix_shape
    width = k // 2 if leaf.packed else k
    if tuple(leaf.codes.shape) != (n, width):
        return f"codes of shape {tuple(leaf.codes.shape)}, not ({n}, {width})"
    if leaf.packed and leaf.bits > 4:
        return f"packed codes of {leaf.bits} bits"
    group = None if leaf.groups == 1 else leaf.group
    if group is not None and leaf.packed and width % group:
        return (
            f"packed codes whose half width {width} is no multiple of the group size {group}: "
            "the two nibbles' scale groups do not line up"
        )
    return width, group
