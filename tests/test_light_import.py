"""``import jaxcompress`` stays light: flax, optax, rich and the examples load only when used.

Each check runs in a fresh interpreter, since this test process has loaded them all. How long
the import takes is measured by ``benchmarks/import_time.py``, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Loaded only on first use: third-party packages for training, the demos, tables and
# bars, files from flax; and the parts of jaxcompress that need them.
LAZY = (
    "flax",
    "optax",
    "rich",
    "msgpack",
    "sklearn",
    "matplotlib",
    "orbax",
    "tokenizers",
    "safetensors",
    "jaxcompress.training",
    "jaxcompress.runtime.lora_serving",
    "jaxcompress.examples",
    "jaxcompress.cli",
)


def _run(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter on this checkout; returns the JSON it prints."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_optional_parts_and_lazy_names_still_work():
    out = _run(
        f"""
        import json, sys
        import jax.numpy as jnp
        import numpy as np
        import jaxcompress as jc

        lazy = {LAZY!r}
        def loaded():
            return sorted(m for m in lazy if m in sys.modules)

        after_import = loaded()
        params = {{"dense": {{"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}}}
        compressed, _ = jc.quantize(4)(jc.prune(0.5)(params)[0])
        import tempfile, os
        with tempfile.TemporaryDirectory() as tmp:
            jc.save(os.path.join(tmp, "m.jc"), compressed)
            loaded_back = jc.load(os.path.join(tmp, "m.jc"))
        same = bool(np.array_equal(jc.materialize(loaded_back)["dense"]["kernel"],
                                   jc.materialize(compressed)["dense"]["kernel"]))
        after_save_load = loaded()

        report = jc.summarize(params, compressed)
        table = str(report)
        pruned = jc.training.pruned
        import jaxcompress.training
        from jaxcompress import training
        print(json.dumps({{
            "after_import": after_import,
            "after_save_load": after_save_load,
            "same": same,
            "table": "dense/kernel" in table and "total" in table,
            "ratio": report.ratio,
            "pruned": pruned.__module__,
            "same_training": jaxcompress.training is jc.training is training,
            "minilm": jc.minilm.__name__,
            "accelerate_lora": jc.accelerate_lora.__module__,
            "in_dir": [name for name in ("training", "minilm") if name in dir(jc)],
        }}))
        """
    )
    assert out["after_import"] == []
    # Saving shows a (disabled) rich bar; a plain tree needs no flax to be written or read.
    assert "flax" not in out["after_save_load"]
    assert out["same"]
    assert out["table"] and out["ratio"] > 1
    assert out["pruned"] == "jaxcompress.training.pruning"
    assert out["same_training"]
    assert out["minilm"] == "jaxcompress.examples.minilm"
    assert out["accelerate_lora"] == "jaxcompress.runtime.lora_serving"
    assert out["in_dir"] == ["training", "minilm"]


def test_unknown_attribute_still_raises():
    out = _run(
        """
        import json
        import jaxcompress as jc
        try:
            jc.no_such_name
        except AttributeError as error:
            print(json.dumps({"error": str(error)}))
        """
    )
    assert out["error"] == "module 'jaxcompress' has no attribute 'no_such_name'"
