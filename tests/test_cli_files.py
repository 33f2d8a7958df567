"""The compress, inspect, export and bench subcommands.

The round trip and the bench script run as real subprocesses (``python -m``, the entry
point a user runs); the error paths, help and listings call ``main(argv)`` in-process,
which takes the same path without paying a Python and jax start-up for each call.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import jaxcompress as jc
from jaxcompress.cli.main import main
from jaxcompress.cli.recipes import RecipeError, parse_recipe
from jaxcompress.examples.models import LeNet300100
from jaxcompress.io.checkpoints import read_checkpoint
from jaxcompress.io.interop import read_safetensors

RECIPE = """\
# Deep Compression's first two stages.
[[transform]]
kind = "prune"
sparsity = 0.9
scope = "layer"

[[transform]]
kind = "cluster"
bits = 4
where = ["dense1", "dense2"]
"""


def _cli(*args):
    command = [sys.executable, "-m", "jaxcompress.cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _in_process(capsys, *args):
    """``main(argv)`` here, as (exit status, stdout, stderr); argparse's exits included."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def lenet_params():
    model = LeNet300100()
    return model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, lenet_params):
    folder = tmp_path_factory.mktemp("ckpt")
    jc.export_dense(folder / "lenet.safetensors", lenet_params)
    (folder / "recipe.toml").write_text(RECIPE)
    return folder


@pytest.mark.slow  # several CLI subprocesses
def test_compress_inspect_export_round_trip(checkpoint, lenet_params, tmp_path):
    out = tmp_path / "lenet.jxc"
    run = _cli(
        "compress",
        checkpoint / "lenet.safetensors",
        "--recipe",
        checkpoint / "recipe.toml",
        "-o",
        out,
        "--json",
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    expected, _ = parse_recipe(RECIPE)(lenet_params)
    restored = jc.load(out)
    for layer in ("dense1", "dense2"):
        assert isinstance(restored[layer]["kernel"], jc.Sparse)
        assert isinstance(restored[layer]["kernel"].values, jc.Clustered)
    assert isinstance(restored["dense3"]["kernel"].values, jax.Array)
    dense, want = jc.materialize(restored), jc.materialize(expected)
    for layer in ("dense1", "dense2", "dense3"):
        np.testing.assert_array_equal(dense[layer]["kernel"], want[layer]["kernel"])
    assert result["file"]["file_bytes"] == out.stat().st_size
    assert result["report"]["ratio"] > 5

    run = _cli("inspect", out, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["file_bytes"] == out.stat().st_size
    table = _cli("inspect", out)
    assert "dense1/kernel" in table.stdout and "entropy bound" in table.stdout

    run = _cli("export", out, "-o", tmp_path / "dense.safetensors", "--json")
    assert run.returncode == 0, run.stderr
    exported = read_safetensors(tmp_path / "dense.safetensors")
    np.testing.assert_array_equal(exported["dense1"]["kernel"], dense["dense1"]["kernel"])


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            '[[transform]]\nkind = "prune"\nsparsity = 0.5\n\n[[transform]]\nkind = "shrink"\n',
            "recipe.toml:6: unknown transform kind 'shrink'",
        ),
        (
            '[[transform]]\nkind = "cluster"\nbitz = 4\n',
            "recipe.toml:3: cluster has no option 'bitz'",
        ),
        ('[[transform]]\nkind = "quantize"\nbits = 13\n', "recipe.toml:3: quantize: "),
        ('[[transform]]\nkind = "prune"\nsparsity = 0.5\nwhere = 3\n', "recipe.toml:4: where must"),
        ("[[transform]\n", "invalid TOML"),
        ("[settings]\nx = 1\n", "unknown table 'settings'"),
    ],
)
def test_bad_recipes_name_the_line_and_write_nothing(checkpoint, tmp_path, capsys, recipe, message):
    (tmp_path / "recipe.toml").write_text(recipe)
    out = tmp_path / "out.jxc"
    code, _, err = _in_process(
        capsys,
        "compress",
        checkpoint / "lenet.safetensors",
        "--recipe",
        tmp_path / "recipe.toml",
        "-o",
        out,
    )
    assert code == 2
    assert message in err, err
    assert not out.exists()
    with pytest.raises(RecipeError):
        parse_recipe(recipe, source="recipe.toml")


