"""``checked``: a transform that refuses NaN and Inf inputs under ``jit`` too.

Eager calls of every factory already raise on a non-finite selected leaf, but a traced
leaf has no values to look at, so under ``jax.jit`` the factories only keep a
non-finite entry non-finite (each documents how). :func:`checked` adds the missing
check through :mod:`jax.experimental.checkify`, the one way to raise from inside a
compiled program, naming the leaf path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxcompress.core.checks import is_traced
from jaxcompress.transforms.base import Transform, flatten_leaves
from jaxcompress.transforms.filters import Filter, compile_filter, everything


def _floating_arrays(leaf: Any) -> list[jax.Array]:
    """The floating arrays of a leaf: the leaf itself, or a compressed leaf's children."""
    arrays = jax.tree_util.tree_leaves(leaf)
    return [x for x in arrays if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]


def _unfunctionalized(name: str) -> ValueError:
    return ValueError(
        f"{name} was traced by jax.jit without checkify: call it as "
        "jax.jit(checkify.checkify(tx)) and err.throw() the error it returns, or build it "
        "with jc.checked(tx, jit=True), which does both"
    )


def _check_finite(name: str, where: Filter, params: Any) -> None:
    """Raises (eagerly) or records a checkify error (traced) for the first non-finite leaf."""
    select = compile_filter(where)
    entries, _ = flatten_leaves(params)
    for entry in entries:
        if not select(entry.path, entry.leaf):
            continue
        message = f"{name}: leaf {entry.path!r} contains NaN or Inf values"
        for array in _floating_arrays(entry.leaf):
            finite = jnp.isfinite(array).all()
            if not is_traced(array):
                if not bool(finite):
                    raise ValueError(message)
                continue
            try:
                checkify.check(finite, message.replace("{", "{{").replace("}", "}}"))
            except ValueError as error:
                raise _unfunctionalized(name) from error


def checked(fn: Callable, *, where: Filter = everything, jit: bool = False) -> Any:
    """``fn`` with every selected floating leaf of its input checked to be finite first.

    Eagerly, a NaN or Inf raises ``ValueError`` naming the leaf path before ``fn``
    runs. Under ``jax.jit`` the check is a :func:`jax.experimental.checkify.check`:
    the caller functionalizes it, ``err, out = jax.jit(checkify.checkify(tx))(params)``
    and then ``err.throw()`` raises the same message (as ``checkify.JaxRuntimeError``,
    a ``ValueError``). A plain ``jax.jit(checked(tx))`` cannot carry the check and
    raises ``ValueError`` while tracing, so it is never silently unchecked.
    ``jit=True`` returns that checkify-and-throw wrapper ready made.

    Without it, a traced transform never turns a non-finite entry into a finite one;
    see the README's "Bad input" note for what each method does instead.

    Args:
        fn: a :class:`~jaxcompress.Transform` (the result is one too, usable in
            :func:`~jaxcompress.chain`), or any function taking the params first, such
            as :func:`jaxcompress.training.fake_quant`'s.
        where: which leaves to check (all by default); a compressed leaf's floating
            children are checked. Pass the transform's own ``where=`` to ignore
            non-finite values in leaves it leaves alone.
        jit: compile ``fn`` with the check (``jax.jit`` of ``checkify.checkify``) and
            raise on a non-finite leaf after each call.

    Returns:
        A callable of ``fn``'s kind and signature.

    Raises:
        ValueError: (when called) a selected leaf holds NaN or Inf, or ``jax.jit``
            traced it without ``checkify``.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from jax.experimental import checkify
        >>> import jaxcompress as jc
        >>> params = {"dense": {"kernel": jnp.ones((4, 4)).at[1, 2].set(jnp.nan)}}
        >>> tx = jc.checked(jc.quantize(8))
        >>> err, _ = jax.jit(checkify.checkify(tx))(params)
        >>> err.get()
        "checked(quantize(8, ...)): leaf 'dense/kernel' contains NaN or Inf values (`check` failed)"
        >>> jc.checked(jc.quantize(8), jit=True)(params)
        Traceback (most recent call last):
        ...
        jax._src.checkify.JaxRuntimeError: checked(quantize(8, ...)): leaf 'dense/kernel' ...
    """
    name = f"checked({getattr(fn, 'name', getattr(fn, '__name__', 'fn'))})"

    if isinstance(fn, Transform):

        def apply(params, *, key=None, data=None):
            _check_finite(name, where, params)
            return fn(params, key=key, data=data)

        call: Callable = apply
    else:

        @functools.wraps(fn)
        def call(params, *args, **kwargs):
            _check_finite(name, where, params)
            return fn(params, *args, **kwargs)

    if jit:
        call = _jit_and_throw(call)
    return Transform(call, name) if isinstance(fn, Transform) else call


def _jit_and_throw(call: Callable) -> Callable:
    """``call`` compiled with its checks functionalized; a failed check raises."""
    compiled = jax.jit(checkify.checkify(call))

    @functools.wraps(call)
    def run(*args, **kwargs):
        error, out = compiled(*args, **kwargs)
        error.throw()
        return out

    return run
