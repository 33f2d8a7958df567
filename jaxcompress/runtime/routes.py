"""Kernel families ``accelerate`` may route a product to on GPUs and TPUs.

A kernel family is a pair of functions (Pallas kernels, say) registered with
:func:`register_kernels`:

- ``kernel_for(leaf, rows, platform, *, dtype, stable_only) -> (name | None,
  reason)``: whether the family has a kernel for this serving matrix (a
  :class:`~jaxcompress.QuantizedMatrix` or :class:`~jaxcompress.ClusteredMatrix`),
  this many activation rows of ``dtype`` and this target platform (``"cuda"``,
  ``"rocm"``, ``"tpu"``), one ``jax.export`` can serialize where ``stable_only``;
  and why or why not;
- ``matmul(x, leaf, *, platform) -> (M, N) array``: ``x @ W`` for a ``(M, K)``
  activation, with the kernel ``kernel_for`` named.

``accelerate``'s router asks each registered family in turn, for products on a
non-CPU platform only (the CPU routes are measured ones: see
:mod:`jaxcompress.runtime.accelerate`); the first that names a kernel runs it, and
``explain`` shows its name and reason. With no family registered, or none that has a
kernel, the router takes its own float routes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import jax

__all__ = [
    "KernelFamily",
    "find_kernel",
    "register_kernels",
    "registered",
    "unregister_kernels",
    "using_kernels",
]

KernelFor = Callable[..., tuple[str | None, str]]
Matmul = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class KernelFamily:
    """One registered family: its ``kernel_for`` and ``matmul`` (see the module docstring).

    Attributes:
        kernel_for: ``(leaf, rows, platform) -> (name | None, reason)``.
        matmul: ``(x, leaf, *, platform) -> (M, N)`` array.
    """

    kernel_for: KernelFor
    matmul: Matmul


_FAMILIES: list[KernelFamily] = []

# The project's own families, imported by name on first use (a GPU or TPU target, or a
# look at the registry) so that ``import jaxcompress`` does not pay for Pallas (0.4 s).
_BUILTIN_MODULES = ("jaxcompress.runtime.pallas",)
_builtin_loaded = False


def _load_builtin() -> None:
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)  # each registers its family on import


def register_kernels(kernel_for: KernelFor, matmul: Matmul) -> KernelFamily:
    """Adds a kernel family for ``accelerate``'s router to consult; returns its handle.

    Families registered earlier are asked first.

    Args:
        kernel_for: ``(leaf, rows, platform) -> (name | None, reason)``.
        matmul: ``(x, leaf, *, platform) -> (M, N)`` array, ``x`` of shape ``(M, K)``.

    Returns:
        The :class:`KernelFamily`, for :func:`unregister_kernels`.

    Raises:
        TypeError: when either argument is not callable.

    Example:
        >>> family = register_kernels(lambda leaf, rows, platform: (None, "no"),
        ...                           lambda x, leaf, *, platform: x)
        >>> family in registered()
        True
        >>> unregister_kernels(family)
        >>> family in registered()
        False
    """
    for name, fn in (("kernel_for", kernel_for), ("matmul", matmul)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    family = KernelFamily(kernel_for, matmul)
    _FAMILIES.append(family)
    return family


def unregister_kernels(family: KernelFamily) -> None:
    """Removes a family added by :func:`register_kernels` (nothing when it is not there).

    Example:
        >>> unregister_kernels(KernelFamily(print, print))  # never registered: no-op
    """
    if family in _FAMILIES:
        _FAMILIES.remove(family)


def registered() -> tuple[KernelFamily, ...]:
    """The registered families, in the order they are asked.

    Example:
        >>> isinstance(registered(), tuple)
        True
    """
    _load_builtin()
    return tuple(_FAMILIES)


@contextlib.contextmanager
def using_kernels(*families: KernelFamily) -> Iterator[None]:
    """Only ``families`` are asked inside the ``with`` block (none: no kernels at all).

    For comparing a kernel with the router's own fallback, or for testing a family
    alone; the registry is put back on leaving.

    Example:
        >>> with using_kernels():
        ...     registered()
        ()
    """
    _load_builtin()
    saved = list(_FAMILIES)
    _FAMILIES[:] = families
    try:
        yield
    finally:
        _FAMILIES[:] = saved


def find_kernel(
    leaf: Any, rows: int, platform: str, *, dtype: Any = None, stable_only: bool = True
) -> tuple[KernelFamily | None, str, str]:
    """``(family, kernel name, reason)`` of the first family with a kernel for ``leaf``.

    ``(None, "", reasons)`` when none has one: the reasons of every family, joined by
    ``"; "`` (``"no kernel family registered"`` when there is none). ``dtype`` is the
    activation's dtype (``None``: not known); ``stable_only`` asks only for kernels
    whose custom call ``jax.export`` can serialize.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> q, _ = jc.quantize(bits=8, axis=-1)({"w": jnp.ones((16, 8))})
        >>> leaf = jc.accelerate(lambda p, x: x @ p["w"]).prepare(q)["w"]
        >>> family, name, reason = find_kernel(leaf, 1, "cuda")
        >>> (family is None) == (name == ""), isinstance(reason, str)
        (True, True)
    """
    _load_builtin()
    reasons = []
    for family in _FAMILIES:
        name, reason = family.kernel_for(leaf, rows, platform, dtype=dtype, stable_only=stable_only)
        if name is not None:
            return family, name, reason
        reasons.append(reason)
    return None, "", "; ".join(reasons) or "no kernel family registered"
