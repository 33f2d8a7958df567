"""Saving a tree split over a mesh shard by shard, and loading each shard in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.io import container, shards, treecodec
from jaxcompress.io.errors import FileFormatError


def _params():
    rng = np.random.default_rng(0)
    return {
        "a": {"kernel": rng.normal(size=(64, 128)).astype(np.float32)},
        "b": {"kernel": rng.normal(size=(128, 64)).astype(np.float32)},
        "c": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)},
        "bias": rng.normal(size=(64,)).astype(np.float32),
    }


def _compress(tree):
    return jc.chain(
        jc.prune(0.6, scope="global", where="^(a|b)/kernel$"),
        jc.cluster(bits=4, where="^a/kernel$"),
        jc.quantize(8, where="^c/kernel$"),
    )(tree)[0]


def _arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sharded_tree_saves_shard_by_shard_and_loads_onto_the_mesh(mesh8, tmp_path):
    params = _params()
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh8, P("data", "model") if x.ndim == 2 else P()), params
    )
    compressed = _compress(jax.device_put(params, shardings))
    path = tmp_path / "sharded.jxc"
    report = jc.save(path, compressed)

    header, _, _ = container.read_container(path)
    nodes = dict(treecodec.leaf_nodes(header["tree"]))
    # One block per distinct shard: the 4 x 2 grid of the packed mask and the codes.
    mask = nodes["a/kernel"]["mask"]
    assert mask["type"] == "blocks" and len(mask["blocks"]) == 8
    assert mask["blocks"][1]["index"] == [[0, 16], [8, 16]]
    assert nodes["c/kernel"]["codes"]["type"] == "blocks"
    # The replicated bias stays one plain array.
    assert nodes["bias"]["type"] == "array"
    assert "blocks" in report.leaves[0].encoding
    assert report.stream_bytes > 0 and report.file_bytes == path.stat().st_size

    want = _arrays(_compress(params))
    assert [a.tolist() for a in _arrays(jc.load(path))] == [a.tolist() for a in want]
    placed = jc.load(path, sharding=shardings)
    for got, expected in zip(jax.tree.leaves(placed), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    # The big children come back sharded as they were saved.
    for pick in (
        lambda t: t["a"]["kernel"].mask,
        lambda t: t["a"]["kernel"].values.indices,
        lambda t: t["b"]["kernel"].values,
        lambda t: t["c"]["kernel"].codes,
    ):
        got, saved = pick(placed), pick(compressed)
        assert got.sharding.is_equivalent_to(saved.sharding, got.ndim)
    assert not placed["a"]["kernel"].mask.is_fully_replicated
    assert not placed["c"]["kernel"].codes.is_fully_replicated


def test_a_device_reads_only_the_blocks_its_slice_touches():
    buffers = [np.full((2, 4), i, np.uint8) for i in range(4)]
    node = {
        "type": "blocks",
        "dtype": "uint8",
        "shape": [4, 8],
        "blocks": [
            {"index": [[r, r + 2], [c, c + 4]], "part": 0, "buffer": 2 * (r // 2) + c // 4}
            | {"coding": "raw"}
            for r in (0, 2)
            for c in (0, 4)
        ],
    }
    touched = []

    def get(index, where):
        touched.append(index)
        return memoryview(buffers[index].reshape(-1))

    source = shards.read_blocks(node, get, "w", dtype=np.dtype(np.uint8), shape=(4, 8))
    np.testing.assert_array_equal(source[(slice(2, 4), slice(4, 8))], buffers[3])
    assert touched == [3]
    # A slice across blocks stitches them; each block is decoded once.
    np.testing.assert_array_equal(source[(slice(1, 3), slice(3, 5))], [[0, 1], [2, 3]])
    assert sorted(touched) == [0, 1, 2, 3]
    whole = np.asarray(source)
    assert whole.shape == (4, 8) and whole[3, 7] == 3


def _node(blocks, shape=(4,), dtype="uint8"):
    entries = [{"index": index, "part": 0, "buffer": 0, "coding": "raw"} for index in blocks]
    return {"type": "blocks", "dtype": dtype, "shape": list(shape), "blocks": entries}


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (_node([[[0, 2]], [[1, 4]]]), "tile"),  # overlap
        (_node([[[0, 2]], [[3, 4]]]), "tile"),  # gap
        (_node([[[0, 2]], [[0, 2]], [[2, 4]]]), "tile|grid"),  # duplicate
        (_node([[[0, 5]]]), "malformed index"),  # outside the array
        (_node([[[0, 4]]], dtype="float32"), "blocks hold"),
        (_node([[[0, 4]]], shape=(5,)), "blocks cover"),
        ({**_node([[[0, 4]]]), "blocks": []}, "non-empty"),
        (
            {**_node([[[0, 4]]]), "blocks": [{"index": [[0, 4]], "part": 1, "slot": 0}]},
            "part",
        ),
    ],
)
def test_malformed_block_nodes_raise(node, message):
    with pytest.raises(FileFormatError, match=message):
        shards.read_blocks(
            node, lambda i, w: memoryview(b"abcd"), "w", dtype=np.dtype(np.uint8), shape=(4,)
        )


def test_damaged_blocks_raise_on_read():
    node = _node([[[0, 4]]])
    short = shards.read_blocks(
        node, lambda i, w: memoryview(b"abc"), "w", dtype=np.dtype(np.uint8), shape=(4,)
    )
    with pytest.raises(FileFormatError, match="3 bytes"):
        np.asarray(short)
    node["blocks"][0]["coding"] = "zip"
    unknown = shards.read_blocks(
        node, lambda i, w: memoryview(b"abcd"), "w", dtype=np.dtype(np.uint8), shape=(4,)
    )
    with pytest.raises(FileFormatError, match="coding"):
        np.asarray(unknown)


def test_missing_or_foreign_part_file_is_named(tmp_path):
    path = tmp_path / "m.jxc"
    reader = shards.PartReader(path, parts=2, save_id=7)
    with pytest.raises(FileFormatError, match="part file m.jxc.part1 is missing"):
        reader.record(1, 0, "w")
    with container.ContainerWriter(shards.part_path(path, 1)) as writer:
        writer.commit(
            {"format": shards.PART_FORMAT, "part": 1, "parts": 2, "save_id": 8, "blocks": []}
            | {"buffers": writer.buffers}
        )
    with pytest.raises(FileFormatError, match="not part 1 of 2 of this save"):
        reader.record(1, 0, "w")


def test_split_detection():
    assert not shards.is_split(np.ones(4)) and not shards.is_split(jnp.ones(4))