def test_compress_on_a_non_checkpoint_says_what_it_expected(checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not weights")
    code, _, err = _in_process(
        capsys,
        "compress",
        tmp_path / "notes.txt",
        "--recipe",
        checkpoint / "recipe.toml",
        "-o",
        tmp_path / "o.jxc",
    )
    assert code == 2
    assert "not a checkpoint; expected a jaxcompress file (.jxc), a safetensors file" in err
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    code, _, err = _in_process(capsys, "inspect", tmp_path / "bad.safetensors")
    assert code == 2 and "not a jaxcompress file" in err
    assert not (tmp_path / "o.jxc").exists()


def test_read_checkpoint_reads_every_format(tmp_path, lenet_params):
    (tmp_path / "p.msgpack").write_bytes(serialization.to_bytes(lenet_params))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", lenet_params)
    checkpointer.wait_until_finished()
    jc.save(tmp_path / "p.jxc", lenet_params)
    jc.export_dense(tmp_path / "p.safetensors", lenet_params)
    for name in ("p.msgpack", "orbax", "p.jxc", "p.safetensors"):
        tree = read_checkpoint(tmp_path / name)
        np.testing.assert_array_equal(
            np.asarray(tree["dense2"]["kernel"]), np.asarray(lenet_params["dense2"]["kernel"])
        )
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_help_reads_like_documentation(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps as in a pipe, whatever the terminal
    code, out, _ = _in_process(capsys, "--help")
    assert code == 0
    for command in ("demo", "compress", "inspect", "export", "bench"):
        assert command in out
    _, out, _ = _in_process(capsys, "compress", "--help")
    assert "[[transform]]" in out and "--recipe" in out
    assert "entropy bound" in _in_process(capsys, "inspect", "--help")[1]
    assert "OPENBLAS_CORETYPE" in _in_process(capsys, "bench", "--help")[1]


def test_bench_lists_the_suite_and_rejects_unknown_names(tmp_path, capsys, monkeypatch):
    code, out, err = _in_process(capsys, "bench", "--list")
    assert code == 0, err
    assert "quantizers" in out and "kmeans_vs_sklearn" in out
    code, _, err = _in_process(capsys, "bench", "no_such_benchmark")
    assert code == 2 and "unknown benchmark 'no_such_benchmark'" in err
    monkeypatch.chdir(tmp_path)  # no benchmarks/ here: falls back to the checkout's folder
    code, out, _ = _in_process(capsys, "bench", "--list")
    assert code == 0 and "quantizers" in out
    listed = json.loads(_in_process(capsys, "bench", "--list", "--json")[1])
    assert "deep_compression" in listed["benchmarks"]


def test_bench_runs_a_script_and_reports_json(tmp_path):
    folder = tmp_path / "benchmarks"
    (folder / "results").mkdir(parents=True)
    script = (
        '"""Does it run?"""\n'
        "import json, os, pathlib\n"
        "assert 'OPENBLAS_CORETYPE' not in os.environ\n"
        "print('noise on stdout')\n"
        "pathlib.Path(__file__).parent.joinpath('results', 'tiny.json').write_text('{}')\n"
    )
    (folder / "tiny.py").write_text(script)
    # Options go before the name; everything after it is the script's.
    run = _cli("bench", "--json", "--dir", folder, "tiny")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["runs"] == [
        {"name": "tiny", "status": 0, "results": str(folder / "results" / "tiny.json")}
    ]
    assert "noise on stdout" in run.stderr


def test_inspect_exits_non_zero_on_a_damaged_file(tmp_path, capsys):
    path = tmp_path / "w.jxc"
    jc.save(path, {"w": jnp.arange(64.0)}, entropy=False)
    data = bytearray(path.read_bytes())
    data[16 + 10] ^= 1  # one bit of the first buffer; the header is intact
    path.write_bytes(bytes(data))
    code, _, err = _in_process(capsys, "inspect", path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "checksum mismatch in buffer 0" in lines[0]
    with pytest.raises(jc.FileFormatError, match="checksum"):
        jc.inspect_file(path, verify=True)
    assert jc.inspect_file(path).leaves[0].shape == (64,)  # the header alone still reads
