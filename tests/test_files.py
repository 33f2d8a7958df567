"""save / load / inspect_file: identity, sizes, entropy bound, damage, atomicity, sharding."""

import contextlib
import json
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX
from jaxcompress.io import container


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def assert_same_tree(a, b):
    """Same structure, same leaf types and static metadata, bit-identical children."""
    leaves_a, def_a = jax.tree_util.tree_flatten(a, is_leaf=jc.is_compressed)
    leaves_b, def_b = jax.tree_util.tree_flatten(b, is_leaf=jc.is_compressed)
    assert def_a == def_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert type(x) is type(y) or (
            isinstance(x, (jax.Array, np.ndarray)) and isinstance(y, jax.Array)
        )
        if jc.is_compressed(x):
            children_a, meta_a = jax.tree_util.tree_flatten(x)
            children_b, meta_b = jax.tree_util.tree_flatten(y)
            assert meta_a == meta_b
            for ca, cb in zip(children_a, children_b, strict=True):
                assert ca.dtype == cb.dtype and ca.shape == cb.shape
                np.testing.assert_array_equal(np.asarray(ca), np.asarray(cb))
        elif isinstance(x, (jax.Array, np.ndarray)):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y and type(x) is type(y)


def _every_leaf_kind():
    w = _normal(0, (48, 40))
    conv = _normal(1, (3, 3, 4, 8))
    return {
        "dense": {"w": w, "bias16": _normal(2, (40,), jnp.float16)},
        "bf16": _normal(3, (8, 8), jnp.bfloat16),
        "ints": jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
        "flags": jnp.array([True, False, True]),
        "sparse": jc.prune(0.7)({"w": w})[0]["w"],
        "sparse_empty": jc.prune(0.99)({"w": _normal(4, (3, 5))})[0]["w"],
        "clustered": jc.cluster(bits=3)({"w": w})[0]["w"],
        "clustered_channel": jc.cluster(k=5, per_channel=True)({"w": w})[0]["w"],
        "int8": jc.quantize(8)({"w": conv})[0]["w"],
        "int4_group": jc.quantize(4, group_size=16)({"w": w})[0]["w"],
        "int3_asym": jc.quantize(3, axis=None, symmetric=False)({"w": w})[0]["w"],
        "int2_rows": jc.quantize(2, axis=0, scale_dtype=jnp.bfloat16)({"w": w})[0]["w"],
        "pruned_clustered": jc.chain(jc.prune(0.9), jc.cluster(bits=4))({"w": w})[0]["w"],
        "pruned_quantized": jc.chain(jc.prune(0.5), jc.quantize(6))({"w": w})[0]["w"],
        "frozen": FrozenDict({"a": jnp.ones(3)}),
        "seq": [jnp.zeros(2), (None, 3, 2.5, True)],
        "int_keys": {7: jnp.full((2,), 7.0), 3: jnp.zeros(1)},
    }


@pytest.mark.parametrize("entropy", [True, False])
def test_round_trip_is_identity_for_every_leaf_kind(tmp_path, entropy):
    tree = _every_leaf_kind()
    path = tmp_path / "all.jxc"
    jc.save(path, tree, entropy=entropy, metadata={"note": "test"})
    assert_same_tree(tree, jc.load(path))


def test_sizes_on_disk_are_nbytes_plus_header(tmp_path):
    w = _normal(0, (64, 48))
    tree = {
        "q": jc.quantize(4, group_size=16)({"w": w})[0]["w"],
        "c": jc.cluster(bits=5)({"w": w})[0]["w"],
        "b": jnp.ones(48),
    }
    report = jc.save(tmp_path / "plain.jxc", tree, entropy=False)
    assert report.file_bytes == jc.nbytes(tree) + report.header_bytes
    assert report.file_bytes == os.path.getsize(tmp_path / "plain.jxc")
    # With masks, relative indices can only shrink the file below nbytes.
    sparse = {"s": jc.prune(0.9)({"w": w})[0]["w"]}
    report = jc.save(tmp_path / "sparse.jxc", sparse, entropy=False)
    assert report.file_bytes - report.header_bytes == sum(x.stored_bytes for x in report.leaves)
    assert report.file_bytes - report.header_bytes < jc.nbytes(sparse)


