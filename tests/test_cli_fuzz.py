"""Hypothesis fuzzing of the ``jaxcompress`` command, in-process through ``main(argv)``.

Whatever the arguments, recipe or paths, the command returns 0 or stops with a clean
status and a one-line ``jaxcompress ...: error: ...`` message; no exception escapes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.cli import main as cli_main


class _DemoStarted(Exception):
    """Raised by the stand-in for training: the flags were accepted."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    params = {
        "dense1": {"kernel": jnp.linspace(-1.0, 1.0, 64).reshape(16, 4), "bias": jnp.ones(4)},
        "dense10": {"kernel": jnp.linspace(-2.0, 3.0, 32).reshape(8, 4)},
    }
    jc.export_dense(folder / "ck.safetensors", params)
    jc.save(folder / "ok.jxc", params)
    damaged = bytearray((folder / "ok.jxc").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (folder / "damaged.jxc").write_bytes(bytes(damaged))
    (folder / "notes.txt").write_text("not weights")
    (folder / "empty").mkdir()
    return folder


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli_main.main(argv)
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code
        except _DemoStarted:
            code = 0
    return code, err.getvalue()


def _check_clean(argv: list[str], code, err: str) -> None:
    assert isinstance(code, int), (argv, code)
    assert "Traceback" not in err, (argv, err)
    if code != 0:
        assert code == 2, (argv, code, err)
        # One line: no usage block, no traceback, no story from inside JAX.
        assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
        assert err.startswith("jaxcompress") and ": error: " in err, (argv, err)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml(item) for item in value) + "]"


PATHISH = st.text(alphabet="dense10/kernlbia_*?[]()^$.D+", max_size=14)
VALUES = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0, -0.1, 1e-9, math.nan, math.inf]),
    st.booleans(),
    st.sampled_from(
        [
            "global",
            "layer",
            "absmax",
            "mse",
            "percentile",
            "lloyd",
            "optimal",
            "kmeans++",
            "bfloat16",
            "float16",
            "int8",
            "nope",
            "",
        ]
    ),
    PATHISH,
    st.lists(PATHISH, max_size=3),
)
OPTIONS = st.sampled_from(
    [
        "sparsity",
        "scope",
        "bits",
        "k",
        "axis",
        "group_size",
        "symmetric",
        "calibration",
        "percentile",
        "init",
        "per_channel",
        "method",
        "max_iter",
        "scale_dtype",
        "codebook_dtype",
        "where",
        "where",
        "importance",
        "bitz",
    ]
)


@st.composite
def recipes(draw) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=30))  # mostly invalid TOML
    tables = []
    for _ in range(draw(st.integers(0, 3))):
        lines = ["[[transform]]"]
        kind = draw(st.sampled_from(["prune", "quantize", "cluster", "prune", "shrink", None]))
        if kind is not None:
            lines.append(f"kind = {_toml(kind)}")
        options = draw(st.dictionaries(OPTIONS, VALUES, max_size=3))
        lines += [f"{name} = {_toml(value)}" for name, value in options.items()]
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def _paths(files):
    return st.sampled_from(
        [
            files / "ck.safetensors",
            files / "ok.jxc",
            files / "damaged.jxc",
            files / "notes.txt",
            files / "missing.safetensors",
            files / "empty",
        ]
    ).map(str)


def _outputs(files):
    return st.sampled_from(
        [
            files / "out" / "x.jxc",
            files / "x.jxc",
            files / "dense.safetensors",
            files / "dense.msgpack",
            files / "dense.txt",
            files / "empty",
            files / "no" / "x.jxc",
        ]
    ).map(str)


FLAGS = st.sampled_from(
    [
        "--json",
        "--help",
        "-o",
        "--output",
        "--recipe",
        "--allow-empty",
        "--no-entropy",
        "--version",
        "--list",
        "--dir",
        "-x",
        "--",
        "",
    ]
)
NUMBERS = st.sampled_from(["-1", "0", "1", "2", "8", "9", "1.5", "nan", "inf", "1e9", "x", ""])


@st.composite
def light_argv(draw, files) -> list[str]:
    """Every command but compress's transforms: demo flags, inspect, export, bench, noise."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        flags = [
            "--seed",
            "--epochs",
            "--prune-epochs",
            "--finetune-epochs",
            "--bits",
            "--sparsity",
            "--scope",
            "-o",
        ]
        argv = ["demo"]
        for flag in draw(st.lists(st.sampled_from(flags), max_size=4)):
            value = draw(_outputs(files)) if flag == "-o" else draw(NUMBERS)
            argv += [flag, value]
        return argv
    if choice == 1:
        return ["inspect", draw(_paths(files)), *draw(st.lists(FLAGS, max_size=1))]
    if choice == 2:
        return ["export", draw(_paths(files)), "-o", draw(_outputs(files))]
    if choice == 3:
        folder = draw(st.sampled_from([files / "empty", files / "missing"]))
        return ["bench", "--dir", str(folder), *draw(st.lists(FLAGS | PATHISH, max_size=2))]
    words = st.sampled_from(["demo", "compress", "inspect", "export", "bench", "nope"])
    return draw(st.lists(words | FLAGS | NUMBERS, max_size=5))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_light_command_line_ends_cleanly(files, monkeypatch, data):
    def started(**kwargs):
        raise _DemoStarted

    monkeypatch.setattr(cli_main, "run_demo", started)
    argv = data.draw(light_argv(files))
    code, err = _run(argv)
    _check_clean(argv, code, err)


@settings(max_examples=40, deadline=None)
@given(recipe=recipes(), data=st.data())
def test_any_recipe_compresses_or_ends_cleanly(files, recipe, data):
    (files / "recipe.toml").write_text(recipe)
    argv = [
        "compress",
        data.draw(_paths(files)),
        "--recipe",
        str(files / "recipe.toml"),
        "-o",
        data.draw(_outputs(files)),
    ]
    argv += data.draw(
        st.lists(
            st.sampled_from(["--json", "--allow-empty", "--no-entropy"]), max_size=2, unique=True
        )
    )
    code, err = _run(argv)
    _check_clean(argv, code, err)
