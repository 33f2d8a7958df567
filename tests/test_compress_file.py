"""compress_file: streaming compression from checkpoint files equals the in-memory path."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.arrays import as_dense
from jaxcompress.io import compress_file as compress_module
from jaxcompress.io.checkpoints import read_checkpoint
from jaxcompress.io.interop import write_safetensors
from jaxcompress.io.resumable import partial_paths

TRANSFORMS = {
    "int4": lambda: jc.quantize(4, group_size=32),
    "global+kmeans": lambda: jc.chain(jc.prune(0.5, scope="global"), jc.cluster(bits=4)),
}


def _tree():
    rng = np.random.default_rng(0)
    return {
        "layer1": {
            "kernel": rng.normal(size=(64, 96)).astype(ml_dtypes.bfloat16),
            "bias": np.zeros(96, ml_dtypes.bfloat16),
        },
        "layer0": {"kernel": rng.normal(size=(32, 64)).astype(np.float32)},
    }


def _reference(tmp_path, src, tx):
    ref = tmp_path / "reference.jxc"
    jc.save(ref, tx(read_checkpoint(src))[0])
    return ref


def _sharded(tmp_path):
    flat = {
        "layer1.kernel": _tree()["layer1"]["kernel"],
        "layer0.kernel": _tree()["layer0"]["kernel"],
    }
    write_safetensors(tmp_path / "s1.safetensors", {"layer1": {"kernel": flat["layer1.kernel"]}})
    write_safetensors(tmp_path / "s2.safetensors", {"layer0": {"kernel": flat["layer0.kernel"]}})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {"weight_map": {"layer1.kernel": "s1.safetensors", "layer0.kernel": "s2.safetensors"}}
        )
    )
    return index


def _source(tmp_path, kind):
    if kind == "safetensors":
        path = tmp_path / "m.safetensors"
        jc.export_dense(path, _tree())
    elif kind == "index":
        path = _sharded(tmp_path)
    elif kind == "msgpack":
        path = tmp_path / "m.msgpack"
        jc.export_dense(path, _tree())
    elif kind == "jxc":
        path = tmp_path / "m.jxc"
        jc.save(path, _tree())
    else:
        import orbax.checkpoint as ocp

        path = tmp_path / "orbax"
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, _tree())
        checkpointer.wait_until_finished()
    return path


@pytest.mark.parametrize("kind", ["safetensors", "index", "msgpack", "jxc", "orbax"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_equals_in_memory_bit_for_bit(tmp_path, kind, name):
    src = _source(tmp_path, kind)
    tx = TRANSFORMS[name]()
    dst = tmp_path / "out.jxc"
    report = jc.compress_file(src, dst, tx, progress=False)
    assert report.file_bytes == dst.stat().st_size
    assert filecmp.cmp(dst, _reference(tmp_path, src, tx), shallow=False)
    assert not any(p.exists() for p in partial_paths(dst))


def test_interrupt_then_resume_gives_the_same_file(tmp_path, monkeypatch):
    src = _source(tmp_path, "safetensors")
    tx = TRANSFORMS["global+kmeans"]()
    dst = tmp_path / "out.jxc"
    real = compress_module.ResumableWriter.finish_leaf
    finished = []

    def interrupted(self, *args, **kwargs):
        if len(finished) == 1:  # the second leaf's buffers are written, not yet journaled
            raise KeyboardInterrupt
        finished.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(compress_module.ResumableWriter, "finish_leaf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jc.compress_file(src, dst, tx, progress=False)
    assert not dst.exists()  # never a half-written file under the final name
    partial, journal = partial_paths(dst)
    assert partial.exists() and len(journal.read_text().splitlines()) == 2  # job + one leaf
    monkeypatch.undo()
    loads = []
    original_open = compress_module.open_source

    def counting(path):
        source = original_open(path)
        manager = source.__enter__()
        inner = manager.load

        def load(marker, keep=False):
            if not keep:
                loads.append(marker)
            return inner(marker, keep=keep)

        manager.load = load
        return _Wrapped(source, manager)

    monkeypatch.setattr(compress_module, "open_source", counting)
    jc.compress_file(src, dst, tx, progress=False)
    assert len(loads) == 2  # the finished leaf was not redone
    assert filecmp.cmp(dst, _reference(tmp_path, src, tx), shallow=False)
    assert not partial.exists() and not journal.exists()


class _Wrapped:
    def __init__(self, manager, value):
        self.manager, self.value = manager, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.manager.__exit__(*exc)


def test_damaged_partial_leaf_is_redone(tmp_path, monkeypatch):
    src = _source(tmp_path, "safetensors")
    tx = TRANSFORMS["int4"]()
    dst = tmp_path / "out.jxc"
    real = compress_module.ResumableWriter.finish_leaf
    count = []

    def stop_after_two(self, *args, **kwargs):
        real(self, *args, **kwargs)
        count.append(1)
        if len(count) == 2:
            raise RuntimeError("killed")

    monkeypatch.setattr(compress_module.ResumableWriter, "finish_leaf", stop_after_two)
    with pytest.raises(RuntimeError):
        jc.compress_file(src, dst, tx, progress=False)
    monkeypatch.undo()
    partial, _ = partial_paths(dst)
    data = bytearray(partial.read_bytes())
    data[-1] ^= 0xFF  # the second leaf's last byte: its CRC no longer matches
    partial.write_bytes(bytes(data))
    jc.compress_file(src, dst, tx, progress=False)
    assert filecmp.cmp(dst, _reference(tmp_path, src, tx), shallow=False)


def test_cli_compress_uses_compress_file(tmp_path, monkeypatch):
    from jaxcompress.cli import files
    from jaxcompress.cli.main import main

    src = _source(tmp_path, "safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[transform]]\nkind = "quantize"\nbits = 4\ngroup_size = 32\n')
    used = []
    monkeypatch.setattr(
        files, "compress_file", lambda *a, **k: used.append(a) or jc.compress_file(*a, **k)
    )
    assert (
        main(
            ["compress", str(src), "--recipe", str(recipe), "-o", str(tmp_path / "o.jxc"), "--json"]
        )
        == 0
    )
    assert used and filecmp.cmp(
        tmp_path / "o.jxc", _reference(tmp_path, src, jc.quantize(4, group_size=32)), shallow=False
    )


_RECIPES = {
    "prune": '[[transform]]\nkind = "prune"\nsparsity = 0.5\nscope = "global"\n',
    "int4": '[[transform]]\nkind = "quantize"\nbits = 4\ngroup_size = 32\n',
}


@pytest.mark.parametrize("name", sorted(_RECIPES))
def test_cli_summary_read_leaf_by_leaf_equals_summarize(tmp_path, capsys, name):
    from jaxcompress.cli.main import main

    src = _source(tmp_path, "index")
    recipe = tmp_path / "r.toml"
    recipe.write_text(_RECIPES[name])
    out = tmp_path / "o.jxc"
    assert main(["compress", str(src), "--recipe", str(recipe), "-o", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["report"]["leaves"]
    expected = jc.summarize(read_checkpoint(src), jc.load(out)).to_dict()["leaves"]
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    for row, want in zip(rows, expected, strict=True):
        for key in ("shape", "kind", "original_bytes", "compressed_bytes", "density"):
            assert row[key] == want[key], (row["path"], key)
        assert row["relative_error"] == pytest.approx(want["relative_error"], rel=1e-4)


def test_on_leaf_sees_each_leaf_compressed_in_this_call(tmp_path, monkeypatch):
    src = _source(tmp_path, "safetensors")
    tx = TRANSFORMS["int4"]()
    expected = tx(read_checkpoint(src))[0]
    seen = {}

    def on_leaf(path, original, compressed):
        seen[path] = (original, compressed)

    dst = tmp_path / "out.jxc"
    real = compress_module.ResumableWriter.finish_leaf

    def interrupted(self, *args, **kwargs):
        if len(seen) == 2:  # after the first leaf is journaled
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(compress_module.ResumableWriter, "finish_leaf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jc.compress_file(src, dst, tx, progress=False, on_leaf=on_leaf)
    monkeypatch.undo()
    first = set(seen)
    seen.clear()
    jc.compress_file(src, dst, tx, progress=False, on_leaf=on_leaf)
    # The resumed call reports only the leaves it compressed itself.
    assert len(first) == 2 and len(seen) == 2 and len(first & set(seen)) == 1
    dense = read_checkpoint(src)
    for path, (original, compressed) in seen.items():
        keys = path.split("/")
        np.testing.assert_array_equal(np.asarray(original), dense[keys[0]][keys[1]])
        want = expected[keys[0]][keys[1]]
        np.testing.assert_array_equal(np.asarray(as_dense(compressed)), as_dense(want))
    assert filecmp.cmp(dst, _reference(tmp_path, src, tx), shallow=False)


def test_cli_summary_reads_leaves_not_measured_from_the_files(tmp_path):
    from jaxcompress.cli import files

    src = _source(tmp_path, "safetensors")
    dst = tmp_path / "out.jxc"
    rows = {}
    jc.compress_file(
        src,
        dst,
        TRANSFORMS["int4"](),
        progress=False,
        on_leaf=lambda *args: files._measured(rows, *args),
    )
    full = files._streamed_report(str(src), str(dst), rows)
    kept = {"layer1/bias": rows["layer1/bias"]}  # as after a resumed run
    assert files._streamed_report(str(src), str(dst), kept) == full
    assert files._streamed_report(str(src), str(dst), {}) == full


_MEMORY_SCRIPT = """
import os, resource, sys, numpy as np, jaxcompress as jc
src, dst, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tx = jc.quantize(4, group_size=128)
jc.compress_file(src + ".one.safetensors", dst + ".warm", tx, progress=False)  # compile first
try:  # Linux: restart the peak here, so the compile's own peak cannot hide the run's
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
except OSError:
    pass
