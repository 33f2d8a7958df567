"""Interop with other formats: safetensors and flax msgpack files, and orbax checkpoints."""

import contextlib
import functools
import json
import os
import struct
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX
from jaxcompress.io import interop
from jaxcompress.io.errors import FileFormatError
from jaxcompress.io.interop import (
    export_dense,
    read_msgpack,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors,
)


def _mixed_tree():
    rng = np.random.default_rng(0)
    return {
        "encoder": {
            "layer": {
                "0": {
                    "kernel": rng.standard_normal((4, 3)).astype(np.float32),
                    "half": rng.standard_normal((2, 5)).astype(np.float16),
                    "brain": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
                },
                "1": {"codes": rng.integers(-128, 128, (3, 3), dtype=np.int8)},
            },
            "step": np.array(7, np.int32),
        },
        "mask": rng.random((2, 3)) > 0.5,
        "ids": rng.integers(-(2**31), 2**31, 5, dtype=np.int32),
        "empty": np.zeros((0, 4), np.float32),
    }


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _assert_same_tree(got, want):
    got, want = jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
        assert g.tobytes() == w.tobytes()  # bit-identical


def _raw_file(path, header, data=b"", *, length=None):
    encoded = json.dumps(header).encode()
    size = len(encoded) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + encoded + data)
    return path


# --------------------------------------------------------------------------- round trips


def test_safetensors_round_trip_keeps_dtypes_shapes_and_nesting(tmp_path):
    tree = _mixed_tree()
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, tree, metadata={"format": "np", "note": "ünïcode"})
    _assert_same_tree(read_safetensors(path), tree)
    _assert_same_tree(read_safetensors(path, nested=False), _flatten(tree))
    assert read_safetensors_metadata(path) == {"format": "np", "note": "ünïcode"}
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert length % 8 == 0
    names = [name for name in header if name != "__metadata__"]
    assert names == sorted(names)
    offsets = [header[name]["data_offsets"] for name in names]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(raw) - 8 - length
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))


def test_written_arrays_are_independent_copies(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": np.arange(4.0)})
    first = read_safetensors(path)["w"]
    first[0] = 99.0
    assert read_safetensors(path)["w"][0] == 0.0
    os.remove(path)  # the file is closed and no longer needed by the arrays
    assert first.tolist() == [99.0, 1.0, 2.0, 3.0]


def test_jax_arrays_scalars_and_sequences_are_written(tmp_path):
    path = tmp_path / "j.safetensors"
    tree = {"layers": [jnp.ones((2, 2), jnp.bfloat16), jnp.arange(3)], "lr": 0.5, "on": True}
    write_safetensors(path, tree)
    got = read_safetensors(path)
    assert got["layers"]["0"].dtype == jnp.bfloat16 and got["layers"]["1"].tolist() == [0, 1, 2]
    assert got["lr"].dtype == np.float64 and got["lr"].shape == ()
    assert got["on"].dtype == np.bool_ and bool(got["on"])


def test_cross_check_with_the_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    flat = _flatten(_mixed_tree())
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, flat, metadata={"who": "jaxcompress"})
    _assert_same_tree(st_numpy.load_file(ours), flat)
    st_numpy.save_file(flat, theirs, metadata={"who": "safetensors"})
    _assert_same_tree(read_safetensors(theirs, nested=False), flat)
    _assert_same_tree(read_safetensors(theirs), _mixed_tree())
    assert read_safetensors_metadata(theirs) == {"who": "safetensors"}


def test_write_refuses_unsupported_leaves_and_name_clashes(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match="'c'.*complex64"):
        write_safetensors(path, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="'s'"):
        write_safetensors(path, {"s": "text"})
    with pytest.raises(ValueError, match="'a.b'"):
        write_safetensors(path, {"a.b": np.zeros(1), "a": {"b": np.ones(1)}})
    with pytest.raises(ValueError, match="__metadata__"):
        write_safetensors(path, {"__metadata__": np.zeros(1)})
    with pytest.raises(TypeError, match="metadata"):
        write_safetensors(path, {"w": np.zeros(1)}, metadata={"n": 1})
    assert not os.listdir(tmp_path)


