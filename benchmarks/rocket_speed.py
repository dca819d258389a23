"""ROCKET + knapsack profiling speed: the per-layer option table (14 ratios × 5 ks = 70 factorizations) on
SmolLM2-135M-Instruct layers (weights dequantized from the Q4_1 GGUF, `scripts/smollm2_to_hf.py`), the current
code against an earlier revision's `sparselm/methods/rocket.py`, interleaved A/B in one process (CPU time of
this process, one thread: robust to a shared machine's load, not immune to it).

    python benchmarks/rocket_speed.py --baseline 532d3de --blocks 3 15 27

Writes docs/benchmarks/rocket_speed.{md,json}: seconds per layer for both, the speedup, and how far the option
tables differ (largest relative error difference; how many ratios chose the same spec).

``--whole N`` instead times the whole ROCKET + knapsack run (`pipeline.compress`: profile walk, knapsack,
compression walk) on the model cut to its first N blocks, the baseline revision's whole ``sparselm`` package
(``git archive``) against the working tree, each in its own one-thread subprocess, alternating, CPU seconds;
it checks that both chose the same spec for every layer and writes docs/benchmarks/rocket_whole.{md,json}.
``--threads T`` (T > 1) runs both with T threads, as the CLI does on this machine, and times wall seconds
instead (CPU seconds add the threads up); it writes rocket_whole_t{T}.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparselm import blocks, data, device, pipeline, profile  # noqa: E402
from sparselm import model as adapter  # noqa: E402
from sparselm.config import Allocate, Ratio, Recipe, RocketSpec  # noqa: E402
from sparselm.methods import rocket as current  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"


def baseline_module(rev: str):
    """``sparselm/methods/rocket.py`` as of git revision ``rev``, imported as a package sibling of the current one."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:sparselm/methods/rocket.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "rocket_baseline.py"
    path.write_text(source.replace("@register(RocketSpec)\n", ""))  # do not re-register the method
    spec = importlib.util.spec_from_file_location("sparselm.methods.rocket_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def table(impl, W, stats, dtype):
    profile.factorize, profile.whitened_svd = impl.factorize, impl.whitened_svd
    t = time.process_time()
    opts = profile.profile_layer(W, stats, [RocketSpec(target=Ratio(0.3))], dtype=dtype)
    return time.process_time() - t, opts


WHOLE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from sparselm import pipeline, data, model as adapter
from sparselm.config import Allocate, Ratio, Recipe, RocketSpec
torch.set_num_threads(int(sys.argv[6]))
n = int(sys.argv[3])
loaded = adapter.load_hf(sys.argv[2])
net = loaded.model
prefix, blocks = adapter.find_blocks(net)
del blocks[n:]
net.config.num_hidden_layers = n
calib = data.calibration_data(loaded.tokenizer, "stdlib", int(sys.argv[4]), 256, seed=0)
recipe = Recipe(methods=(RocketSpec(target=Ratio(float(sys.argv[5]))),), allocate=Allocate.KNAPSACK)
t, wall = time.process_time(), time.perf_counter()
rep = pipeline.compress(net, calib, recipe, torch.device("cpu"), loaded.storage_dtype)
cpu, wall = time.process_time() - t, time.perf_counter() - wall
spec = lambda m: [m.spec.ks, m.spec.target.value] if getattr(m, "spec", None) else None  # old modules lack it
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "specs": {l.name: spec(l.module) for l in rep.layers},
                  "errors": {l.name: l.rel_error for l in rep.layers}}))
