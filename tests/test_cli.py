"""The demo, through the `jaxcompress` command's entry point."""

import json

import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.cli.main import main


def _run_json(capsys, *args):
    assert main(["demo", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


_SHORT = ("--epochs", "2", "--prune-epochs", "2", "--finetune-epochs", "1")


def test_demo_json_has_the_promised_keys(capsys, tmp_path):
    out = tmp_path / "demo.jxc"
    result = _run_json(capsys, *_SHORT, "--sparsity", "0.5", "--bits", "4", "-o", str(out))
    for key in ("dense_accuracy", "compressed_accuracy", "sparsity", "ratio", "stage_accuracies"):
        assert key in result
    assert result["sparsity"] == 0.5 and result["bits"] == 4
    assert list(result["stage_accuracies"]) == ["dense", "pruned", "clustered", "fine-tuned"]
    # The ratio is dense bytes over the saved file's bytes, header included.
    assert result["compressed_bytes"] == out.stat().st_size == result["file"]["file_bytes"]
    assert result["ratio"] == pytest.approx(result["original_bytes"] / out.stat().st_size)
    kernels = [leaf for leaf in result["report"]["leaves"] if leaf["path"].endswith("kernel")]
    assert {leaf["kind"] for leaf in kernels} == {"sparse"}
    restored = jc.load(out)
    assert isinstance(restored["dense1"]["kernel"].values, jc.Clustered)
    assert restored["dense1"]["kernel"].values.bits == 4
    for layer in result["layers"]:
        if layer["path"].endswith("kernel"):
            assert layer["file_bytes"] < layer["clustered_bytes"] < layer["dense_bytes"]


def test_demo_table_output(capsys, tmp_path):
    assert main(["demo", *_SHORT, "--scope", "layer", "-o", str(tmp_path / "d.jxc")]) == 0
    out = capsys.readouterr().out
    assert "dense1/kernel" in out and "centroid fine-tuning" in out and "94% (layer" in out


@pytest.mark.parametrize("sparsity", ["1.0", "-0.2", "abc"])
def test_demo_rejects_bad_sparsity(sparsity, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--sparsity", sparsity])
    assert "sparsity" in capsys.readouterr().err or sparsity == "abc"


def test_default_demo_keeps_accuracy_within_one_point_over_three_seeds(capsys, tmp_path):
    """The bar: >= 80% sparsity, >= 30x smaller file, mean accuracy drop <= 1 point."""
    drops, ratios = [], []
    for seed in range(3):
        result = _run_json(capsys, "--seed", str(seed), "-o", str(tmp_path / f"{seed}.jxc"))
        assert result["sparsity"] >= 0.8
        assert result["dense_accuracy"] > 0.95
        drops.append(result["dense_accuracy"] - result["compressed_accuracy"])
        ratios.append(result["ratio"])
    assert np.mean(drops) <= 0.01
    assert np.mean(ratios) >= 30
