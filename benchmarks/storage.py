"""Bytes on disk: the targeted layers' tensors in the saved safetensors file vs the dense weights.

Measured from the files (the safetensors header gives every tensor's byte range), for fp32 and bf16
checkpoints of the bundled model, and checked against the ``stored`` ratio the manifest reports.

    python benchmarks/storage.py                # writes docs/benchmarks/storage.md and .json
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparselm import api, io  # noqa: E402
from sparselm import model as adapter  # noqa: E402

RUNS = [("magnitude", {"sparsity": 0.5}), ("magnitude", {"pattern": "2:4"}), ("magnitude", {"pattern": "4:8"}),
        ("svd-llm", {"ratio": 0.3}), ("rocket", {"ratio": 0.3}), ("cospadi", {"ratio": 0.3})]
FAST = {"cospadi": {"iters": 3}}  # bytes do not depend on how long the dictionary is trained


def measure(out: Path) -> dict:
    manifest = io.read_manifest(out)
    sizes = io.tensor_names_and_bytes(out / io.WEIGHTS)
    layers = manifest["layers"]
    stored = sum(b for k, b in sizes.items() if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias"))
    dense = sum(e["accounting"]["dense_bytes"] for e in layers.values())
    return {"file_fraction": stored / dense, "reported_fraction": 1 - manifest["totals"]["ratio_stored"],
            "file_bytes_targeted": stored, "dense_bytes_targeted": dense}


def bundled_as(dtype: torch.dtype, where: Path) -> Path:
    loaded = adapter.load_hf(None)
    model = loaded.model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(where)
    loaded.tokenizer.save_pretrained(where)
    return where


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            src = bundled_as(dtype, Path(tmp) / f"base-{dtype}")
            for method, knob in RUNS:
                recipe = api.build_recipe(method, knob.get("ratio"), knob.get("sparsity"), knob.get("pattern"), "uniform")
                recipe = dataclasses.replace(recipe, methods=tuple(dataclasses.replace(s, **FAST.get(s.name, {}))
                                                                   for s in recipe.methods))
                out = Path(tmp) / f"{method}-{dtype}-{len(rows)}"
                api.compress_model(str(src), recipe, nsamples=16, seqlen=128, out=str(out), evaluate_ppl=False)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "method": method, "knob": knob,
                             **measure(out)})
                print(json.dumps(rows[-1]), flush=True)
    docs = ROOT / "docs" / "benchmarks"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "storage.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Bytes on disk of the compressed layers", "",
             "Targeted layers' tensors (bias excluded) in the saved `model.safetensors`, read from the file "
             "header, divided by the dense weights' bytes in the same dtype; beside it the fraction the manifest "
             "reports (`1 - ratio_stored`). Bundled model, written by `benchmarks/storage.py`.", "",
             "| dtype | method | knob | file / dense | reported | difference |", "|---|---|---|---|---|---|"]
    for r in rows:
        knob = ", ".join(f"{k} {v}" for k, v in r["knob"].items())
        lines.append(f"| {r['dtype']} | {r['method']} | {knob} | {r['file_fraction']:.4f} | "
                     f"{r['reported_fraction']:.4f} | {abs(r['file_fraction'] - r['reported_fraction']):.2e} |")
    (docs / "storage.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