"""


def whole(args) -> None:
    """``--whole``: the whole run, baseline package vs working tree (see the module docstring)."""
    base = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "sparselm"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    runs = {"baseline": [], "current": []}
    clock, unit = ("cpu_s", "CPU s") if args.threads == 1 else ("wall_s", "wall s")
    what = ("CPU seconds of a one-thread subprocess" if args.threads == 1 else
            f"wall seconds of a {args.threads}-thread subprocess with nothing else running")
    stem = "rocket_whole" if args.threads == 1 else f"rocket_whole_t{args.threads}"
    for label, tree in (("baseline", base), ("current", ROOT)) * args.repeats:
        out = subprocess.run([sys.executable, "-c", WHOLE, str(tree), args.model, str(args.whole), str(args.nsamples),
                              str(args.ratio), str(args.threads)], check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(tree)}).stdout
        runs[label].append(json.loads(out.strip().splitlines()[-1]))
        print(label, runs[label][-1][clock], flush=True)
    secs = {k: min(r[clock] for r in v) for k, v in runs.items()}
    a, b = runs["baseline"][0], runs["current"][0]
    recorded = any(sp is not None for sp in a["specs"].values())  # modules before 2026-12-02 record no spec
    same = sum(a["specs"].get(n) == sp for n, sp in b["specs"].items())
    worst = max(abs(b["errors"][n] - a["errors"][n]) / max(a["errors"][n], 1e-12) for n in b["errors"] if n in a["errors"])
    payload = {"model": "SmolLM2-135M-Instruct, weights dequantized from Q4_1 GGUF", "baseline": args.baseline,
               "blocks": args.whole, "nsamples": args.nsamples, "ratio": args.ratio, "torch": torch.__version__,
               "cpu": device.cpu_name(), "threads": args.threads,
               clock: secs, "runs": {k: [r[clock] for r in v] for k, v in runs.items()},
               "speedup": secs["baseline"] / secs["current"],
               "same_spec": f"{same}/{len(b['specs'])}" if recorded else None,
               "layers_compressed": [len(a["specs"]), len(b["specs"])], "max_rel_error_diff": worst}
    (DOCS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (DOCS / f"{stem}.md").write_text("\n".join([
        f"# ROCKET + knapsack, whole run: current code vs {args.baseline}", "",
        f"`pipeline.compress` (profile walk, knapsack, compression walk) with ROCKET at ratio {args.ratio}, knapsack "
        f"allocation, on SmolLM2-135M-Instruct (**weights dequantized from Q4_1 GGUF**) cut to its first "
        f"{args.whole} blocks, {args.nsamples} × 256 stdlib calibration tokens; {what}, baseline and current "
        f"alternating ({args.repeats}× each, the minimum). CPU: {payload['cpu']}; "
        f"torch {torch.__version__}. "
        "Written by `benchmarks/rocket_speed.py --whole`.", "",
        f"| code | {unit} (runs) | speedup |", "|---|---|---|",
        f"| {args.baseline} | {secs['baseline']:.1f} ({', '.join(f'{x:.1f}' for x in payload['runs']['baseline'])}) | 1.00× |",
        f"| current | {secs['current']:.1f} ({', '.join(f'{x:.1f}' for x in payload['runs']['current'])}) | "
        f"**{payload['speedup']:.2f}×** |", "",
        (f"Same spec (ks, ratio) chosen for {payload['same_spec']} compressed layers; " if recorded else
         f"The baseline's modules record no spec (ks, ratio), so only the errors are compared: ")
        + f"measured per-layer errors differ by at most {worst:.1e} relative."]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/smollm2", help="SmolLM2 directory from scripts/smollm2_to_hf.py")
    ap.add_argument("--baseline", required=True, help="git revision whose rocket.py is the baseline")
    ap.add_argument("--blocks", type=int, nargs="+", default=[3])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--whole", type=int, default=0, help="time the whole run on the first N blocks instead")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="threads of the --whole runs (>1: wall seconds)")
    args = ap.parse_args()
    if args.whole:
        return whole(args)
    torch.set_num_threads(1)
    old = baseline_module(args.baseline)
    loaded = adapter.load_hf(args.model)
    calib = data.calibration_data(loaded.tokenizer, "stdlib", args.nsamples, 256, seed=0)
    names = pipeline.targets(loaded.model, Recipe(methods=(RocketSpec(target=Ratio(0.3)),), allocate=Allocate.KNAPSACK))
    names = [n if i in args.blocks else [] for i, n in enumerate(names)]
    rows = []
    for win in blocks.walk(loaded.model, calib, names, torch.device("cpu"), 8):
        for name in win.names:
            W = adapter.linear_weight(adapter.get_module(loaded.model, name)).detach().float()
            secs = {"baseline": 0.0, "current": 0.0}
            opts = {}
            for label, impl in (("baseline", old), ("current", current)) * 2:  # interleaved, twice each
                dt, opts[label] = table(impl, W, win.stats[name], loaded.storage_dtype)
                secs[label] += dt / 2
            diff = max(abs(a.error - b.error) / max(a.error, 1e-12) for a, b in zip(opts["baseline"], opts["current"]))
            same = sum(a.payload == b.payload for a, b in zip(opts["baseline"], opts["current"]))
            rows.append({"layer": name, "shape": list(W.shape), "baseline_s": round(secs["baseline"], 3),
                         "current_s": round(secs["current"], 3), "max_rel_error_diff": diff,
                         "same_spec": f"{same}/{len(opts['current'])}"})
            print(json.dumps(rows[-1]), flush=True)
    total = {k: sum(r[f"{k}_s"] for r in rows) for k in ("baseline", "current")}
    payload = {"model": "SmolLM2-135M-Instruct, weights dequantized from Q4_1 GGUF", "baseline": args.baseline,
               "blocks": args.blocks, "torch": torch.__version__, "rows": rows, "total_s": total,
               "speedup": total["baseline"] / total["current"]}
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "rocket_speed.json").write_text(json.dumps(payload, indent=1))
    lines = ["# ROCKET + knapsack profiling: current code vs " + args.baseline, "",
             "Per layer, the option table of `profile_layer` for ROCKET (14 ratios × 5 ks = 70 factorizations), "
             "CPU seconds of one thread, interleaved A/B (two runs each, mean), on SmolLM2-135M-Instruct "
             f"(weights dequantized from Q4_1 GGUF), blocks {args.blocks}, {args.nsamples}×256 calibration tokens. "
             f"torch {torch.__version__}. Written by `benchmarks/rocket_speed.py`.", "",
             "| layer | shape | baseline s | current s | speedup | max rel. error diff | same spec |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['baseline_s']:.2f} | {r['current_s']:.2f} | "
                     f"{r['baseline_s'] / r['current_s']:.2f}× | {r['max_rel_error_diff']:.1e} | {r['same_spec']} |")
    lines.append(f"| **total** | | {total['baseline']:.2f} | {total['current']:.2f} | **{payload['speedup']:.2f}×** | | |")
    (DOCS / "rocket_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
