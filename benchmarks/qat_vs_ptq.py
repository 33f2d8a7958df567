"""Quantization-aware training versus post-training quantization on the embedded digits.

Trains LeNet-300-100 and LeNet-5 densely (40 epochs, Adam 1e-3) for three seeds, then for
int4 and int3 per-channel (symmetric, absmax) compares:

* PTQ: ``jc.quantize(bits)`` applied to the trained dense params;
* dense +10, then PTQ: 10 more dense epochs (Adam 3e-4), then ``jc.quantize(bits)``, so
  QAT's gain is not just extra training;
* QAT: the same 10 epochs but the loss runs the forward pass through
  ``jc.training.fake_quant(bits)``; then converted with ``jc.quantize(bits)``.

The extra-dense and QAT runs share one training loop, data order and optimizer; they differ
only in the fake quantization. For QAT it also records the largest absolute difference
between the converted model's logits and the fake-quant forward pass (expected 0).

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/qat_vs_ptq.py
"""

from __future__ import annotations

import time

import _common
import jax
import jax.numpy as jnp
import numpy as np
from rich.progress import Progress

import jaxcompress as jc
from jaxcompress.examples.classifier import accuracy, fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet5, LeNet300100

SEEDS = (0, 1, 2)
EPOCHS = 40
EXTRA_EPOCHS = 10
EXTRA_LR = 3e-4
BITS = (4, 3)
METHODS = ("PTQ", f"dense +{EXTRA_EPOCHS} ep, then PTQ", f"QAT {EXTRA_EPOCHS} ep")


def _models():
    return {
        "LeNet-300-100": (LeNet300100(), True),
        "LeNet-5": (LeNet5(), False),
    }


def main() -> None:
    start = time.perf_counter()
    results = {}
    models = _models()
    # Per seed: 40 dense epochs + for each bit width 10 extra-dense + 10 QAT epochs.
    total = len(models) * len(SEEDS) * (EPOCHS + len(BITS) * 2 * EXTRA_EPOCHS)
    with Progress() as progress:
        task = progress.add_task("train + QAT + quantize", total=total)
        for model_name, (model, flatten) in models.items():
            train_x, train_y = load_digits(split="train", flatten=flatten)
            test_x, test_y = load_digits(split="test", flatten=flatten)
            apply = jax.jit(model.apply)
            accs = {"dense": []}
            ratios = {"dense": 1.0}
            max_diff = {}
            for seed in SEEDS:
                progress.update(task, description=f"{model_name} seed {seed}: dense")
                params = model.init(jax.random.key(seed), jnp.asarray(train_x[:1]))["params"]
                params = fit_classifier(
                    model, params, train_x, train_y, epochs=EPOCHS, learning_rate=1e-3, seed=seed
                )
                progress.advance(task, EPOCHS)
                accs["dense"].append(accuracy(model, params, test_x, test_y))
                for bits in BITS:
                    quantize = jc.quantize(bits, axis=-1)
                    fq = jc.training.fake_quant(bits, axis=-1)
                    ptq, extra, qat = METHODS
                    label = f"int{bits} per-channel"

                    compressed, _ = quantize(params)
                    accs.setdefault(f"{label} | {ptq}", []).append(
                        accuracy(model, compressed, test_x, test_y)
                    )
                    ratios[f"{label} | {ptq}"] = jc.summarize(params, compressed).ratio

                    progress.update(task, description=f"{model_name} seed {seed}: int{bits} dense")
                    more = fit_classifier(
                        model,
                        params,
                        train_x,
                        train_y,
                        epochs=EXTRA_EPOCHS,
                        learning_rate=EXTRA_LR,
                        seed=seed,
                        forward=None,
                    )
                    progress.advance(task, EXTRA_EPOCHS)
                    compressed, _ = quantize(more)
                    accs.setdefault(f"{label} | {extra}", []).append(
                        accuracy(model, compressed, test_x, test_y)
                    )
                    ratios[f"{label} | {extra}"] = jc.summarize(more, compressed).ratio

                    progress.update(task, description=f"{model_name} seed {seed}: int{bits} QAT")
                    trained = fit_classifier(
                        model,
                        params,
                        train_x,
                        train_y,
                        epochs=EXTRA_EPOCHS,
                        learning_rate=EXTRA_LR,
                        seed=seed,
                        forward=fq,
                    )
                    progress.advance(task, EXTRA_EPOCHS)
                    compressed, _ = quantize(trained)
                    accs.setdefault(f"{label} | {qat}", []).append(
                        accuracy(model, compressed, test_x, test_y)
                    )
                    ratios[f"{label} | {qat}"] = jc.summarize(trained, compressed).ratio
                    converted = apply({"params": jc.materialize(compressed)}, test_x)
                    fake = apply({"params": fq(trained)}, test_x)
                    diff = float(jnp.max(jnp.abs(converted - fake)))
                    max_diff[f"{label} | {qat}"] = max(max_diff.get(f"{label} | {qat}", 0.0), diff)
            results[model_name] = {
                key: {
                    "accuracy": values,
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                    "ratio": ratios[key],
                    **(
                        {"max_abs_logit_diff_converted_vs_fake_quant": max_diff[key]}
                        if key in max_diff
                        else {}
                    ),
                }
                for key, values in accs.items()
            }
    seconds = time.perf_counter() - start

    sections = []
    for model_name, rows in results.items():
        dense = rows["dense"]["mean"]
        table_rows = []
        for key, row in rows.items():
            recipe, _, method = key.partition(" | ")
            diff = row.get("max_abs_logit_diff_converted_vs_fake_quant")
            table_rows.append(
                [
                    recipe,
                    method,
                    f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}",
                    f"{100 * (dense - row['mean']):+.2f}" if key != "dense" else "",
                    f"{row['ratio']:.2f}x",
                    "" if diff is None else f"{diff:.1e}",
                ]
            )
        sections.append(
            f"## {model_name}\n\n"
            + _common.markdown_table(
                [
                    "recipe",
                    "method",
                    "test accuracy % (mean ± std, 3 seeds)",
                    "drop vs dense (points)",
                    "ratio",
                    "max abs logit diff, converted vs fake-quant",
                ],
                table_rows,
            )
        )
    body = (
        f"Dense models trained {EPOCHS} epochs with Adam (1e-3), seeds {list(SEEDS)}. "
        "Quantization is symmetric absmax per-channel (`axis=-1`) on the kernels; biases stay "
        f"float32. *PTQ*: `jc.quantize(bits)` on the dense params. *dense +{EXTRA_EPOCHS} ep, "
        f"then PTQ*: {EXTRA_EPOCHS} more dense epochs with Adam ({EXTRA_LR}), then quantize. "
        f"*QAT*: the same {EXTRA_EPOCHS} epochs (same loop, optimizer and data order) with the "
        "forward pass through `jc.training.fake_quant(bits)`, then converted with "
        "`jc.quantize(bits)`; the last column is the largest absolute logit difference on the "
        "test set between the converted model and the fake-quant forward (max over seeds). "
        "Drop is dense mean minus method mean. Ratio is whole-tree bytes before over true bytes "
        f"after. Whole run: {seconds:.0f} s.\n\n" + "\n\n".join(sections)
    )
    path = _common.write(
        "qat_vs_ptq",
        title="Quantization-aware training vs post-training quantization on digits",
        command=_common.command(__file__),
        body_markdown=body,
        data={"seconds": seconds, "models": results},
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
