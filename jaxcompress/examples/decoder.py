"""A Llama-style decoder LM in flax linen and nnx, greedy decoding, synthetic checkpoints.

RMSNorm, rotary positions (the half-split ``rotate_half`` form Hugging Face Llama
uses), grouped-query attention with a causal mask, and a SwiGLU MLP; no biases. The
linen :class:`Decoder` and the nnx :class:`DecoderNNX` share the arithmetic and the
parameter names, so one parameter tree runs in both (:func:`to_nnx`,
:func:`params_of`). The names follow Hugging Face Llama, with flax's leaf names::

    embed_tokens/embedding                       (vocab, dim)
    layers_{i}/input_layernorm/scale             (dim,)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel   (in, out)
    layers_{i}/post_attention_layernorm/scale    (dim,)
    layers_{i}/mlp/{gate,up,down}_proj/kernel    (in, out)
    norm/scale                                   (dim,)
    lm_head/kernel                               (dim, vocab)

With ``scan_layers=True`` the blocks are one ``layers/...`` subtree whose leaves carry
a leading ``(n_layers,)`` axis, run by ``nn.scan`` (linen) or ``lax.scan`` over the
stacked state (nnx); :func:`stack_layers` and :func:`unstack_layers` convert.

:func:`write_checkpoint` writes a random bfloat16 Llama checkpoint of any size in
Hugging Face's safetensors layout (``model.layers.{i}.self_attn.q_proj.weight``,
``(out, in)``), a shard at a time, for memory and speed work without real weights;
:func:`param_count` and :data:`PRESETS` size it. :func:`from_hf` reads such tensors
back into a parameter tree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn
from flax import nnx
from jax import lax

__all__ = [
    "PRESETS",
    "Decoder",
    "DecoderConfig",
    "DecoderNNX",
    "from_hf",
    "generate",
    "hf_shapes",
    "param_count",
    "params_of",
    "stack_layers",
    "to_nnx",
    "unstack_layers",
    "write_checkpoint",
]

_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
_INIT_STD = 0.02  # Hugging Face Llama's initializer_range
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The shape of a Llama-style decoder.

    Frozen (hence hashable), so it can be a linen attribute and a static ``jit``
    argument.

    Attributes:
        vocab: Token count of the embedding and the output head.
        dim: Width of the hidden states.
        n_layers: Decoder blocks.
        n_heads: Query heads; must divide ``dim``.
        n_kv_heads: Key/value heads (grouped-query attention); must divide ``n_heads``.
        ffn: Hidden width of the SwiGLU MLP.
        max_len: Longest sequence the model accepts.
        rope_theta: Base of the rotary frequencies.
        norm_eps: RMSNorm epsilon.
        dtype: Parameter and activation dtype: float32, bfloat16 or float16 (norms,
            rotary angles and softmax run in float32; logits come back float32).

    Example:
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48)
        >>> config.head_dim, param_count(config)
        (8, 19616)
        >>> DecoderConfig(dim=30, n_heads=4)
        Traceback (most recent call last):
        ...
        ValueError: dim 30 is not divisible by n_heads 4
    """

    vocab: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 128
    max_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        sizes = ("vocab", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn", "max_len")
        bad = [f"{k}={getattr(self, k)}" for k in sizes if getattr(self, k) < 1]
        if bad:
            raise ValueError(f"sizes must be positive: {', '.join(bad)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary positions")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ValueError("rope_theta and norm_eps must be positive")
        dtype = np.dtype(self.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        object.__setattr__(self, "dtype", dtype)  # one hashable form for jit and linen

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``dim // n_heads``."""
        return self.dim // self.n_heads


# Llama-like shapes with a 32000-token vocabulary and an untied head. "7b" is
# Llama-2-7B's shape; "1b" and "3b" are Llama-3.2's with grouped-query attention.
PRESETS: dict[str, DecoderConfig] = {
    "1b": DecoderConfig(
        vocab=32000,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn=8192,
        max_len=4096,
        rope_theta=500000.0,
        dtype=jnp.bfloat16,
    ),
    "3b": DecoderConfig(
        vocab=32000,
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn=8192,
        max_len=4096,
        rope_theta=500000.0,
        dtype=jnp.bfloat16,
    ),
    "7b": DecoderConfig(
        vocab=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        ffn=11008,
        max_len=4096,
        dtype=jnp.bfloat16,
    ),
}


# --------------------------------------------------------------------------- arithmetic
# Shared by the linen and nnx modules so the two compute the same thing.


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    y = x.astype(jnp.float32)
    y = y * lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)
    # Explicit ranks: the model runs under jax_numpy_rank_promotion="raise".
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + scale.shape)
    return (y * scale).astype(x.dtype)