def test_masks_choose_the_smaller_of_bitmap_and_relative_indices(tmp_path):
    w = _normal(0, (64, 64))
    dense_mask = {"s": jc.prune(0.2)({"w": w})[0]["w"]}
    sparse_mask = {"s": jc.prune(0.95)({"w": w})[0]["w"]}
    dense_report = jc.save(tmp_path / "d.jxc", dense_mask, entropy=False)
    sparse_report = jc.save(tmp_path / "s.jxc", sparse_mask, entropy=False)
    assert dense_report.leaves[0].encoding.startswith("mask=bitmap/packed")
    assert sparse_report.leaves[0].encoding.startswith("mask=gaps")
    mask_bitmap_bytes = 64 * 8
    kept_bytes = sparse_mask["s"].nnz * 4
    assert sparse_report.leaves[0].stored_bytes - kept_bytes < mask_bitmap_bytes / 2


def test_entropy_coded_streams_are_within_two_percent_of_entropy(tmp_path):
    params = {f"layer{i}": _normal(i, (256, 300)) for i in range(3)}
    compressed, _ = jc.chain(jc.prune(0.9, scope="global"), jc.cluster(bits=5))(params)
    report = jc.save(tmp_path / "dc.jxc", compressed)
    assert report.stream_bytes <= 1.02 * report.stream_entropy_bytes
    assert report.file_bytes <= 1.02 * report.entropy_bound_bytes + report.header_bytes
    plain = jc.save(tmp_path / "plain.jxc", compressed, entropy=False)
    assert report.file_bytes < plain.file_bytes
    assert_same_tree(compressed, jc.load(tmp_path / "dc.jxc"))


@pytest.mark.slow
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 70),
    sparsity=st.sampled_from([0.0, 0.3, 0.9, 0.99]),
    bits=st.integers(2, 8),
    kind=st.sampled_from(["prune", "cluster", "quantize", "prune+cluster", "prune+quantize"]),
    entropy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path, rows, cols, sparsity, bits, kind, entropy, seed):
    w = _normal(seed, (rows, cols))
    tree = {"w": w, "b": w[0]}
    if kind.startswith("prune"):
        tree, _ = jc.prune(sparsity, where="w")(tree)
    values = tree["w"].nnz if kind.startswith("prune") else rows * cols
    if kind.endswith("cluster") and values >= 2:
        tree, _ = jc.cluster(k=min(2**bits, values), where="w")(tree)
    if kind.endswith("quantize") and values >= 1:
        tree, _ = jc.quantize(bits, where="w")(tree)
    path = tmp_path / "p.jxc"
    jc.save(path, tree, entropy=entropy)
    assert_same_tree(tree, jc.load(path))


@pytest.mark.slow
def test_linen_model_round_trip_under_jit(tmp_path):
    model = LeNet300100()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    compressed, _ = jc.chain(jc.prune(0.8, scope="global"), jc.cluster(bits=4))(params)
    jc.save(tmp_path / "lenet.jxc", compressed)
    restored = jc.load(tmp_path / "lenet.jxc")
    x = _normal(9, (5, 64))
    forward = jax.jit(lambda p, x: model.apply({"params": jc.materialize(p)}, x))
    np.testing.assert_array_equal(forward(compressed, x), forward(restored, x))


@pytest.mark.bitwise
def test_nnx_state_round_trip_keeps_variables(tmp_path):
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    compressed, _ = jc.quantize(8)(state)
    jc.save(tmp_path / "nnx.jxc", compressed)
    restored = jc.load(tmp_path / "nnx.jxc")
    assert isinstance(restored, nnx.State)
    assert isinstance(restored["dense1"]["kernel"], nnx.Param)
    assert_same_tree(compressed, restored)
    x = _normal(9, (5, 64))
    nnx.update(model, jc.materialize(restored))
    expected_model = LeNet300100NNX(rngs=nnx.Rngs(0))
    nnx.update(expected_model, jc.materialize(compressed))
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(model, x), expected_model(x))


