"""Saving a training loop's state with orbax, and resuming it bit for bit.

:class:`LoopCheckpoints` keeps the latest states of a loop (its step, trainable
pytree, optimizer state and loss history) in an orbax ``CheckpointManager``
directory, with a JSON fingerprint of the run beside each. A later run with the same
fingerprint carries on from the latest step; one with another is refused, naming
what differs. Arrays are saved and restored exactly, so a loop whose step is a pure
function of (state, step number) continues as if it had never stopped.

orbax-checkpoint is optional: it is imported when a :class:`LoopCheckpoints` is made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["LoopCheckpoints", "Resumed", "digest"]

# The format of what is saved; a change to it makes older checkpoints refused.
_VERSION = 1
# The newest two are kept: the latest, and one before it in case the latest was cut off.
_KEEP = 2


def _orbax(caller: str) -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            f"{caller}: checkpoint_dir= needs orbax-checkpoint; install it with "
            "`pip install orbax-checkpoint`"
        ) from None
    return ocp


def digest(tree: Any) -> str:
    """A SHA-256 of a pytree's structure and of every array leaf's shape, dtype and bytes.

    Example:
        >>> import jax.numpy as jnp
        >>> digest({"a": jnp.ones(2)}) == digest({"a": jnp.ones(2)})
        True
        >>> digest({"a": jnp.ones(2)}) == digest({"a": jnp.zeros(2)})
        False
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        value = np.asarray(leaf)
        h.update(f"{value.shape}{value.dtype}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _layout(tree: Any) -> dict[str, Any]:
    """The structure and each leaf's shape and dtype, as JSON values."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {
        "structure": str(treedef),
        "leaves": [[list(np.shape(x)), str(_dtype(x))] for x in leaves],
    }


def _numbered(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` as ``{"0": leaf, "1": leaf, ...}``: a layout orbax always takes."""
    return {str(i): leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(tree))}


@dataclasses.dataclass(frozen=True)
class Resumed:
    """The state a loop carries on from.

    Attributes:
        step: the number of steps already taken.
        train: the trainable pytree after them.
        opt_state: the optimizer state after them.
        history: the loss of each step taken, float32, of length ``step``.
    """

    step: int
    train: Any
    opt_state: Any
    history: np.ndarray


class LoopCheckpoints:
    """The checkpoints of one training loop in ``directory``.

    Args:
        directory: the orbax ``CheckpointManager`` directory (made if missing).
        fingerprint: JSON values that identify the run (the transform, the loss, digests
            of what is fixed); a checkpoint is resumed only when they are equal.
        every: save after every ``every`` steps (and :meth:`save` with ``force``).
        caller: the name in messages.

    Raises:
        ImportError: orbax-checkpoint is not installed.
        ValueError: ``every`` is not a positive integer.

    Example:
        >>> import tempfile
        >>> import jax.numpy as jnp
        >>> directory = tempfile.mkdtemp()
        >>> train, opt = {"w": jnp.ones(2)}, (jnp.zeros(2),)
        >>> with LoopCheckpoints(directory, fingerprint={"run": "a"}, every=1) as ckpt:
        ...     _ = ckpt.save(1, {"w": jnp.full(2, 3.0)}, opt, jnp.ones(1))
        >>> with LoopCheckpoints(directory, fingerprint={"run": "a"}, every=1) as ckpt:
        ...     resumed = ckpt.restore(train, opt)
        >>> resumed.step, resumed.train["w"].tolist(), resumed.history.tolist()
        (1, [3.0, 3.0], [1.0])
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fingerprint: dict[str, Any],
        every: int,
        caller: str = "train",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"{caller}: checkpoint_every must be a positive integer, got {every!r}"
            )
        self._ocp = _orbax(caller)
        self.directory = Path(directory).resolve()
        self.every = every
        self.caller = caller
        self.fingerprint = {"version": _VERSION, **fingerprint}
        options = self._ocp.CheckpointManagerOptions(max_to_keep=_KEEP, create=True)
        self._manager = self._ocp.CheckpointManager(self.directory, options=options)
        self._saved = self._manager.latest_step()

    def __enter__(self) -> LoopCheckpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Waits for a save in flight to be written, then lets the directory go."""
        self._manager.wait_until_finished()
        self._manager.close()

    def _meta(self, train: Any, opt_state: Any) -> dict[str, Any]:
        return {**self.fingerprint, "train": _layout(train), "opt_state": _layout(opt_state)}

    def restore(self, train: Any, opt_state: Any) -> Resumed | None:
        """The latest checkpoint's state, laid out and placed like ``train`` and ``opt_state``.

        Returns ``None`` when the directory holds no checkpoint.

        Raises:
            ValueError: the checkpoint was written by a run with another fingerprint or
                another layout of ``train`` or ``opt_state`` (naming what differs).
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        args = self._ocp.args
        saved = self._manager.restore(step, args=args.Composite(meta=args.JsonRestore()))["meta"]
        expected = self._meta(train, opt_state)
        differ = [name for name in sorted(set(saved) | set(expected)) if name != "step"]
        differ = [name for name in differ if saved.get(name) != expected.get(name)]
        if differ:
            detail = "; ".join(
                f"{name}: saved {_short(saved.get(name))}, now {_short(expected.get(name))}"
                for name in differ
            )
            raise ValueError(
                f"{self.caller}: the checkpoint in {self.directory} (step {step}) was written "
                f"by a different run ({detail}); pass another checkpoint_dir, or delete "
                "that one to start over"
            )

        def abstract(x: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=_sharding(x))

        target = {
            "train": jax.tree.map(abstract, _numbered(train)),
            "opt_state": jax.tree.map(abstract, _numbered(opt_state)),
            "history": jax.ShapeDtypeStruct(
                (step,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
            ),
        }
        state = self._manager.restore(step, args=args.Composite(state=args.StandardRestore(target)))
        state = state["state"]

        def unnumbered(like: Any, numbered: dict[str, Any]) -> Any:
            treedef = jax.tree_util.tree_structure(like)
            leaves = [numbered[str(i)] for i in range(len(numbered))]
            return jax.tree_util.tree_unflatten(treedef, leaves)

        return Resumed(
            step=int(step),
            train=unnumbered(train, state["train"]),
            opt_state=unnumbered(opt_state, state["opt_state"]),
            history=np.asarray(state["history"], np.float32),
        )

    def save(
        self, step: int, train: Any, opt_state: Any, history: Any, *, force: bool = False
    ) -> bool:
        """Saves the state after ``step`` steps if ``step`` is a multiple of ``every`` or ``force``.

        ``history`` is the loss of each of those steps. The write finishes in the
        background; :meth:`close` waits for it. Returns whether it saved.
        """
        if step == self._saved or not (force or step % self.every == 0):
            return False
        args = self._ocp.args
        state = {
            "train": _numbered(train),
            "opt_state": _numbered(opt_state),
            "history": np.array(history, np.float32),
        }
        meta = {**self._meta(train, opt_state), "step": int(step)}
        self._manager.save(
            step,
            args=args.Composite(state=args.StandardSave(state), meta=args.JsonSave(meta)),
            force=True,
        )
        self._saved = step
        return True


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _sharding(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
