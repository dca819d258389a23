"""Speed of structurally pruned models beside their dense base, through `sparselm bench` (`sparselm.bench.run`).

For each sparselm output directory: prefill and decode (``generate`` with the KV cache) tokens/s, compressed and
dense, interleaved; the kept widths; and the speed-up the removed widths predict for the linear layers alone
(dense bytes of the targeted layers / kept bytes). Writes docs/benchmarks/structured_speed.{json,md}.

    python benchmarks/structured_speed.py compressed/tiny-flap-uniform-r0.3 compressed/tiny-flap-uniform-r0.5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparselm import bench, io  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"


def widths(manifest: dict) -> str:
    """The kept widths of the first block, e.g. 'attn 3/4 groups, mlp 524/768'."""
    s = manifest["structured"]
    first = next(iter(s)).split(".self_attn")[0].split(".mlp")[0]
    out = []
    for name, e in s.items():
        if name.startswith(first + ".") and e["cols"] is not None:
            units = e["info"]["units"]
            out.append(f"{e['info']['kind']} {e['info']['kept_units']}/{units}")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", default="256,1000")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for d in args.dirs:
        manifest = io.read_manifest(d)
        r = bench.run(d, repeats=args.repeats, layer_tokens=(1, 512), prefill_tokens=tuple(map(int, args.prefill.split(","))),
                      batch_sizes=(1, 8), new_tokens=args.new_tokens, threads=1)
        totals = manifest["totals"]
        timed = [k for k, v in r["compressed"].items() if isinstance(v, dict) and "tokens_per_s" in v]
        rows.append({"dir": f"{Path(str(manifest.get('base_model'))).name}/{Path(d).name}", "model": manifest.get("base_model"), "method": manifest["recipe"]["methods"][0],
                     "widths": widths(manifest), "ratio_stored": totals["ratio_stored"],
                     "predicted": 1 / (1 - totals["ratio_stored"]),
                     "speedup_min": {k: r["dense"][k]["min_ms"] / r["compressed"][k]["min_ms"] for k in timed},
                     "speedup_median": r["speedup"],
                     "compressed_ms": {k: r["compressed"][k]["min_ms"] for k in timed},
                     "dense_ms": {k: r["dense"][k]["min_ms"] for k in timed}, "threads": r["threads"],
                     "layers": [{"layer": x["layer"], "tokens": x["tokens"],
                                 "speedup_min": x["spread"]["dense_linear"]["min_ms"] / x["spread"]["compressed"]["min_ms"]}
                                for x in r["layers"] if "dense_linear" in x["spread"]],
                     "repeats": args.repeats})
        print(json.dumps(rows[-1]), flush=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "structured_speed.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    keys = list(rows[0]["speedup_min"])
    lines = ["# Structured pruning: speed beside the dense model", "",
             f"`sparselm bench` internals (`bench.run`: compressed and dense runs interleaved, {args.repeats} timed runs "
             "each after a warm-up, one CPU thread). The machine is a 2-core one shared with other jobs (load 5–10), so "
             "the speed-ups use the **fastest** run of each (medians, in the JSON, are noisier). `predicted`: dense "
             "bytes / kept bytes of the pruned linears, the speed-up if those layers were all the time (embeddings, "
             "norms, attention scores, the LM head and `generate`'s own overhead are not narrowed). Written by "
             "`benchmarks/structured_speed.py`.", "",
             "| run | kept widths (block 0) | ratio stored | predicted | " + " | ".join(f"{k} speed-up" for k in keys)
             + " | " + " | ".join(f"{k} ms (dense)" for k in keys) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(keys))]
    for r in rows:
        lines.append(f"| `{r['dir']}` | {r['widths']} | {r['ratio_stored']:.3f} | {r['predicted']:.2f}× | "
                     + " | ".join(f"{r['speedup_min'][k]:.2f}×" for k in keys) + " | "
                     + " | ".join(f"{r['compressed_ms'][k]:.0f} ({r['dense_ms'][k]:.0f})" for k in keys) + " |")
    lines += ["", "Per layer (`sparselm bench`'s layer rows: one narrowed layer against the dense layer it replaced, "
              "fastest run of each):", "", "| run | layer | tokens | speed-up |", "|---|---|---|---|"]
    for r in rows:
        for x in r["layers"]:
            lines.append(f"| `{r['dir']}` | {x['layer']} | {x['tokens']} | {x['speedup_min']:.2f}× |")
    (DOCS / "structured_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