def test_nested_read_refuses_a_name_that_is_also_a_prefix(tmp_path):
    path = tmp_path / "clash.safetensors"
    write_safetensors(path, {"a": np.zeros(1), "a.b": np.ones(1)})
    assert set(read_safetensors(path, nested=False)) == {"a", "a.b"}
    with pytest.raises(FileFormatError, match="'a'.*both a tensor and a prefix"):
        read_safetensors(path)


# --------------------------------------------------------------------------- models


def _lenet_params():
    model = LeNet300100()
    return model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]


@pytest.fixture(scope="module")
def lenet():
    """Linen LeNet params, compressed two ways, each with its dense reference."""
    params = _lenet_params()
    compressed = {"prune": jc.prune(0.5)(params)[0], "cluster": jc.cluster(bits=4)(params)[0]}
    dense = {name: jc.materialize(tree) for name, tree in compressed.items()}
    return params, compressed, dense


_READERS = {".safetensors": read_safetensors, ".msgpack": read_msgpack}


@pytest.mark.parametrize("suffix", [".safetensors", ".msgpack"])
@pytest.mark.parametrize("method", ["prune", "cluster"])
def test_export_dense_linen_lenet(tmp_path, lenet, suffix, method):
    _, compressed, dense = lenet
    assert jc.is_compressed(compressed[method]["dense1"]["kernel"])
    path = tmp_path / f"lenet{suffix}"
    export_dense(path, compressed[method])
    _assert_same_tree(_READERS[suffix](path), dense[method])


@pytest.mark.parametrize("suffix", [".safetensors", ".msgpack"])
def test_export_dense_nnx_state(tmp_path, suffix):
    state = nnx.state(LeNet300100NNX(rngs=nnx.Rngs(0)), nnx.Param)
    for transform in (jc.prune(0.5), jc.cluster(bits=4)):
        compressed = transform(state)[0]
        path = tmp_path / f"nnx{suffix}"
        export_dense(path, compressed)
        got = _READERS[suffix](path)
        want = nnx.to_pure_dict(jc.materialize(compressed))
        _assert_same_tree(got, want)
        # The dense file loads straight back into a fresh model.
        model = LeNet300100NNX(rngs=nnx.Rngs(1))
        restored = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(restored, got)
        nnx.update(model, restored)
        _assert_same_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)), want)
    # A State inside a dict and a bare Variable are unwrapped too.
    mixed = {"model": compressed, "scale": nnx.Param(jnp.ones(2))}
    export_dense(path, mixed)
    _assert_same_tree(_READERS[suffix](path), {"model": want, "scale": np.ones(2, np.float32)})


def test_export_dense_format_argument(tmp_path):
    params = {"w": jnp.ones((2, 2))}
    export_dense(tmp_path / "weights.bin", params, format="msgpack")
    _assert_same_tree(read_msgpack(tmp_path / "weights.bin"), params)
    export_dense(tmp_path / "weights.dat", params, format="safetensors")
    _assert_same_tree(read_safetensors(tmp_path / "weights.dat"), params)
    with pytest.raises(ValueError, match="msgpack.*safetensors"):
        export_dense(tmp_path / "weights.pt", params)
    with pytest.raises(ValueError, match="msgpack.*safetensors"):
        export_dense(tmp_path / "weights.msgpack", params, format="torch")


# --------------------------------------------------------------------------- msgpack


def test_read_msgpack_of_flax_to_bytes(tmp_path, lenet):
    params = lenet[0]
    path = tmp_path / "params.msgpack"
    path.write_bytes(serialization.to_bytes(params))
    got = read_msgpack(path)
    _assert_same_tree(got, params)
    assert isinstance(got["dense1"]["kernel"], np.ndarray)
    got["dense1"]["kernel"][0, 0] = 1.0  # writable, not a view of the file bytes


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01garbage bytes", b"\x05", b"\xc1", b"\x82\xa1a", b"PK\x03\x04"],
)
def test_read_msgpack_refuses_garbage(tmp_path, data):
    path = tmp_path / "garbage.msgpack"
    path.write_bytes(data)
    with pytest.raises(FileFormatError, match="garbage.msgpack.*not a flax msgpack checkpoint"):
        read_msgpack(path)


# --------------------------------------------------------------------------- corrupt files