def _rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotates ``x`` ``(batch, length, heads, head_dim)`` by its positions 0..length-1."""
    length, head_dim = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    y = x.astype(jnp.float32)
    half = head_dim // 2
    rotated = jnp.concatenate([-y[..., half:], y[..., :half]], axis=-1)
    return (y * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _attend(cfg: DecoderConfig, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention; ``q`` ``(b, t, dim)``, ``k``/``v`` ``(b, t, kv_dim)``."""
    b, t, _ = q.shape
    d, kv, groups = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
    q = _rotary(q.reshape(b, t, cfg.n_heads, d), cfg.rope_theta).reshape(b, t, kv, groups, d)
    k = _rotary(k.reshape(b, t, kv, d), cfg.rope_theta)
    v = v.reshape(b, t, kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d))
    causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))[None, None, None]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.dim)


def _check_ids(cfg: DecoderConfig, ids: jax.Array) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integer (batch, length), got {ids.dtype} {ids.shape}")
    if ids.shape[1] > cfg.max_len:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len {cfg.max_len}")
    return ids


# --------------------------------------------------------------------------- linen


def _init() -> Callable[..., jax.Array]:
    return nn.initializers.normal(_INIT_STD)


class _RMSNorm(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        scale = self.param("scale", nn.initializers.ones, (cfg.dim,), cfg.dtype)
        return _rms_norm(x, scale, cfg.norm_eps)


def _dense(cfg: DecoderConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.dtype,
        kernel_init=_init(),
        name=name,
    )


class _Attention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        q = _dense(cfg, cfg.dim, "q_proj")(x)
        k = _dense(cfg, kv_dim, "k_proj")(x)
        v = _dense(cfg, kv_dim, "v_proj")(x)
        return _dense(cfg, cfg.dim, "o_proj")(_attend(cfg, q, k, v))


class _MLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg, cfg.ffn, "gate_proj")(x)
        up = _dense(cfg, cfg.ffn, "up_proj")(x)
        return _dense(cfg, cfg.dim, "down_proj")(nn.silu(gate) * up)


