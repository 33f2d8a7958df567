"""Block-wise sequential calibration: each block calibrated on the compressed blocks before it.

One-pass calibration (:func:`jaxcompress.calibrate` then ``tx(params, data=stats)``)
measures every weight's inputs on the *dense* model. GPTQ, SparseGPT and the other
data-aware methods do better when a block's statistics come from the outputs of the
blocks before it as they will run, already compressed: each block then corrects the
error of the ones before. :func:`sequential` wraps a transform so it runs that way.

Blocks are read off the traced model:

- a ``scan`` over stacked layers (``nn.scan``, ``lax.scan`` over a stacked state):
  each iteration is a block holding one slice of every weight the scan runs over;
- any other calibrated weight: its path up to its first component that ends in a
  digit (``layers_3`` of ``layers_3/mlp/up_proj/kernel``, ``h/0`` of
  ``h/0/attn/kernel``, ``dense1`` of ``dense1/kernel``) names its block, and a path
  without such a component (``lm_head/kernel``) is a block of its own;
- blocks run in the order of their first use in the program.

For each block the model runs on the batches with every earlier block compressed
(materialized for the forward) and collects only that block's statistics: the step
returns only those sums, so XLA drops the layers after it, and a scan runs only up to
the block's iteration (:func:`jaxcompress.graph.capture` with ``iteration=``). One
block's activations and statistics exist at a time; the price is that every block
runs the layers before it again (quadratic in depth, against linear for a loop that
keeps each batch's hidden state between blocks). Weights no calibrated use reaches
(embeddings, norms, biases) go through ``tx`` last, in one call, so they change no
block's statistics.

The batches may have different shapes (sentences grouped by length, one batch per
group, no padding rows), as for :func:`jaxcompress.calibrate`: each block's
statistics pool the rows of every batch, and each distinct batch shape is compiled
once per block. Every shape must run the same blocks (checked by tracing each one).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays.base import is_compressed
from jaxcompress.arrays.tree import materialize, on_arrays, split_arrays
from jaxcompress.calibration.calibrate import calibrate, stats_by_path
from jaxcompress.core.paths import path_to_str
from jaxcompress.core.progress import leaf_bytes, over_leaves
from jaxcompress.jaxpr import graph
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.filters import NothingSelectedWarning

__all__ = ["Block", "blocks_of", "sequential"]

_LAYER = re.compile(r"\d$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of :func:`sequential`: the weights compressed together.

    Attributes:
        name: ``layers_3`` for unrolled layers, ``layers[3]`` for slice 3 of stacked
            ones (the paths' common prefix), a leaf path for a block of one weight.
        paths: the leaf paths of its weights, in tree order.
        iteration: for stacked layers, the slice of each weight (its index along the
            weight's stacked axis); ``None`` otherwise.
        axis: for stacked layers, each weight's stacked axis, by path.
    """

    name: str
    paths: tuple[str, ...]
    iteration: int | None = None
    axis: dict[str, int] | None = None


def _block_key(path: str) -> str:
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if _LAYER.search(part):
            return "/".join(parts[: i + 1])
    return path


def _common_prefix(paths: Iterable[str]) -> str:
    split = [p.split("/") for p in paths]
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common) or "scan"


def blocks_of(apply_fn: Callable[..., Any], params: Any, x: Any) -> list[Block]:
    """The blocks :func:`sequential` compresses one after another, in program order.

    See the module docstring for the rule. Only weights with a ``dot_general`` or
    convolution use are in a block.

    Args:
        apply_fn: ``apply_fn(params, x)``.
        params: the parameter tree (arrays; shapes suffice).
        x: an example batch (an array or a ``jax.ShapeDtypeStruct``).

    Returns:
        The blocks, first used first.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"layers": {"w": jnp.ones((3, 4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
        >>> def apply(p, x):
        ...     x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["w"])
        ...     return x @ p["head"]["kernel"]
        >>> [(b.name, b.iteration) for b in blocks_of(apply, params, jnp.ones((2, 4)))]
        [('layers/w[0]', 0), ('layers/w[1]', 1), ('layers/w[2]', 2), ('head/kernel', None)]
    """
    closed, paths = graph.trace_jaxpr(apply_fn, params, x)
    uses = graph.uses_in_jaxpr(closed, paths)
    groups: dict[Any, list[str]] = {}
    first: dict[Any, tuple[int, ...]] = {}
    axes: dict[Any, dict[str, int]] = {}
    for path in paths:
        path_uses = uses[path]
        if not path_uses:
            continue
        stacked = path_uses[0]
        if stacked.stacked is not None and stacked.scan is not None:
            key: Any = ("scan", stacked.scan)
            axes.setdefault(key, {})[path] = stacked.stacked
        else:
            key = _block_key(path)
        groups.setdefault(key, []).append(path)
        site = min(u.site for u in path_uses)
        first[key] = min(first.get(key, site), site)
    blocks: list[Block] = []
    for key in sorted(groups, key=lambda k: first[k]):
        members = tuple(groups[key])
        if isinstance(key, tuple):
            scan_site = key[1]
            eqn = graph.eqn_at(closed, scan_site)
            length, reverse = int(eqn.params["length"]), bool(eqn.params["reverse"])
            prefix = _common_prefix(members)
            order = range(length - 1, -1, -1) if reverse else range(length)
            blocks += [Block(f"{prefix}[{i}]", members, i, axes[key]) for i in order]
        else:
            blocks.append(Block(key, members))
    return blocks


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": v}`` as ``{"a": {"b": v}}``: a tree whose leaf paths are the keys."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _flat(tree: Any) -> dict[str, Any]:
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
    return {path_to_str(p): leaf for p, leaf in with_paths}