@pytest.fixture
def valid_file(tmp_path):
    path = tmp_path / "valid.safetensors"
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int8)}
    write_safetensors(path, tree, metadata={"k": "v"})
    return path


def test_truncated_file(valid_file):
    data = valid_file.read_bytes()
    for size in (0, 5, 8, 20, len(data) - 1):
        valid_file.write_bytes(data[:size])
        with pytest.raises(FileFormatError, match="valid.safetensors"):
            read_safetensors(valid_file)


def test_header_length_too_big(valid_file):
    data = valid_file.read_bytes()
    valid_file.write_bytes(struct.pack("<Q", 2**63) + data[8:])
    with pytest.raises(FileFormatError, match="header length .* runs past the end"):
        read_safetensors(valid_file)


def test_bad_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    with pytest.raises(FileFormatError, match="bad.safetensors.*not valid UTF-8 JSON"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(FileFormatError, match="not valid UTF-8 JSON"):
        read_safetensors(path)
    _raw_file(path, [1, 2])
    with pytest.raises(FileFormatError, match="not an object"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FileFormatError, match="not valid UTF-8 JSON"):
        read_safetensors(path)


def test_offsets_out_of_range_overlapping_or_mis_sized(tmp_path):
    path = tmp_path / "off.safetensors"

    def entry(begin, end, dtype="F32", shape=(2,)):
        return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}

    _raw_file(path, {"w": entry(0, 8)}, b"\x00" * 4)
    with pytest.raises(FileFormatError, match="off.safetensors: tensor 'w'.*outside"):
        read_safetensors(path)
    _raw_file(path, {"w": entry(8, 0, shape=())}, b"\x00" * 8)
    with pytest.raises(FileFormatError, match="tensor 'w'.*outside"):
        read_safetensors(path)
    _raw_file(path, {"w": entry(0, 4)}, b"\x00" * 8)
    with pytest.raises(FileFormatError, match="tensor 'w'.*span 4 bytes but F32\\[2\\] needs 8"):
        read_safetensors(path)
    _raw_file(path, {"v": entry(0, 8), "w": entry(4, 12)}, b"\x00" * 12)
    with pytest.raises(FileFormatError, match="tensor 'w'.*overlap tensor 'v'"):
        read_safetensors(path)
    _raw_file(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, -8]}}, b"\x00" * 8)
    with pytest.raises(FileFormatError, match="tensor 'w'.*data_offsets"):
        read_safetensors(path)
    _raw_file(path, {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\x00" * 8)
    with pytest.raises(FileFormatError, match="tensor 'w'.*shape"):
        read_safetensors(path)
    _raw_file(path, {"w": {"dtype": "F32", "shape": [2]}}, b"\x00" * 8)
    with pytest.raises(FileFormatError, match="tensor 'w'.*lacks.*data_offsets"):
        read_safetensors(path)
    _raw_file(path, {"__metadata__": {"k": 1}})
    with pytest.raises(FileFormatError, match="__metadata__"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 46) + b'{"w": {}, "w": {}}' + b" " * 28)
    with pytest.raises(FileFormatError, match="key 'w' appears twice"):
        read_safetensors(path)
    # Zero-size tensors take no bytes and overlap nothing; gaps are tolerated.
    _raw_file(path, {"e": entry(4, 4, shape=(0, 2)), "w": entry(4, 12)}, b"\x00" * 12)
    got = read_safetensors(path)
    assert got["e"].shape == (0, 2) and got["w"].tolist() == [0.0, 0.0]


def test_unknown_dtype(tmp_path):
    path = _raw_file(
        tmp_path / "dt.safetensors",
        {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
        b"\x00" * 8,
    )
    with pytest.raises(FileFormatError, match="dt.safetensors: tensor 'w'.*unknown dtype 'C64'"):
        read_safetensors(path)


_FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@functools.cache
def _valid_bytes():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.safetensors")
        tree = {
            "a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b.c": np.array([True, False]),
            "d": np.arange(3, dtype=ml_dtypes.bfloat16),
        }
        write_safetensors(path, tree, metadata={"k": "v"})
        with open(path, "rb") as handle:
            return handle.read()


@_FUZZ
@given(data=st.data())
def test_mutated_files_read_or_raise_file_format_error(tmp_path, data):
    raw = bytearray(_valid_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    # Bias mutations toward the length field and the header, where they matter most.
    position = st.one_of(st.integers(0, 8 + length - 1), st.integers(0, len(raw) - 1))
    for index, value in data.draw(st.lists(st.tuples(position, st.integers(0, 255)), max_size=4)):
        raw[index] = value
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw if cut is None else raw[:cut]))
    with contextlib.suppress(FileFormatError):
        read_safetensors(path, nested=False)
    with contextlib.suppress(FileFormatError):
        read_safetensors(path)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


@_FUZZ
@given(data=st.data())
def test_fuzzed_header_fields_read_or_raise_file_format_error(tmp_path, data):
    raw = _valid_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = data.draw(st.sampled_from(sorted(header)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]))
    small = st.integers(-2, 40)
    value = data.draw(
        st.one_of(
            _JSON_VALUES,
            st.sampled_from(list(interop._DISK_DTYPES) + ["F4", "c64", ""]),
            st.lists(small, max_size=3),
        )
    )
    if field is None or not isinstance(header[name], dict):
        header[name] = value
    else:
        header[name][field] = value
    path = _raw_file(tmp_path / "fuzz.safetensors", header, raw[8 + length :])
    with contextlib.suppress(FileFormatError):
        read_safetensors(path)