def _saved(tmp_path):
    w = _normal(0, (32, 40))
    tree = {"c": jc.chain(jc.prune(0.8), jc.cluster(bits=4))({"w": w})[0]["w"], "b": w[0]}
    path = tmp_path / "good.jxc"
    jc.save(path, tree)
    return path, path.read_bytes(), tree


def _write(tmp_path, data, name="bad.jxc"):
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def _with_header(data, edit):
    """A copy of a file with its header edited and re-checksummed (a crafted file)."""
    length, _ = struct.unpack("<QI", data[-20:-8])
    start = len(data) - 20 - length
    header = json.loads(zlib.decompress(data[start:-20]))
    edit(header)
    text = zlib.compress(json.dumps(header).encode())
    return data[:start] + text + struct.pack("<QI", len(text), zlib.crc32(text)) + data[-8:]


def test_damaged_files_raise_clear_errors(tmp_path):
    path, data, _ = _saved(tmp_path)
    body_start, header_start = 16, len(data) - 20 - struct.unpack("<Q", data[-20:-12])[0]
    cases = {
        "truncated": (data[: len(data) // 2], "trailer"),
        "empty": (b"", "magic"),
        "wrong magic": (b"PK\x03\x04" + data[4:], "not a jaxcompress file"),
        "version": (data[:8] + struct.pack("<I", 99) + data[12:], "version 99"),
        "body byte": (
            data[: body_start + 5] + bytes([data[body_start + 5] ^ 1]) + data[body_start + 6 :],
            "checksum",
        ),
        "header byte": (
            data[: header_start + 3] + b"X" + data[header_start + 4 :],
            "header checksum",
        ),
        "outside": (
            _with_header(data, lambda h: h["buffers"][0].update(offset=10**9)),
            "points outside",
        ),
        "huge header length": (data[:-20] + struct.pack("<QI", 10**12, 0) + data[-8:], "outside"),
        "bad nnz": (
            _with_header(data, lambda h: h["tree"]["items"][0][1].update(nnz=3)),
            "mask keeps",
        ),
        "bad dtype": (
            _with_header(data, lambda h: h["tree"]["items"][1][1].update(dtype="object")),
            "dtype",
        ),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(jc.FileFormatError, match=message):
            jc.load(_write(tmp_path, bad, f"{name}.jxc"))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_bytes_never_give_a_wrong_tree(tmp_path, data):
    path, good, tree = _saved(tmp_path)
    mutated = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(good) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    try:
        restored = jc.load(_write(tmp_path, mutated))
    except jc.FileFormatError:
        return
    assert_same_tree(tree, restored)  # only a no-op mutation may load


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_headers_raise_only_file_format_errors(tmp_path, data):
    path, good, _ = _saved(tmp_path)

    def edit(header):
        # Replace one random field somewhere in the header with random JSON.
        node = header
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                return
            key = data.draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
                node = child
                continue
            node[key] = data.draw(_JSON)
            return

    # Anything but a FileFormatError (or a valid load) fails the test.
    with contextlib.suppress(jc.FileFormatError):
        jc.load(_write(tmp_path, _with_header(good, edit)))


def test_interrupted_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path, data, _ = _saved(tmp_path)
    w = _normal(1, (8, 8))
    with pytest.raises(TypeError, match="cannot save a object"):
        jc.save(path, {"a": w, "z": object()})
    assert path.read_bytes() == data

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        jc.save(path, {"a": w})
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jxc"]


def test_load_places_each_child_on_the_mesh(tmp_path, mesh8):
    w = _normal(0, (64, 32))
    tree = {
        "q": jc.quantize(4)({"w": w})[0]["w"],
        "s": jc.chain(jc.prune(0.5), jc.cluster(bits=3))({"w": w})[0]["w"],
        "b": w[0],
    }
    jc.save(tmp_path / "m.jxc", tree)
    weight = NamedSharding(mesh8, P("data", "model"))
    shardings = {"q": weight, "s": weight, "b": NamedSharding(mesh8, P("data"))}
    restored = jc.load(tmp_path / "m.jxc", sharding=shardings)
    assert_same_tree(tree, restored)
    codes = restored["q"].codes  # (64, 16) uint8: both axes divide
    assert codes.sharding.spec == P("data", "model")
    assert {s.data.shape for s in codes.addressable_shards} == {(16, 8)}
    assert restored["b"].sharding.spec == P("data")
    assert restored["s"].mask.sharding.spec == P("data", "model")  # 4 packed bytes per row
    for name in tree:
        np.testing.assert_array_equal(
            np.asarray(jc.materialize(restored)[name]), np.asarray(jc.materialize(tree)[name])
        )
    by_function = jc.load(
        tmp_path / "m.jxc", sharding=lambda path, shape: weight if len(shape) == 2 else None
    )
    assert by_function["q"].codes.sharding.spec == P("data", "model")


def test_unsupported_trees_name_the_path(tmp_path):
    with pytest.raises(TypeError, match="a/b: cannot save a object"):
        jc.save(tmp_path / "x.jxc", {"a": {"b": object()}})
    with pytest.raises(TypeError, match="keys must be str or int"):
        jc.save(tmp_path / "x.jxc", {("tuple", "key"): jnp.ones(2)})
    assert not (tmp_path / "x.jxc").exists()


def test_inspect_reports_every_leaf_and_the_bound(tmp_path):
    path, data, tree = _saved(tmp_path)
    report = jc.inspect_file(path)
    assert [leaf.path for leaf in report.leaves] == ["c", "b"]
    assert report.leaves[0].kind == "sparse+clustered"
    assert report.file_bytes == len(data)
    text = str(report)
    assert "entropy bound" in text and "sparse+clustered" in text
    assert json.loads(json.dumps(report.to_dict()))["file_bytes"] == len(data)
    with pytest.raises(jc.FileFormatError, match="not a jaxcompress file"):
        jc.inspect_file(_write(tmp_path, b"hello world, this is not a checkpoint file"))
    assert container.FIXED_BYTES == 36


def test_a_header_that_inflates_too_far_is_refused(tmp_path, monkeypatch):
    path, data, _ = _saved(tmp_path)
    monkeypatch.setattr(container, "MAX_HEADER_BYTES", 64)
    with pytest.raises(jc.FileFormatError, match="inflates past 64 bytes"):
        jc.load(path)


def test_zero_dim_leaves_keep_their_shape(tmp_path):
    # np.ascontiguousarray returns at least 1-d: a step counter came back as (1,).
    tree = {"step": jnp.array(7, jnp.int32), "scale": np.float32(0.5), "w": jnp.ones(())}
    jc.save(tmp_path / "s.jxc", tree)
    restored = jc.load(tmp_path / "s.jxc")
    for name in tree:
        assert restored[name].shape == ()
        assert restored[name].dtype == np.asarray(tree[name]).dtype
    assert int(restored["step"]) == 7 and float(restored["scale"]) == 0.5
    assert jc.inspect_file(tmp_path / "s.jxc").leaves[0].shape == ()


def test_save_refuses_to_replace_what_is_not_a_regular_file(tmp_path):
    tree = {"w": jnp.ones(3)}
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    # Through a link, so the old code (which renamed over anything) can't hurt /dev/null.
    os.symlink("/dev/null", tmp_path / "null.jxc")
    cases = {"pipe": "a FIFO", "folder": "a directory", "null.jxc": "a character device"}
    for name, kind in cases.items():
        with pytest.raises(FileExistsError, match=f"is {kind}; save replaces only regular files"):
            jc.save(tmp_path / name, tree)
    assert os.path.islink(tmp_path / "null.jxc") and not (tmp_path / "folder").is_symlink()
    assert os.path.stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["folder", "null.jxc", "pipe"]  # no temp file left


def test_save_writes_through_a_symlink_and_keeps_permissions(tmp_path):
    old, new = {"w": jnp.zeros(3)}, {"w": jnp.arange(3.0)}
    jc.save(tmp_path / "real.jxc", old)
    os.chmod(tmp_path / "real.jxc", 0o640)
    os.symlink("real.jxc", tmp_path / "link.jxc")
    jc.save(tmp_path / "link.jxc", new)
    assert os.readlink(tmp_path / "link.jxc") == "real.jxc"  # still a link, to the new tree
    np.testing.assert_array_equal(jc.load(tmp_path / "real.jxc")["w"], new["w"])
    assert os.stat(tmp_path / "real.jxc").st_mode & 0o777 == 0o640
    previous = os.umask(0o027)
    try:
        jc.save(tmp_path / "fresh.jxc", new)
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "fresh.jxc").st_mode & 0o777 == 0o640  # 0o666 less the umask


_SAVE_THAT_HANGS = """
import pathlib, sys, time
import jax.numpy as jnp
import jaxcompress as jc
from jaxcompress.io import container

def hang(self, header):
    pathlib.Path(sys.argv[2]).touch()  # the temporary file is written; now wait
    time.sleep(120)

container.ContainerWriter.commit = hang
jc.save(sys.argv[1], {"w": jnp.arange(4.0)})
"""


def _hung_save(tmp_path, path):
    import subprocess
    import sys
    import time

    marker = tmp_path / "started"
    process = subprocess.Popen([sys.executable, "-c", _SAVE_THAT_HANGS, str(path), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the save never started"
    marker.unlink()
    return process


def _partials(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def test_sigterm_during_save_removes_the_temporary_file(tmp_path):
    import signal

    path, data, _ = _saved(tmp_path)
    process = _hung_save(tmp_path, path)
    assert len(_partials(tmp_path)) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # still ends as SIGTERM does
    assert path.read_bytes() == data
    assert _partials(tmp_path) == []


def test_a_later_save_sweeps_only_stale_temporary_files(tmp_path):
    import signal

    from jaxcompress.io import atomic

    path, _, _ = _saved(tmp_path)
    process = _hung_save(tmp_path, path)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    [stale] = _partials(tmp_path)
    others = [".good.jxc.notes.partial", ".other.jxc.1-0123abcd.partial", "good.jxc.partial"]
    for name in others:
        (tmp_path / name).write_text("not a stale temporary file of good.jxc")
    handle, live = atomic.create_partial(path, None)  # a save of this process, still running
    try:
        jc.save(path, {"w": jnp.ones(2)})
        assert _partials(tmp_path) == sorted([*others, live.name])
        assert stale not in _partials(tmp_path)
    finally:
        os.close(handle)
        live.unlink()
    np.testing.assert_array_equal(jc.load(path)["w"], jnp.ones(2))


def test_metadata_reads_back_and_bad_values_are_refused_by_key(tmp_path):
    path = tmp_path / "m.jxc"
    tree = {"w": jnp.ones(3)}
    given = {"step": np.int64(12), "lr": np.float32(0.25), "dims": (2, 3), "tag": None}
    jc.save(path, tree, metadata=given)
    restored, metadata = jc.load(path, metadata=True)
    expected = {"step": 12, "lr": 0.25, "dims": [2, 3], "tag": None}
    assert metadata == expected and type(metadata["step"]) is int
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert jc.inspect_file(path).metadata == expected
    assert jc.inspect_file(path).to_dict()["metadata"] == expected
    assert isinstance(jc.load(path), dict)  # the old call still returns the tree alone
    data = path.read_bytes()
    bad = {
        r"metadata\['loss'\]\['best'\] is nan": {"loss": {"best": float("nan")}},
        r"metadata\['runs'\]\[1\] is inf": {"runs": [1.0, np.float64("inf")]},
        r"metadata\['w'\] is a ndarray": {"w": np.zeros(2)},
        r"metadata\['f'\] is a object": {"f": object()},
        "metadata: key 1 is not a str": {1: "one"},
        "metadata must be a dict": ["not", "a", "dict"],
    }
    for message, value in bad.items():
        with pytest.raises(ValueError, match=message):
            jc.save(path, tree, metadata=value)
    assert path.read_bytes() == data and sorted(os.listdir(tmp_path)) == ["m.jxc"]