jc.compress_file(src, dst, tx, progress=False)
# ru_maxrss also keeps the size of the process it was forked from (pytest, hundreds of
# MB after other tests): VmHWM is this process's own peak since the reset above.
try:
    with open("/proc/self/status") as status:
        print(next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) * 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _growth(tmp_path, count, rows):
    rng = np.random.default_rng(0)
    tree = {f"l{i}": rng.normal(size=(rows, 1024)).astype(ml_dtypes.bfloat16) for i in range(count)}
    src = tmp_path / f"m{count}.safetensors"
    write_safetensors(src, tree)
    write_safetensors(f"{src}.one.safetensors", {"l0": tree["l0"]})  # the same leaf shape
    del tree
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_SCRIPT,
            str(src),
            str(tmp_path / f"o{count}.jxc"),
            str(count),
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.getcwd(),
        # A fixed mmap threshold turns off glibc's sliding one, under which freed 2 MiB
        # blocks are reused from a fragmenting heap: growth then reflects what the
        # process holds, not how the allocator packs it (measured: 8-27 MiB of heap
        # growth over 60 leaves without it, 0.4 MiB with it; jax.live_arrays() stays flat).
        env={**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_follows_the_largest_leaf_not_the_leaf_count(tmp_path):
    # Same largest leaf (2 MiB of bf16), 4 versus 64 leaves: 120 MiB more model.
    few = _growth(tmp_path, 4, 1024)
    many = _growth(tmp_path, 64, 1024)
    largest = 1024 * 1024 * 2
    # Holding even each leaf's int4 output (0.5 MiB) would add 30 MiB (measured: 1-9 MiB).
    assert many - few < 8 * largest, (few, many)


def test_a_run_with_another_filter_does_not_resume(tmp_path, monkeypatch):
    src = _source(tmp_path, "safetensors")
    dst = tmp_path / "out.jxc"
    real = compress_module.ResumableWriter.finish_leaf

    def stop_after_one(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise RuntimeError("killed")

    monkeypatch.setattr(compress_module.ResumableWriter, "finish_leaf", stop_after_one)
    with pytest.raises(RuntimeError):
        jc.compress_file(src, dst, jc.quantize(4, where="kernel"), progress=False)
    monkeypatch.undo()
    other = jc.quantize(4, where="layer1/bias")  # same name, another filter
    jc.compress_file(src, dst, other, progress=False)
    assert filecmp.cmp(dst, _reference(tmp_path, src, other), shallow=False)