class _Block(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        # (carry, xs) -> (carry, ys), so the same block runs unrolled or under nn.scan.
        cfg = self.config
        x = x + _Attention(cfg, name="self_attn")(_RMSNorm(cfg, name="input_layernorm")(x))
        x = x + _MLP(cfg, name="mlp")(_RMSNorm(cfg, name="post_attention_layernorm")(x))
        return x, None


class Decoder(nn.Module):
    """A Llama-style decoder LM (linen) returning float32 logits ``(batch, length, vocab)``.

    Attributes:
        config: The model's shape and dtype.
        scan_layers: Run the blocks as one ``nn.scan`` over stacked parameters
            (``layers/...`` with a leading ``n_layers`` axis) instead of unrolled
            ``layers_{i}/...``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48)
        >>> ids = jnp.array([[1, 5, 9, 2]])
        >>> params = Decoder(config).init(jax.random.key(0), ids)["params"]
        >>> params["layers_1"]["self_attn"]["k_proj"]["kernel"].shape
        (32, 16)
        >>> Decoder(config).apply({"params": params}, ids).shape
        (1, 4, 64)
        >>> scanned = stack_layers(params, config)
        >>> scanned["layers"]["mlp"]["down_proj"]["kernel"].shape
        (2, 48, 32)
        >>> logits = Decoder(config, scan_layers=True).apply({"params": scanned}, ids)
        >>> bool(jnp.allclose(logits, Decoder(config).apply({"params": params}, ids), atol=1e-5))
        True
    """

    config: DecoderConfig = DecoderConfig()
    scan_layers: bool = False

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """Returns the next-token logits at every position of ``ids`` ``(batch, length)``."""
        cfg = self.config
        ids = _check_ids(cfg, ids)
        x = nn.Embed(
            cfg.vocab,
            cfg.dim,
            dtype=cfg.dtype,
            param_dtype=cfg.dtype,
            embedding_init=_init(),
            name="embed_tokens",
        )(ids)
        if self.scan_layers:
            blocks = nn.scan(
                _Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=cfg.n_layers,
            )
            x, _ = blocks(cfg, name="layers")(x, None)
        else:
            for i in range(cfg.n_layers):
                x, _ = _Block(cfg, name=f"layers_{i}")(x)
        x = _RMSNorm(cfg, name="norm")(x)
        return _dense(cfg, cfg.vocab, "lm_head")(x).astype(jnp.float32)


# --------------------------------------------------------------------------- nnx


class _RMSNormNNX(nnx.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((cfg.dim,), cfg.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return _rms_norm(x, self.scale[...], self.eps)


def _linear(cfg: DecoderConfig, n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.dtype,
        kernel_init=_init(),
        rngs=rngs,
    )


class _AttentionNNX(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
        self.k_proj = _linear(cfg, cfg.dim, kv_dim, rngs)
        self.v_proj = _linear(cfg, cfg.dim, kv_dim, rngs)
        self.o_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(_attend(self.cfg, q, k, v))


class _MLPNNX(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.gate_proj = _linear(cfg, cfg.dim, cfg.ffn, rngs)
        self.up_proj = _linear(cfg, cfg.dim, cfg.ffn, rngs)
        self.down_proj = _linear(cfg, cfg.ffn, cfg.dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class _BlockNNX(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.input_layernorm = _RMSNormNNX(cfg)
        self.self_attn = _AttentionNNX(cfg, rngs)
        self.post_attention_layernorm = _RMSNormNNX(cfg)
        self.mlp = _MLPNNX(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderNNX(nnx.Module):
    """The same decoder LM as :class:`Decoder`, in flax nnx, with the same parameter paths.

    Args:
        config: The model's shape and dtype.
        scan_layers: Keep the blocks as one stacked module ``layers`` (leading
            ``n_layers`` axis on every leaf) run by ``lax.scan``, instead of
            attributes ``layers_{i}``.
        rngs: Random streams for the initial weights.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48)
        >>> model = DecoderNNX(config, scan_layers=True, rngs=nnx.Rngs(0))
        >>> model.layers.self_attn.q_proj.kernel.shape
        (2, 32, 32)
        >>> model(jnp.array([[1, 5, 9, 2]])).shape
        (1, 4, 64)
    """

    def __init__(self, config: DecoderConfig, *, scan_layers: bool = False, rngs: nnx.Rngs) -> None:
        self.config = config
        self.scan_layers = scan_layers
        cfg = config
        self.embed_tokens = nnx.Embed(
            cfg.vocab,
            cfg.dim,
            dtype=cfg.dtype,
            param_dtype=cfg.dtype,
            embedding_init=_init(),
            rngs=rngs,
        )
        blocks = [_BlockNNX(cfg, rngs) for _ in range(cfg.n_layers)]
        if scan_layers:
            graphdef, _ = nnx.split(blocks[0])
            states = [nnx.state(block) for block in blocks]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
            self.layers = nnx.merge(graphdef, stacked)
        else:
            for i, block in enumerate(blocks):
                setattr(self, f"layers_{i}", block)
        self.norm = _RMSNormNNX(cfg)
        self.lm_head = _linear(cfg, cfg.dim, cfg.vocab, rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Returns float32 next-token logits ``(batch, length, vocab)`` for ``ids``."""
        cfg = self.config
        x = self.embed_tokens(_check_ids(cfg, ids))
        if self.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(x: jax.Array, layer: Any) -> tuple[jax.Array, None]:
                return nnx.merge(graphdef, layer)(x), None

            x, _ = lax.scan(body, x, state)
        else:
            for i in range(cfg.n_layers):
                x = getattr(self, f"layers_{i}")(x)
        return self.lm_head(self.norm(x)).astype(jnp.float32)


def to_nnx(params: Mapping[str, Any], config: DecoderConfig) -> DecoderNNX:
    """The :class:`DecoderNNX` holding the linen :class:`Decoder` parameters ``params``.

    Scanned or unrolled is read from ``params`` (a ``layers`` subtree or ``layers_{i}``).

    Args:
        params: The linen parameters (``{"params": ...}`` or bare).
        config: Their config.

    Returns:
        The nnx model; the same ids give the same logits.

    Raises:
        ValueError: ``params`` does not have the model's paths and shapes.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48)
        >>> ids = jnp.array([[3, 1, 4, 1, 5]])
        >>> params = Decoder(config).init(jax.random.key(0), ids)["params"]
        >>> model = to_nnx(params, config)
        >>> bool(jnp.array_equal(model(ids), Decoder(config).apply({"params": params}, ids)))
        True
    """
    params = _bare(params)
    scanned = "layers" in params
    abstract = nnx.eval_shape(lambda: DecoderNNX(config, scan_layers=scanned, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), nnx.to_pure_dict(state))
    given = jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)), dict(params))
    if given != expected:
        raise ValueError(f"params do not match the {config} decoder's paths, shapes and dtypes")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def params_of(model: DecoderNNX) -> dict[str, Any]:
    """The parameters of an nnx :class:`DecoderNNX` as the linen :class:`Decoder`'s tree.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn=48)
        >>> model = DecoderNNX(config, rngs=nnx.Rngs(0))
        >>> params = params_of(model)
        >>> sorted(params)
        ['embed_tokens', 'layers_0', 'lm_head', 'norm']
        >>> ids = jnp.array([[1, 2]])
        >>> bool(jnp.array_equal(Decoder(config).apply({"params": params}, ids), model(ids)))
        True
    """
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _bare(params: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return dict(params)


def stack_layers(params: Mapping[str, Any], config: DecoderConfig) -> dict[str, Any]:
    """Unrolled parameters (``layers_{i}``) as scanned ones (``layers``, stacked on axis 0).

    Example:
        >>> import numpy as np
        >>> p = {"layers_0": {"w": np.zeros(2)}, "layers_1": {"w": np.ones(2)}, "norm": 1}
        >>> stack_layers(p, DecoderConfig(n_layers=2))["layers"]["w"].tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """
    params = _bare(params)
    names = [f"layers_{i}" for i in range(config.n_layers)]
    missing = [n for n in names if n not in params]
    if missing or "layers" in params:
        raise ValueError(f"expected unrolled params with {names}; missing {missing}")
    rest = {k: v for k, v in params.items() if k not in names}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])}


def unstack_layers(params: Mapping[str, Any], config: DecoderConfig) -> dict[str, Any]:
    """Scanned parameters (``layers`` stacked on axis 0) as unrolled ones (``layers_{i}``).

    Example:
        >>> import numpy as np
        >>> p = {"layers": {"w": np.arange(4.0).reshape(2, 2)}}
        >>> unstack_layers(p, DecoderConfig(n_layers=2))["layers_1"]["w"].tolist()
        [2.0, 3.0]
    """
    params = _bare(params)
    if "layers" not in params:
        raise ValueError("expected scanned params with a 'layers' subtree")
    stacked = params.pop("layers")
    lengths = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
    if lengths != {config.n_layers}:
        raise ValueError(f"stacked leaves have leading sizes {lengths}, not {config.n_layers}")
    for i in range(config.n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


# --------------------------------------------------------------------------- generate


def generate(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    prompt_ids: jax.Array,
    steps: int,
) -> jax.Array:
    """Greedy decoding: appends the argmax token ``steps`` times.

    No key/value cache: every step runs the model over the whole fixed-length buffer
    (prompt plus ``steps`` slots), so one compiled program serves every step, at
    ``steps`` times a cached decoder's cost. The slots not yet written cannot change
    the logits read, because attention is causal.

    Args:
        apply_fn: ``apply_fn(params, ids) -> logits (batch, length, vocab)``, causal.
        params: Passed to ``apply_fn`` as they are (compressed leaves included).
        prompt_ids: Integer ``(batch, prompt_length)``, ``prompt_length >= 1``.
        steps: Tokens to append, ``>= 0``.

    Returns:
        ``(batch, prompt_length + steps)`` ids: the prompt, then the generated tokens.

    Raises:
        ValueError: For a prompt that is not integer 2-D and non-empty, or negative steps.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48)
        >>> model = Decoder(config)
        >>> prompt = jnp.array([[1, 2, 3]])
        >>> params = model.init(jax.random.key(0), prompt)["params"]
        >>> apply = lambda p, ids: model.apply({"params": p}, ids)
        >>> out = generate(apply, params, prompt, 4)
        >>> out.shape, out[:, :3].tolist()
        ((1, 7), [[1, 2, 3]])
        >>> first = int(jnp.argmax(apply(params, prompt)[0, -1]))
        >>> int(out[0, 3]) == first
        True
    """
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids must be integer (batch, length), got {prompt_ids.shape}")
    if prompt_ids.shape[1] < 1:
        raise ValueError("prompt_ids must hold at least one token")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    batch, start = prompt_ids.shape
    buffer = jnp.zeros((batch, start + steps), prompt_ids.dtype).at[:, :start].set(prompt_ids)
    return _greedy(apply_fn, start, steps, params, buffer)


# The params are an argument, not a constant baked into the program, and the same
# apply_fn (hashed by identity) reuses the compiled loop.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _greedy(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    start: int,
    steps: int,
    params: Any,
    buffer: jax.Array,
) -> jax.Array:
    def step(i: jax.Array, buffer: jax.Array) -> jax.Array:
        logits = apply_fn(params, buffer)
        last = lax.dynamic_index_in_dim(logits, start + i - 1, axis=1, keepdims=False)
        token = jnp.argmax(last, axis=-1).astype(buffer.dtype)
        return lax.dynamic_update_index_in_dim(buffer, token[:, None], start + i, axis=1)

    return lax.fori_loop(0, steps, step, buffer)


# --------------------------------------------------------------------------- checkpoints


def hf_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names and their PyTorch shapes (Linear weights ``(out, in)``).

    Example:
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48)
        >>> shapes = hf_shapes(config)
        >>> shapes["model.layers.1.self_attn.k_proj.weight"], shapes["lm_head.weight"]
        ((16, 32), (64, 32))
        >>> len(shapes)
        21
    """
    d, f, kv = config.dim, config.ffn, config.n_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab, d)}
    linear = {
        "self_attn.q_proj": (d, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, d),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (d,)
        for name, shape in linear.items():
            shapes[prefix + name + ".weight"] = shape
        shapes[prefix + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab, d)
    return shapes


def param_count(config: DecoderConfig) -> int:
    """Number of parameters of the decoder (embedding and head untied).

    Example:
        >>> {name: round(param_count(c) / 1e9, 2) for name, c in PRESETS.items()}
        {'1b': 1.1, '3b': 3.02, '7b': 6.74}
    """
    return sum(math.prod(shape) for shape in hf_shapes(config).values())


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def _our_path(name: str) -> tuple[tuple[str, ...], bool]:
    """Our param path for an HF tensor name, and whether the tensor is transposed."""
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding"), False
    if name == "model.norm.weight":
        return ("norm", "scale"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    match = _LAYER.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a Llama tensor name")
    layer, rest = f"layers_{match[1]}", match[2]
    if rest in _NORMS:
        return (layer, rest, "scale"), False
    return (layer, *rest.split("."), "kernel"), True


def from_hf(
    tensors: Mapping[str, Any], config: DecoderConfig, *, scan_layers: bool = False
) -> dict[str, Any]:
    """Hugging Face Llama tensors (as read from safetensors) as :class:`Decoder` params.

    Linear weights ``(out, in)`` become ``(in, out)`` kernels; dtypes are kept.

    Args:
        tensors: Tensor name -> array, every name of :func:`hf_shapes` ``(config)``.
        config: The model's config.
        scan_layers: Return the stacked ``layers`` tree of ``Decoder(scan_layers=True)``.

    Returns:
        The linen parameter tree.

    Raises:
        ValueError: A tensor is missing, extra, or of the wrong shape (named).

    Example:
        >>> import numpy as np
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn=48)
        >>> tensors = {k: np.zeros(s, np.float32) for k, s in hf_shapes(config).items()}
        >>> params = from_hf(tensors, config)
        >>> params["layers_0"]["mlp"]["down_proj"]["kernel"].shape
        (48, 32)
    """
    expected = hf_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"tensors do not match the config: missing {missing}, extra {extra}")
    params: dict[str, Any] = {}
    for name, shape in expected.items():
        value = tensors[name]
        if tuple(np.shape(value)) != shape:
            raise ValueError(f"{name} has shape {tuple(np.shape(value))}, expected {shape}")
        path, transpose = _our_path(name)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value).T if transpose else jnp.asarray(value)
    return stack_layers(params, config) if scan_layers else params


def _random_leaves(config: DecoderConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Each HF tensor in bfloat16, drawn row block by row block (float32 only per block)."""
    for index, (name, shape) in enumerate(hf_shapes(config).items()):
        if len(shape) == 1:  # RMSNorm weights start at one, as in Llama
            yield name, np.ones(shape, ml_dtypes.bfloat16)
            continue
        # One generator per tensor: its values do not depend on how files are sharded.
        rng = np.random.default_rng([seed, index])
        out = np.empty(shape, ml_dtypes.bfloat16)
        rows = max(1, (1 << 22) // shape[1])  # 16 MiB of float32 at a time
        for start in range(0, shape[0], rows):
            block = rng.standard_normal((min(rows, shape[0] - start), shape[1]), np.float32)
            out[start : start + rows] = (block * np.float32(_INIT_STD)).astype(ml_dtypes.bfloat16)
        yield name, out


def _hf_config(config: DecoderConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.ffn,
        "max_position_embeddings": config.max_len,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_checkpoint(
    directory: str | os.PathLike,
    config: DecoderConfig,
    *,
    seed: int = 0,
    max_shard_bytes: int = 1 << 30,
) -> list[pathlib.Path]:
    """Writes a random bfloat16 Llama checkpoint in Hugging Face's safetensors layout.

    Tensors are drawn one at a time from a generator seeded by ``(seed, tensor index)``
    (normal, std 0.02; RMSNorm weights one) and gathered into shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own), each written with
    ``safetensors`` as soon as it is full, so memory holds one shard, never the
    model. One shard is ``model.safetensors``; more are
    ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``
    (``weight_map`` and ``metadata.total_size``), as ``transformers`` writes them. A
    ``config.json`` (``LlamaConfig`` fields) goes beside them.

    Args:
        directory: Where to write; created if missing; existing checkpoint files in it
            are overwritten.
        config: The model's shape (its ``dtype`` is ignored: the file is bfloat16).
        seed: Seed of the random values.
        max_shard_bytes: Largest shard, in bytes of tensor data.

    Returns:
        The safetensors files written, in order.

    Raises:
        ImportError: The optional ``safetensors`` package is missing.
        ValueError: ``max_shard_bytes`` is not positive.

    Example:
        >>> import tempfile
        >>> from jaxcompress.io.interop import read_safetensors
        >>> config = DecoderConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     files = write_checkpoint(tmp, config, max_shard_bytes=8192)
        ...     tensors = {}
        ...     for file in files:
        ...         tensors |= read_safetensors(file, nested=False)
        >>> len(files), sum(t.size for t in tensors.values()) == param_count(config)
        (6, True)
        >>> tensors["model.layers.0.self_attn.q_proj.weight"].dtype
        dtype(bfloat16)
    """
    try:
        from safetensors.numpy import save_file  # optional: pip install safetensors
    except ImportError as error:
        raise ImportError(
            "write_checkpoint needs the optional safetensors package: pip install safetensors"
        ) from error
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Shard plan from the shapes alone, so names are known before anything is drawn.
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in hf_shapes(config).items():
        nbytes = 2 * math.prod(shape)
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    count = len(plan)
    files = [
        directory
        / ("model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
        for i in range(count)
    ]
    leaves = _random_leaves(config, seed)
    for file, names in zip(files, plan, strict=True):
        shard = dict(next(leaves) for _ in names)
        save_file(shard, str(file), metadata={"format": "pt"})
        del shard
    if count > 1:
        index = {
            "metadata": {"total_size": 2 * param_count(config)},
            "weight_map": {n: f.name for f, names in zip(files, plan, strict=True) for n in names},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(_hf_config(config), indent=2))
    return files
