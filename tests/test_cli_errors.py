"""The CLI's refusals, run in-process: flags, output paths, recipes that select nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxcompress as jc
from jaxcompress.cli import main as cli_main
from jaxcompress.core.version import __version__

PARAMS = {
    "dense1": {"kernel": jnp.arange(32.0).reshape(8, 4), "bias": jnp.ones(4)},
    "dense10": {"kernel": jnp.arange(32.0).reshape(8, 4) - 7.0},
}


def _exit(argv) -> int:
    try:
        return cli_main.main(argv)
    except SystemExit as stop:
        return 0 if stop.code is None else int(stop.code)


@pytest.fixture
def no_training(monkeypatch):
    def refuse(**kwargs):
        raise AssertionError(f"run_demo started although the flags were bad: {kwargs}")

    monkeypatch.setattr(cli_main, "run_demo", refuse)


@pytest.fixture
def checkpoint(tmp_path):
    jc.export_dense(tmp_path / "ck.safetensors", PARAMS)
    return tmp_path / "ck.safetensors"


def test_version(capsys):
    assert _exit(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jaxcompress {__version__}"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--epochs", "-1"),
        ("--seed", "-1"),
        ("--seed", "1.5"),
        ("--seed", str(2**32)),
        ("--prune-epochs", "0"),
        ("--finetune-epochs", "-3"),
        ("--bits", "9"),
        ("--bits", "0"),
        ("--bits", "four"),
        ("--sparsity", "nan"),
        ("--sparsity", "1"),
    ],
)
def test_every_numeric_demo_flag_is_checked_and_named(flag, value, capsys, no_training):
    assert _exit(["demo", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith(f"jaxcompress demo: error: argument {flag}: ") and repr(value) in err


def test_demo_checks_its_output_path_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("")
    for output, reason in [
        (tmp_path, "is a directory"),
        (tmp_path / "missing" / "d.jxc", "does not exist"),
        (tmp_path / "file" / "d.jxc", "does not exist"),
    ]:
        assert _exit(["demo", "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"jaxcompress demo: error: -o '{output}'") and reason in err


def test_a_recipe_that_selects_nothing_fails_naming_its_line(checkpoint, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[transform]]\nkind = "prune"\nsparsity = 0.5\n\n'
        '[[transform]]\nkind = "cluster"\nbits = 2\nwhere = "Dense1/Kernel"\n'
    )
    out = tmp_path / "o.jxc"
    assert _exit(["compress", str(checkpoint), "--recipe", str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcompress compress: error: r.toml:5: cluster: where='Dense1/Kernel'")
    assert "did you mean 'dense1/kernel', 'dense10/kernel'?" in err and "--allow-empty" in err
    assert not out.exists()
    argv = ["compress", str(checkpoint), "--recipe", str(recipe), "-o", str(out), "--json"]
    with pytest.warns(jc.filters.NothingSelectedWarning, match="Dense1/Kernel"):
        assert _exit([*argv, "--allow-empty"]) == 0
    assert isinstance(jc.load(out)["dense1"]["kernel"].values, jax.Array)  # pruned only


def test_the_default_filter_selecting_nothing_fails_too(tmp_path, capsys):
    jc.export_dense(tmp_path / "biases.safetensors", {"bias": jnp.ones(4)})
    (tmp_path / "r.toml").write_text('[[transform]]\nkind = "quantize"\n')
    argv = ["compress", str(tmp_path / "biases.safetensors"), "--recipe", str(tmp_path / "r.toml")]
    assert _exit([*argv, "-o", str(tmp_path / "o.jxc")]) == 2
    assert "r.toml:1: quantize: where=kernels selects none of the 1 leaf" in capsys.readouterr().err


def test_an_option_error_at_run_time_names_the_options_line(checkpoint, tmp_path, capsys):
    # The recipe names the leaf: under the default filter a misfit leaf is skipped instead.
    recipe = '[[transform]]\nkind = "quantize"\nwhere = "dense1/kernel"\naxis = 5\n'
    (tmp_path / "r.toml").write_text(recipe)
    argv = ["compress", str(checkpoint), "--recipe", str(tmp_path / "r.toml")]
    assert _exit([*argv, "-o", str(tmp_path / "o.jxc")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcompress compress: error: r.toml:4: quantize(") and "axis" in err


def test_compress_and_export_check_the_output_before_reading(checkpoint, tmp_path, capsys):
    (tmp_path / "r.toml").write_text('[[transform]]\nkind = "prune"\nsparsity = 0.5\n')
    missing = tmp_path / "missing.safetensors"  # never read: the output is checked first
    argv = ["compress", str(missing), "--recipe", str(tmp_path / "r.toml"), "-o", str(tmp_path)]
    assert _exit(argv) == 2
    assert f"--output '{tmp_path}': is a directory" in capsys.readouterr().err
    jc.save(tmp_path / "p.jxc", PARAMS)
    assert _exit(["export", str(tmp_path / "p.jxc"), "-o", str(tmp_path / "dense.txt")]) == 2
    assert "name it .safetensors or .msgpack" in capsys.readouterr().err


def test_a_library_error_with_many_lines_is_printed_as_one(monkeypatch, capsys, tmp_path):
    def fail(args):
        raise ValueError("the first line\nand JAX's long story\nover many lines")

    monkeypatch.setitem(cli_main.main.__globals__, "run_inspect", fail)
    assert _exit(["inspect", str(tmp_path / "x.jxc")]) == 2
    assert capsys.readouterr().err == "jaxcompress inspect: error: the first line ...\n"