def _slice(leaf: jax.Array, block: Block, path: str) -> jax.Array:
    """The block's part of a leaf: all of it, or its slice for stacked layers."""
    if block.axis is None or block.iteration is None:
        return leaf
    return jnp.take(leaf, block.iteration, axis=block.axis[path])


def _slice_bytes(leaf: jax.Array, block: Block, path: str) -> int:
    return leaf_bytes(leaf) // (1 if block.axis is None else leaf.shape[block.axis[path]])


def _run(tx: Transform, sub: dict, data: Any, key: jax.Array | None, quiet: list) -> tuple:
    """``tx(sub, data=data)``, holding back "selected nothing" warnings (one block's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tx(sub, key=key, data=data)
    selected = True
    for w in caught:
        if issubclass(w.category, NothingSelectedWarning):
            selected = False
            quiet.append(w)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, selected


def _check_batches(batches: list[Any]) -> dict[tuple[int, ...], jax.ShapeDtypeStruct]:
    """One example per distinct feature shape (first seen first), after checking them."""
    if not batches:
        raise ValueError("batches is empty: sequential needs at least one batch")
    shapes: dict[tuple[int, ...], jax.ShapeDtypeStruct] = {}
    for i, x in enumerate(batches):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"batches[{i}] must be one array, got {type(x).__name__}")
        if len(x.shape) < 1 or x.shape[0] == 0:
            raise ValueError(
                f"batches[{i}] needs a non-empty leading batch dim, got shape {x.shape}"
            )
        first = next(iter(shapes.values()), None)
        if first is not None and np.dtype(x.dtype) != first.dtype:
            raise ValueError(
                f"batches[{i}] has dtype {np.dtype(x.dtype)}, batches[0] {first.dtype}: "
                "every batch must have one dtype"
            )
        shapes.setdefault(tuple(x.shape[1:]), jax.ShapeDtypeStruct(x.shape, x.dtype))
    return shapes


def _same_blocks(fn: Callable[..., Any], arrays: Any, shapes: dict) -> list[Block]:
    """The blocks of the first shape, after checking every other shape runs the same."""
    examples = list(shapes.values())
    blocks = blocks_of(fn, arrays, examples[0])
    for example in examples[1:]:
        other = blocks_of(fn, arrays, example)
        if other != blocks:
            raise ValueError(
                f"sequential: batches of shape {example.shape} run the blocks "
                f"{[b.name for b in other]}, those of shape {examples[0].shape} "
                f"{[b.name for b in blocks]}; every batch shape must run the same blocks "
                "(calibrate the shapes that differ separately)"
            )
    return blocks


def sequential(
    tx: Transform,
    apply_fn: Callable[..., Any],
    batches: Iterable[Any],
    *,
    progress: bool = True,
) -> Transform:
    """``tx`` applied block by block, each block calibrated on the compressed ones before.

    Applied to params, the returned transform finds the model's blocks by tracing
    (:func:`blocks_of`: scan iterations over stacked layers, unrolled layers grouped
    by path), then for each block in program order runs the model on ``batches``
    with the earlier blocks already compressed, collects that block's
    :class:`~jaxcompress.calibration.calibrate.InputStats` only, and calls
    ``tx(block_params, data=block_stats)`` on a tree holding just the block's weights
    (same paths, so ``where=`` filters still match). GPTQ, AWQ, SparseGPT, Wanda,
    Hessian-weighted k-means and whitened low rank all run this way. Block 0 sees
    exactly the one-pass statistics, and when ``tx`` compresses nothing every block
    does. Weights in no block (embeddings, norms, biases) go through ``tx`` last, with
    ``data=`` holding no statistics.

    Compressed leaves cannot be stacked, so a weight of stacked layers comes back as a
    dense stacked array of its compressed slices' values (with a warning naming it);
    the stats hold each slice's.

    Args:
        tx: the transform, typically data-aware (``jc.quantize(method="gptq")``).
        apply_fn: ``apply_fn(params, x)``, as for :func:`jaxcompress.calibrate`.
        batches: calibration inputs, each one array, all of one dtype; their shapes
            may differ (a list of length-grouped batches, as for
            :func:`jaxcompress.calibrate`), and each block's statistics pool the rows
            of all of them. Kept in a list, read once per block; each distinct shape
            is compiled once per block. Only one batch's activations of one block are
            held at a time.
        progress: show a bar over the blocks (on a terminal only).

    Returns:
        A :class:`~jaxcompress.transforms.base.Transform` whose stats are a dict from
        block name (``layers_0``, ``layers[2]``, and ``"rest"`` for the weights in no
        block) to ``tx``'s stats on that block.

    Raises:
        ValueError: for no batches or batches of different dtypes; once applied, for
            batch shapes that run different blocks, or ``data=`` given to the
            transform (it calibrates itself).
        TypeError: for a batch that is not one array.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model = LeNet300100()
        >>> x = jax.random.normal(jax.random.key(0), (32, 64))
        >>> params = jax.jit(model.init)(jax.random.key(1), x)["params"]
        >>> apply = lambda p, x: model.apply({"params": p}, x)
        >>> tx = jc.sequential(jc.quantize(bits=4, method="gptq", where="kernel"), apply, [x],
        ...                    progress=False)
        >>> compressed, stats = tx(params)
        >>> list(stats), type(compressed["dense2"]["kernel"]).__name__
        (['dense1', 'dense2', 'dense3', 'rest'], 'Quantized')
    """
    if not isinstance(tx, Transform):
        raise TypeError(f"tx must be a Transform (such as jc.quantize(...)), got {type(tx)}")
    batch_list = list(batches)
    shapes = _check_batches(batch_list)

    def apply(params: Any, *, key: jax.Array | None = None, data: Any = None):
        if data is not None:
            raise ValueError(
                "sequential: data= must be None; the transform calibrates each block itself"
            )
        arrays, rest = split_arrays(params)
        fn = on_arrays(apply_fn, rest)
        current = _flat(arrays)  # dense leaves, earlier blocks' compressed values in place
        order, treedef = list(current), jax.tree_util.tree_structure(arrays)
        result: dict[str, Any] = {}  # path -> compressed leaf (or dense stacked values)
        stats: dict[str, Any] = {}
        quiet: list[warnings.WarningMessage] = []
        blocks = _same_blocks(fn, arrays, shapes)
        sizes = [sum(_slice_bytes(current[p], b, p) for p in b.paths) for b in blocks]
        calls = 0
        for n, block in enumerate(
            over_leaves(blocks, sizes=sizes, description="sequential", enabled=progress)
        ):
            tree = jax.tree_util.tree_unflatten(treedef, [current[p] for p in order])
            found = stats_by_path(
                calibrate(fn, tree, batch_list, paths=block.paths, iteration=block.iteration)
            )
            sub = {p: _slice(current[p], block, p) for p in block.paths}
            sub_key = None if key is None else jax.random.fold_in(key, n)
            data_tree = _nest({p: found.get(p) for p in block.paths})
            (out, block_stats), _ = _run(tx, _nest(sub), data_tree, sub_key, quiet)
            calls += 1
            stats[block.name] = block_stats
            for path, leaf in _flat(out).items():
                dense = materialize(leaf) if is_compressed(leaf) else leaf
                if block.axis is None:
                    current[path] = dense
                    result[path] = leaf
                else:
                    axis = block.axis[path]
                    index = (slice(None),) * axis + (block.iteration,)
                    current[path] = current[path].at[index].set(dense.astype(current[path].dtype))
                    result[path] = current[path]
        done = {p for b in blocks for p in b.paths}
        stacked = sorted({p for b in blocks if b.axis is not None for p in b.paths})
        others = {p: leaf for p, leaf in current.items() if p not in done}
        if others:
            key_rest = None if key is None else jax.random.fold_in(key, len(blocks))
            data_tree = _nest({p: None for p in others})
            (out, rest_stats), _ = _run(tx, _nest(others), data_tree, key_rest, quiet)
            calls += 1
            stats["rest"] = rest_stats
            result.update(_flat(out))
        if quiet and len(quiet) == calls:
            warnings.warn(quiet[-1].message, quiet[-1].category, stacklevel=2)
        given = _flat(arrays)
        changed = [p for p in stacked if not jnp.array_equal(result[p], given[p])]
        if changed:
            warnings.warn(
                f"sequential: {changed} are stacked layers; their compressed slices cannot "
                "be stored stacked, so they come back as dense arrays of the compressed "
                "values",
                stacklevel=2,
            )
        compressed = jax.tree_util.tree_map_with_path(
            lambda p, leaf: result.get(path_to_str(p), leaf), params
        )
        return compressed, stats

    return Transform(apply, f"sequential({tx.name})")