# --------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("writer", ["safetensors", "export_safetensors", "export_msgpack"])
def test_failed_write_leaves_existing_file_and_no_temp(tmp_path, writer):
    suffix = ".msgpack" if writer == "export_msgpack" else ".safetensors"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"precious old contents")
    # "z" sorts last: "a" is written first, then converting "z" fails part way.
    tree = {"a": np.ones((64, 64), np.float32), "z": jax.ShapeDtypeStruct((2,), jnp.float32)}
    save = {
        "safetensors": write_safetensors,
        "export_safetensors": export_dense,
        "export_msgpack": export_dense,
    }[writer]
    with pytest.raises(TypeError, match="'z'"):
        save(path, tree)
    assert path.read_bytes() == b"precious old contents"
    assert os.listdir(tmp_path) == [path.name]


def test_interrupted_write_leaves_existing_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": np.zeros(3)})
    before = path.read_bytes()
    calls = []

    def failing_dense(self):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # even a BaseException cleans up
        return np.asarray(jc.materialize(self.leaf))

    monkeypatch.setattr(interop._Entry, "dense", failing_dense)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(path, {"a": np.ones(4), "b": np.ones(4), "c": np.ones(4)})
    assert calls == ["a", "b"]
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_write_replaces_an_existing_file(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"old": np.zeros(2)})
    write_safetensors(path, {"new": np.ones(2)})
    assert list(read_safetensors(path)) == ["new"]
    assert os.listdir(tmp_path) == [path.name]


# --------------------------------------------------------------------------- orbax


def test_orbax_round_trip_of_compressed_leaves(tmp_path, lenet):
    import orbax.checkpoint as ocp

    params, compressed, _ = lenet
    small = params["dense3"]["kernel"]  # (100, 10): cheap to compress again
    tree = {
        "sparse": compressed["prune"]["dense1"]["kernel"],
        "clustered": compressed["cluster"]["dense2"]["kernel"],
        "quantized": jc.quantize(8)({"w": small})[0]["w"],
        "nested": jc.chain(jc.prune(0.9), jc.cluster(bits=4))({"w": small})[0]["w"],
        "bias": params["dense1"]["bias"],
    }
    assert isinstance(tree["nested"], jc.Sparse) and isinstance(tree["nested"].values, jc.Clustered)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    checkpointer.close()

    # Same leaf types and static metadata (shape, dtype, bits, axis, ...) ...
    is_leaf = jc.is_compressed
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for got, want in zip(
        jax.tree.leaves(restored, is_leaf=is_leaf),
        jax.tree.leaves(tree, is_leaf=is_leaf),
        strict=True,
    ):
        assert type(got) is type(want)
    assert type(restored["nested"].values) is jc.Clustered
    # ... bit-identical children ...
    _assert_same_tree(restored, tree)
    # ... and the same dense weights.
    _assert_same_tree(jc.materialize(restored), jc.materialize(tree))
