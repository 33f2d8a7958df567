"""The demo, through the `jaxcompress` command's entry point."""

import json

import numpy as np
import pytest

from jaxcompress.cli import main


def _run_json(capsys, *args):
    assert main(["demo", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_json_has_the_promised_keys(capsys):
    result = _run_json(capsys, "--epochs", "2", "--finetune-epochs", "1", "--sparsity", "0.5")
    for key in ("dense_accuracy", "compressed_accuracy", "sparsity", "ratio"):
        assert key in result
    assert result["sparsity"] == 0.5
    report = result["report"]
    assert report["original_bytes"] == result["original_bytes"]
    # Kernels pruned by half, biases untouched: ratio is bytes before over true bytes after.
    assert result["ratio"] == pytest.approx(report["original_bytes"] / report["compressed_bytes"])
    kernels = [leaf for leaf in report["leaves"] if leaf["path"].endswith("kernel")]
    assert {leaf["kind"] for leaf in kernels} == {"sparse"}


def test_demo_table_output(capsys):
    assert main(["demo", "--epochs", "1", "--finetune-epochs", "1", "--scope", "layer"]) == 0
    out = capsys.readouterr().out
    assert "dense1/kernel" in out and "compression ratio" in out and "90% (layer)" in out


@pytest.mark.parametrize("sparsity", ["1.0", "-0.2", "abc"])
def test_demo_rejects_bad_sparsity(sparsity, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--sparsity", sparsity])
    assert "sparsity" in capsys.readouterr().err or sparsity == "abc"


def test_default_demo_keeps_accuracy_within_one_point_over_three_seeds(capsys):
    """The done-when bar: >= 80% sparsity, mean accuracy drop <= 1 point over seeds 0-2."""
    drops = []
    for seed in range(3):
        result = _run_json(capsys, "--seed", str(seed))
        assert result["sparsity"] >= 0.8
        assert result["dense_accuracy"] > 0.95
        drops.append(result["dense_accuracy"] - result["compressed_accuracy"])
    assert np.mean(drops) <= 0.01
