"""``jaxcompress compress --recipe`` with ``[model]``, ``[auto]`` and ``[distill]`` tables.

A tiny MLP in a temporary ``tiny_hybrid_model.py`` beside the recipe, 64 rows of
unlabeled inputs in ``inputs.npy``; every command runs ``main(argv)`` in-process.
"""

import json
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.cli.hybrid_recipe import parse_recipe_text
from jaxcompress.cli.main import main
from jaxcompress.cli.recipes import RecipeError, parse_recipe

MODULE = "tiny_hybrid_model"
MODEL = """\
import jax.numpy as jnp


def apply(params, x):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"][None])
    return h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None]
"""
CANDIDATES = '["dense", "int8", "kmeans3"]'


def _apply(params, x):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"][None])
    return h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None]


def _params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "dense1": {
            "kernel": jax.random.normal(k1, (16, 64)) / 4.0,
            "bias": jax.random.normal(k3, (64,)) * 0.1,
        },
        "dense2": {"kernel": jax.random.normal(k2, (64, 8)) / 8.0, "bias": jnp.zeros((8,))},
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The model module, the checkpoint, 64 training rows and 64 held-out rows."""
    path = tmp_path_factory.mktemp("hybrid")
    (path / f"{MODULE}.py").write_text(MODEL)
    jc.export_dense(path / "mlp.safetensors", _params())
    rows = np.asarray(jax.random.normal(jax.random.key(1), (128, 16)), np.float32)
    np.save(path / "inputs.npy", rows[:64])
    np.save(path / "heldout.npy", rows[64:])
    np.save(path / "narrow.npy", rows[:64, :5])
    yield path
    sys.modules.pop(MODULE, None)


def _run(capsys, folder, recipe, out, *extra):
    """``jaxcompress compress`` with ``recipe`` written beside the model: (status, out, err)."""
    name = f"recipe_{abs(hash(recipe))}.toml"
    (folder / name).write_text(textwrap.dedent(recipe))
    argv = ["compress", str(folder / "mlp.safetensors"), "--recipe", str(folder / name)]
    try:
        code = main([*argv, "-o", str(out), *extra])
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


MODEL_TABLE = f"""\
[model]
apply = "{MODULE}:apply"
data = "inputs.npy"
batch_size = 32
"""


def test_auto_recipe_writes_what_jc_auto_gives_within_the_byte_budget(folder, tmp_path, capsys):
    params = _params()
    budget = jc.nbytes(params) // 3
    recipe = MODEL_TABLE + f"\n[auto]\nbytes = {budget}\ncandidates = {CANDIDATES}\n"
    out = tmp_path / "auto.jxc"
    code, stdout, err = _run(capsys, folder, recipe, out, "--json")
    assert code == 0, err
    assert "compresses in memory, not leaf by leaf" in err
    loaded = jc.load(out)
    assert jc.nbytes(loaded) <= budget

    inputs = np.load(folder / "inputs.npy")
    tx, plan = jc.auto(
        _apply,
        params,
        [inputs[:32], inputs[32:]],
        budget=jc.budget(bytes=budget),
        candidates=json.loads(CANDIDATES),
        progress=False,
    )
    expected, _ = tx(params)
    result = json.loads(stdout)
    assert {row["path"]: row["format"] for row in result["auto"]["rows"]} == plan.formats
    assert result["auto"]["bytes"] == plan.bytes == jc.nbytes(loaded)
    assert jax.tree.structure(loaded, is_leaf=jc.is_compressed) == jax.tree.structure(
        expected, is_leaf=jc.is_compressed
    )
    for got, want in zip(
        jax.tree.leaves(loaded, is_leaf=jc.is_compressed),
        jax.tree.leaves(expected, is_leaf=jc.is_compressed),
        strict=True,
    ):
        assert type(got) is type(want)
        np.testing.assert_array_equal(np.asarray(jc.materialize(got)), jc.materialize(want))

    code, stdout, err = _run(capsys, folder, recipe, tmp_path / "auto2.jxc")
    assert code == 0, err
    assert "[auto] formats" in stdout and "dense1/kernel" in stdout


def _heldout_mse(folder, tree):
    x = np.load(folder / "heldout.npy")
    dense = _apply(_params(), x)
    return float(jnp.mean(jnp.square(_apply(jc.materialize(tree), x) - dense)))


def test_distill_recipe_lowers_the_heldout_loss_and_keeps_masks_and_indices(
    folder, tmp_path, capsys
):
    transforms = """
        [[transform]]
        kind = "prune"
        sparsity = 0.6
        scope = "layer"

        [[transform]]
        kind = "cluster"
        bits = 2
        """
    distill = """
        [distill]
        steps = 60
        loss = "mse"
        learning_rate = 1e-2
        eval_data = "heldout.npy"
        """
    plain, distilled = tmp_path / "plain.jxc", tmp_path / "distilled.jxc"
    code, _, err = _run(capsys, folder, MODEL_TABLE + transforms, plain)
    assert code == 0, err
    code, stdout, err = _run(
        capsys, folder, MODEL_TABLE + transforms + distill, distilled, "--json"
    )
    assert code == 0, err
    report = json.loads(stdout)["distill"]
    assert report["steps"] == 60 and report["eval_on"] == "eval_batches"
    assert report["after"] < report["before"]

    before, after = jc.load(plain), jc.load(distilled)
    assert _heldout_mse(folder, after) < 0.95 * _heldout_mse(folder, before)  # 0.90 measured
    for name in ("dense1", "dense2"):
        old, new = before[name]["kernel"], after[name]["kernel"]
        assert isinstance(new, jc.Sparse) and isinstance(new.values, jc.Clustered)
        np.testing.assert_array_equal(np.asarray(new.mask), np.asarray(old.mask))
        np.testing.assert_array_equal(
            np.asarray(new.values.indices), np.asarray(old.values.indices)
        )
        assert not np.array_equal(np.asarray(new.values.codebook), old.values.codebook)


def test_model_table_calibrates_data_aware_transforms(folder, tmp_path, capsys):
    recipe = MODEL_TABLE + '\n[[transform]]\nkind = "quantize"\nbits = 4\nmethod = "gptq"\n'
    out = tmp_path / "gptq.jxc"
    code, _, err = _run(capsys, folder, recipe, out)
    assert code == 0, err
    assert "calibrating" in err
    inputs = np.load(folder / "inputs.npy")
    data = jc.calibrate(_apply, _params(), [inputs[:32], inputs[32:]])
    expected, _ = jc.quantize(4, method="gptq")(_params(), data=data)
    loaded = jc.load(out)
    np.testing.assert_array_equal(
        np.asarray(loaded["dense1"]["kernel"].codes), np.asarray(expected["dense1"]["kernel"].codes)
    )


AUTO = f"\n[auto]\nratio = 4\ncandidates = {CANDIDATES}\n"


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("[auto]\nratio = 4\n", ":1: [auto] needs a [model] table"),
        (MODEL_TABLE + "[distill]\nsteps = 5\n", ": no [[transform]] and no [auto] table"),
        ('[model]\napply = "m:f"\n[auto]\nratio = 4\n', ":1: [model] needs data ="),
        (MODEL_TABLE + "batchsize = 4\n" + AUTO, ":5: [model] has no key 'batchsize'"),
        (MODEL_TABLE.replace("32", "0") + AUTO, ":4: [model] batch_size must be a positive"),
        (
            MODEL_TABLE + AUTO + '\n[[transform]]\nkind = "prune"\n',
            ":10: a recipe with [auto] has no [[transform]] tables: [auto] (recipe",
        ),
        (MODEL_TABLE + '\n[auto]\nratio = 4\ncandidates = ["int3"]\n', ":8: [auto] candidates"),
        (MODEL_TABLE + "\n[auto]\nmetric = 'mse'\n", ":6: [auto] needs a budget"),
        (MODEL_TABLE + "\n[[auto]]\nratio = 4\n", ":6: [auto] is one table"),
        (MODEL_TABLE + AUTO + "\n[distill]\nsteps = 0\n", ":11: [distill] steps must be"),
        (MODEL_TABLE + AUTO + "\n[distill]\nloss = 'l1'\n", ":11: [distill] loss must be one"),
        (MODEL_TABLE + AUTO + "\n[distill]\nlr = 0.1\n", ":11: [distill] has no key 'lr'"),
        (
            MODEL_TABLE.replace(MODULE, "no_such_model_module") + AUTO,
            ":2: [model] apply 'no_such_model_module:apply': no module named",
        ),
        (
            MODEL_TABLE.replace(":apply", ":forward") + AUTO,
            ":2: [model] apply 'tiny_hybrid_model:forward': the module tiny_hybrid_model has",
        ),
        (MODEL_TABLE.replace(":apply", "") + AUTO, ':2: [model] apply must be "module:function"'),
        (MODEL_TABLE.replace("inputs.npy", "gone.npy") + AUTO, ":3: [model] data '"),
        (MODEL_TABLE.replace("inputs.npy", "inputs.csv") + AUTO, ":3: [model] data must be a"),
        (
            MODEL_TABLE.replace("inputs.npy", "narrow.npy") + AUTO,
            ":2: [model] apply: the model fails on the checkpoint's parameters",
        ),
        (
            MODEL_TABLE + '\n[auto]\nbytes = 64\ncandidates = ["int8"]\n',
            ":7: auto: budget 64 bytes with candidates ['int8'] cannot be met",
        ),
        (
            MODEL_TABLE + '\n[[transform]]\nkind = "prune"\nsparsity = 0.5\nwhere = "conv"\n',
            ":6: prune: where='conv' selects none",
        ),
    ],
)
def test_bad_hybrid_recipes_name_the_line_and_write_nothing(
    folder, tmp_path, capsys, recipe, message
):
    out = tmp_path / "out.jxc"
    code, _, err = _run(capsys, folder, recipe, out)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_parse_recipe_refuses_tables_that_need_the_model():
    with pytest.raises(RecipeError, match=r"\[auto\] needs the model and data"):
        parse_recipe("[auto]\nratio = 8\n")
    recipe = parse_recipe_text(MODEL_TABLE + "\n[auto]\nratio = 8\n\n[distill]\nfeatures = true\n")
    assert recipe.in_memory and recipe.distill.features is True and recipe.distill.steps == 100
