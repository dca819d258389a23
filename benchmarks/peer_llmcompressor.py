"""sparselm's SparseGPT / Wanda against llm-compressor's on the same model, calibration and evaluation (CPU).

For every run (method x {unstructured 0.5, 2:4}) it
  (a) runs the peer script ``llmc_prune.py`` (shared/tools) with llm-compressor's own virtual environment,
  (b) runs ``sparselm compress`` on the same model, with a calibration file holding exactly the peer's
      calibration windows, and evaluation on the same validation file,
and evaluates both pruned models with one shared function on the peer's evaluation windows.

Calibration: the peer takes the first NSAMPLES consecutive windows of SEQLEN tokens of the calibration file;
sparselm's ``.txt`` path draws NSAMPLES random windows (seeded). To give both the same data, sparselm gets a
file with the text of exactly the peer's first NSAMPLES*SEQLEN tokens (it then has exactly NSAMPLES windows
and uses them all, in order); the token ids are checked to be identical.

Evaluation: the peer cuts ``range(0, len(ids) - seqlen, seqlen)`` windows of the whole file tokenized at once
(first 64), sparselm's ``evaluation_windows`` cuts consecutive windows of the same token stream; the ids are
checked to be identical. Perplexity is recomputed for both pruned models in this process with the peer's
formula (HF loss with labels, one window at a time) so no number depends on which tool evaluated it.

Layers: the peer is meant to prune every Linear except ``lm_head`` (sparselm prunes the linears inside the
decoder blocks, never lm_head/embeddings). With llm-compressor 0.14 the peer's ``ignore=["lm_head"]`` does not
match (the modifier matches the name ``"lm_head."``), so the script as written also prunes lm_head -- and with
tied embeddings the input embedding. The comparison therefore runs a copy of the peer script with
``ignore=["re:.*lm_head"]`` (llm-compressor's own advice) and, as a second row, the script as written.
The copy also saves the pruned linear weights so that masks and weights can be compared with sparselm's.

    python benchmarks/peer_llmcompressor.py --model sparselm/bundled/tiny-llama \\
        --calib /tmp/cmp/calib.txt --val /tmp/cmp/val.txt   # missing files: written from the stdlib split
Writes docs/benchmarks/peer_llmcompressor.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparselm import data, io as sio  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
RUNS = ["sparsegpt:0:0", "sparsegpt:2:4", "wanda:0:0", "wanda:2:4"]
PEER_IGNORE = 'ignore=["lm_head"]'
PEER_IGNORE_FIXED = 'ignore=["re:.*lm_head"]'
SAVE_HOOK = '''
import os as _os
if _os.environ.get("PEER_SAVE_WEIGHTS"):
    torch.save({n: m.weight.detach().clone() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)}, _os.environ["PEER_SAVE_WEIGHTS"])
'''


# --- the peer's windows and perplexity, verbatim in behaviour ----------------------------------------------
def peer_windows(tok, path: str, n: int, seqlen: int) -> list[list[int]]:
    ids = tok(open(path).read(), return_tensors=None)["input_ids"]
    return [ids[i:i + seqlen] for i in range(0, len(ids) - seqlen, seqlen)][:n]


@torch.no_grad()
def peer_ppl(model, wins: list[list[int]]) -> float:
    nll = cnt = 0.0
    for w in wins:
        x = torch.tensor([w])
        nll += model(input_ids=x, labels=x).loss.item() * (len(w) - 1)
        cnt += len(w) - 1
    return math.exp(nll / cnt)


# --- helpers -------------------------------------------------------------------------------------------------
def write_stdlib_text(path: Path, split: str, files: int | None = None) -> None:
    """If ``path`` is missing: the text of the split's stdlib files (sparselm's file split), joined by newlines."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in data.stdlib_files(split)[:files]]
    path.write_text("\n".join(texts), encoding="utf-8")
    print(f"wrote {path} ({len(texts)} {split} files)", flush=True)


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise RuntimeError("no JSON line in output:\n" + stdout[-2000:])


def run_cmd(cmd: list[str], env: dict | None = None, log: Path | None = None) -> tuple[dict, float]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if log:
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return last_json(p.stdout), wall


def peer_env(python: str) -> dict:
    code = ("import json, torch, transformers, importlib.metadata as md; print(json.dumps({'torch': torch.__version__,"
            " 'transformers': transformers.__version__, 'llmcompressor': md.version('llmcompressor'),"
            " 'compressed_tensors': md.version('compressed-tensors'), 'threads': torch.get_num_threads()}))")
    return last_json(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Dense float32 weights of the targeted linears (decoder blocks), keyed by qualified name."""
    out = {}
    for n, m in model.named_modules():
        if "lm_head" in n or not n.startswith("model.layers."):
            continue
        if isinstance(m, torch.nn.Linear):
            out[n] = m.weight.detach().float()
        elif hasattr(m, "dense_weight"):
            out[n] = m.dense_weight().detach().float()
    return out


def compare_weights(ours: dict[str, torch.Tensor], peer: dict[str, torch.Tensor]) -> dict:
    """Mask agreement (same zero pattern) and relative difference of the pruned weights."""
    same = total = 0
    diff = norm = 0.0
    per_layer = {}
    for n, w in ours.items():
        p = peer[n].float()
        agree = int(((w == 0) == (p == 0)).sum())
        per_layer[n] = agree / w.numel()
        same += agree
        total += w.numel()
        diff += float((w - p).pow(2).sum())
        norm += float(p.pow(2).sum())
    return {"mask_agreement": same / total, "weight_rel_diff": math.sqrt(diff / norm),
            "mask_agreement_per_layer": per_layer}


# --- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "sparselm" / "bundled" / "tiny-llama"))
    ap.add_argument("--calib", default="/tmp/cmp/calib.txt")
    ap.add_argument("--val", default="/tmp/cmp/val.txt")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows (the peer's fixed 64)")
    ap.add_argument("--runs", nargs="+", default=RUNS, help="METHOD:MASK, MASK 0:0 (unstructured 0.5) or 2:4")
    ap.add_argument("--llmc-python", default="/tmp/llmc/bin/python")
    ap.add_argument("--peer-script", default=str(ROOT.parent / "shared" / "tools" / "llmc_prune.py"))
    ap.add_argument("--no-peer-as-is", action="store_true", help="skip the unpatched peer script rows")
    ap.add_argument("--work", default="/tmp/cmp/work")
    ap.add_argument("--name", default="peer_llmcompressor")
    ap.add_argument("--docs", default=str(DOCS), help="where the .md/.json go")
    ap.add_argument("--repeats", type=int, default=3, help="timing runs per tool (llm-compressor with lm_head "
                    "ignored, sparselm); the table shows the fastest, the machine being shared")
    ap.add_argument("--from-json", help="reuse the quality rows of this earlier result; only add timing repeats")
    args = ap.parse_args()

    import transformers

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_stdlib_text(Path(args.calib), "train", files=200)
    write_stdlib_text(Path(args.val), "validation")
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        rows = result["rows"]
    else:
        result, rows = quality_phase(args, work)
    timing_phase(args, work, rows)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "peer": peer_env(args.llmc_python)}
    result.update(environment=env, repeats=max(len(r["seconds_runs"]) for r in rows))
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (docs / f"{args.name}.md").write_text(render(result))
    print(f"wrote {docs / (args.name + '.md')}")


def quality_phase(args, work: Path) -> tuple[dict, list[dict]]:
    """Prune with both tools once, evaluate both on the same windows, compare weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    N, L = args.nsamples, args.seqlen
    tok = AutoTokenizer.from_pretrained(args.model)

    # evaluation windows: the peer's vs sparselm's
    val_peer = peer_windows(tok, args.val, args.windows, L)
    val_ours = data.evaluation_windows(tok, args.val, L, args.windows)
    eval_identical = torch.equal(torch.tensor(val_peer), val_ours)

    # calibration: a file holding exactly the peer's first N windows
    calib_peer = peer_windows(tok, args.calib, N, L)
    flat = [t for w in calib_peer for t in w]
    calib_file = work / f"calib_first{N}x{L}.txt"
    calib_file.write_text(tok.decode(flat, clean_up_tokenization_spaces=False), encoding="utf-8")
    calib_ours = data.calibration_data(tok, str(calib_file), N, L, seed=0)
    calib_identical = torch.equal(torch.tensor(calib_peer), calib_ours)
    random_draw = data.calibration_data(tok, args.calib, N, L, seed=0)  # what --calib CALIB.txt would use
    overlap = len({tuple(r) for r in random_draw.tolist()} & {tuple(w) for w in calib_peer})
    print(f"eval windows identical: {eval_identical}; calibration windows identical: {calib_identical} "
          f"(the full file's seeded draw shares {overlap}/{N} windows with the peer's)", flush=True)
    if not (eval_identical and calib_identical):
        print("WARNING: token ids differ between the tools; the shared evaluation below still uses the peer's "
              "windows", flush=True)

    # peer script variants
    src = Path(args.peer_script).read_text()
    already_fixed = PEER_IGNORE_FIXED in src  # the shared script now ignores lm_head itself: run it unchanged
    if not already_fixed and PEER_IGNORE not in src:
        raise SystemExit(f"{args.peer_script} contains neither {PEER_IGNORE} nor {PEER_IGNORE_FIXED}; "
                         "update this benchmark")
    fixed_script, as_is_script = work / "llmc_prune_ignore_lm_head.py", work / "llmc_prune_as_is.py"
    fixed_script.write_text(src.replace(PEER_IGNORE, PEER_IGNORE_FIXED) + SAVE_HOOK)
    as_is_script.write_text(src + SAVE_HOOK)  # unchanged behaviour, only saves the pruned weights at the end
    variants = [("llm-compressor", fixed_script, "fixed")]
    if not args.no_peer_as_is and not already_fixed:
        variants.append(("llm-compressor, script as is", as_is_script, "asis"))

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    dense_ppl = peer_ppl(dense, val_peer)
    dense_w = linear_weights(dense)

    rows = []
    for run in args.runs:
        method, _, mask = run.partition(":")
        pattern = "unstructured 0.5" if mask == "0:0" else mask
        peer_w = None
        for tool, script, variant in variants:
            tag = f"{method}-{mask.replace(':', 'of')}-{variant}"
            wfile = work / f"peer-{tag}.pt"
            load = os.getloadavg()[0]
            print(f"[{run}] {tool} ...", flush=True)
            res, wall = run_cmd(peer_cmd(args, script, method, mask), {"PEER_SAVE_WEIGHTS": str(wfile)},
                                work / f"log-{tag}.txt")
            weights = torch.load(wfile)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            model.load_state_dict({f"{n}.weight": w for n, w in weights.items()}, strict=False)
            row = {"tool": tool, "variant": variant, "method": method, "pattern": pattern, "seconds": res["seconds"],
                   "wall_seconds": round(wall, 1), "loadavg_before": round(load, 2),
                   "ppl_before_own": res["perplexity_before"], "ppl_after_own": res["perplexity_after"],
                   "ppl_after_shared": peer_ppl(model, val_peer),
                   "sparsity_blocks": res["sparsity_measured"],
                   "lm_head_sparsity": float((weights["lm_head"] == 0).float().mean()),
                   "embedding_sparsity": float((model.model.embed_tokens.weight == 0).float().mean()),
                   "nsamples": res["nsamples"], "val_windows": res["val_windows"]}
            if variant == "fixed":
                peer_w = {n: w for n, w in weights.items() if n in dense_w}
                model.load_state_dict({f"{n}.weight": w.bfloat16().float() for n, w in peer_w.items()}, strict=False)
                row["ppl_after_shared_bf16_weights"] = peer_ppl(model, val_peer)  # as sparselm stores them
            del model
            print(f"    {json.dumps(row)}", flush=True)
            rows.append(row)

        out_dir = work / f"sparselm-{method}-{mask.replace(':', 'of')}"
        load = os.getloadavg()[0]
        print(f"[{run}] sparselm ...", flush=True)
        res, wall = run_cmd(sparselm_cmd(args, calib_file, method, mask, out_dir, True),
                            log=work / f"log-{method}-{mask.replace(':', 'of')}-sparselm.txt")
        model = sio.load(out_dir).eval()
        ours_w = linear_weights(model)
        row = {"tool": "sparselm", "variant": "sparselm", "method": method, "pattern": pattern,
               "seconds": res["compress_seconds"],
               "wall_seconds": round(wall, 1), "loadavg_before": round(load, 2),
               "ppl_before_own": res["perplexity_before"], "ppl_after_own": res["perplexity_after"],
               "sparsity_blocks": res["ratio_params"], "nsamples": N, "val_windows": args.windows,
               "ppl_after_shared": peer_ppl(model, val_peer), "lm_head_sparsity": 0.0,
               "embedding_sparsity": float((model.model.embed_tokens.weight == 0).float().mean())}
        if peer_w is not None:
            row.update(compare_weights(ours_w, peer_w))
            ref = sum(float(dense_w[n].pow(2).sum()) for n in ours_w)
            row["ours_change_vs_dense"] = math.sqrt(sum(float((ours_w[n] - dense_w[n]).pow(2).sum())
                                                        for n in ours_w) / ref)
            row["peer_change_vs_dense"] = math.sqrt(sum(float((peer_w[n] - dense_w[n]).pow(2).sum())
                                                        for n in ours_w) / ref)
        print(f"    {json.dumps(row)}", flush=True)
        rows.append(row)
        del model

    result = {"model": args.model, "calib": args.calib, "val": args.val, "nsamples": N, "seqlen": L,
              "eval_windows": args.windows, "eval_windows_identical": eval_identical,
              "calib_windows_identical": calib_identical, "seeded_draw_overlap": overlap,
              "dense_ppl_shared": dense_ppl, "calib_file_sparselm": str(calib_file), "rows": rows}
    return result, rows


def peer_cmd(args, script, method: str, mask: str) -> list[str]:
    return [args.llmc_python, str(script), args.model, args.calib, args.val, method, "0.5", mask,
            str(args.nsamples), str(args.seqlen)]


def sparselm_cmd(args, calib_file, method: str, mask: str, out_dir: Path, evaluate: bool) -> list[str]:
    knob = ["--sparsity", "0.5"] if mask == "0:0" else ["--pattern", mask]
    cmd = [str(Path(sys.executable).parent / "sparselm"), "compress", args.model, "--method", method, *knob,
           "--calib", str(calib_file), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--out", str(out_dir), "--overwrite", "--device", "cpu", "--json"]
    return cmd + (["--eval", "--eval-dataset", args.val] if evaluate else ["--no-eval"])


def timing_phase(args, work: Path, rows: list[dict]) -> None:
    """Repeat the one-shot of llm-compressor (lm_head ignored) and sparselm, interleaved; keep every time."""
    fixed_script = work / "llmc_prune_ignore_lm_head.py"
    calib_file = work / f"calib_first{args.nsamples}x{args.seqlen}.txt"
    for row in rows:
        row.setdefault("seconds_runs", [row["seconds"]])
        row.setdefault("loadavg_runs", [row["loadavg_before"]])
    for rep in range(1, args.repeats):
        for row in rows:
            if row["variant"] == "asis" or len(row["seconds_runs"]) > rep:
                continue
            mask = "0:0" if row["pattern"].startswith("unstructured") else row["pattern"]
            tag = f"{row['method']}-{mask.replace(':', 'of')}"
            load = os.getloadavg()[0]
            if row["variant"] == "fixed":
                res, _ = run_cmd(peer_cmd(args, fixed_script, row["method"], mask), log=work / f"log-{tag}-time.txt")
                secs = res["seconds"]
            else:
                res, _ = run_cmd(sparselm_cmd(args, calib_file, row["method"], mask, work / f"timing-{tag}", False),
                                 log=work / f"log-{tag}-sparselm-time.txt")
                secs = res["compress_seconds"]
            row["seconds_runs"].append(secs)
            row["loadavg_runs"].append(round(load, 2))
            print(f"[timing {rep}] {row['tool']} {tag}: {secs:.1f} s (load {load:.1f})", flush=True)
    for row in rows:
        row["seconds"] = min(row["seconds_runs"])
        row["seconds_median"] = statistics.median(row["seconds_runs"])


def render(r: dict) -> str:
    env, peer = r["environment"], r["environment"]["peer"]
    rows = r["rows"]
    source = Path(r["model"]) / "SOURCE.json"  # written by scripts/smollm2_to_hf.py: what the weights are
    said = json.loads(source.read_text()) if source.exists() else None
    model_note = f" (**{said['weights']}**: {said['note']})" if said else ""
    lines = [
        "# SparseGPT / Wanda: sparselm vs llm-compressor (same model, calibration and evaluation, CPU)",
        "",
        f"Model `{Path(r['model']).name}`{model_note} (float32 compute); calibration: the first {r['nsamples']} consecutive "
        f"windows of {r['seqlen']} tokens of `{Path(r['calib']).name}` for both tools (token ids checked "
        f"identical: {r['calib_windows_identical']}); evaluation: token-level perplexity on the first "
        f"{r['eval_windows']} non-overlapping {r['seqlen']}-token windows of `{Path(r['val']).name}` (ids "
        f"identical between the tools' windowing: {r['eval_windows_identical']}). Dense perplexity: "
        f"**{r['dense_ppl_shared']:.3f}**. Written by `benchmarks/peer_llmcompressor.py`.",
        "",
        f"Environment: {env['cpus']} CPU cores, 1-minute load average before the timed runs "
        f"{min(min(x['loadavg_runs']) for x in rows):.1f}–{max(max(x['loadavg_runs']) for x in rows):.1f} (the tools' "
        f"own previous runs; nothing else ran); {env['threads']} torch threads in both tools. "
        f"sparselm: torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}. "
        f"llm-compressor {peer['llmcompressor']} (compressed-tensors {peer['compressed_tensors']}) in its own venv: "
        f"torch {peer['torch']}, transformers {peer['transformers']}, {peer['threads']} threads.",
        "",
        f"| method | pattern | tool | one-shot s (fastest of {r['repeats']}; median) | ppl after | ppl after "
        "(tool's own eval) | sparsity in blocks | lm_head / embedding sparsity | mask agreement with llm-compressor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        agree = f"{row['mask_agreement']:.4f}" if "mask_agreement" in row else ""
        secs = (f"{row['seconds']:.1f}; {row['seconds_median']:.1f}" if len(row["seconds_runs"]) > 1
                else f"{row['seconds']:.1f} (1 run)")
        lines.append(f"| {row['method']} | {row['pattern']} | {row['tool']} | {secs} | "
                     f"{row['ppl_after_shared']:.3f} | {row['ppl_after_own']:.3f} | {row['sparsity_blocks']:.4f} | "
                     f"{row['lm_head_sparsity']:.3f} | {agree} |")
    lines += ["", "Quality, sparselm vs llm-compressor (same layers pruned):", ""]
    for row in rows:
        if row["tool"] != "sparselm":
            continue
        peer_row = next(p for p in rows if p["variant"] == "fixed" and p["method"] == row["method"]
                        and p["pattern"] == row["pattern"])
        d = 100 * (row["ppl_after_shared"] / peer_row["ppl_after_shared"] - 1)
        bf = peer_row.get("ppl_after_shared_bf16_weights")
        blocks: dict[str, list[float]] = {}
        for name, a in row.get("mask_agreement_per_layer", {}).items():
            blocks.setdefault(name.split(".")[2], []).append(a)
        per_block = ", ".join(f"{100 * sum(v) / len(v):.2f}" for v in blocks.values())
        lines.append(f"* {row['method']} {row['pattern']}: perplexity {row['ppl_after_shared']:.3f} vs "
                     f"{peer_row['ppl_after_shared']:.3f} ({d:+.2f} %)"
                     + (f"; llm-compressor's weights rounded to bf16 as sparselm stores them: {bf:.3f}" if bf else "")
                     + f"; masks agree on {100 * row['mask_agreement']:.2f} % of weights (by block: {per_block} %);"
                     f" relative weight difference "
                     f"{row['weight_rel_diff']:.4f} (each tool moved the weights by {row['ours_change_vs_dense']:.3f}"
                     f" / {row['peer_change_vs_dense']:.3f} of the dense norm); one-shot {row['seconds']:.1f} s vs "
                     f"{peer_row['seconds']:.1f} s.")
    lines += ["", NOTES.strip(), ""]
    return "\n".join(lines)


NOTES = """
## How the check was done

Both tools prune the same bf16 checkpoint computed in float32, from the same 64 x 256 calibration tokens, and are
scored by one function (`peer_ppl` in the benchmark, the peer script's own formula: mean HF loss with labels
over each window, weighted by its 255 predicted tokens) on the same windows; the peer's own numbers and
sparselm's `--eval` numbers are shown beside it as a consistency check. llm-compressor runs
`/work/shared/tools/llmc_prune.py` in its own virtual environment (a copy with `ignore=["re:.*lm_head"]` and a few
lines appended that save the pruned weights; the row "script as is" runs it with its original
`ignore=["lm_head"]`). sparselm runs `sparselm compress MODEL --method M --sparsity 0.5 | --pattern 2:4 --calib
FILE --nsamples 64 --seqlen 256 --eval --eval-dataset VAL --device cpu --json`, where FILE holds the text of exactly
the peer's 64 calibration windows (given the full calibration file, sparselm would draw 64 random windows with
seed 0 instead of the first 64). Pruned weights are compared layer by layer: "mask agreement" is the fraction
of weights that both tools zero or both keep.

"one-shot s" is the compression stage only, each tool timed by itself: llm-compressor's `oneshot(...)` call (its
dataset preparation, graph tracing into per-layer subgraphs, calibration, pruning and propagation) and
sparselm's pipeline `compress_seconds` (block-0 input capture, per-block statistics, pruning, propagation;
model loading, calibration tokenization, evaluation and saving excluded). The tools' runs alternate; the
table shows the fastest and the median of the repeats. On this 2-core machine repeated runs of the same
command differ by up to ~20 %, so differences below ~10 % are noise.

## What the numbers mean

* Layers. The peer script passes `ignore=["lm_head"]`; in llm-compressor 0.14 the modifier matches each target
  as `"<layer name>." + ""` (here `"lm_head."`), so the exact name never matches, and `lm_head` is pruned too. In
  this model `lm_head` is tied to the input embedding, so the script as written also zeroes half of the
  embedding (its `sparsity_measured` leaves lm_head out and does not show it). sparselm prunes only the linears
  of the decoder blocks. The like-for-like rows use `re:.*lm_head` (what llm-compressor's own warning advises).
  The shared script has since been changed to pass `re:.*lm_head` itself; the benchmark then runs it unchanged
  and there is no "script as is" row.
* Wanda: the same score (|W| times the L2 norm of the input feature), the same comparison groups (per output row
  for unstructured, per group of 4 inputs for 2:4); masks may differ only at ties / float32 vs float64 rounding
  of the norms.
* SparseGPT: the same algorithm (dampening 0.01 x mean diag H, block size 128, masks chosen from W^2/diag(Hinv)^2
  at block start or per 4-column group, OBS updates). Differences: llm-compressor forms H in float32 with a
  running 2/nsamples scale, sparselm sums in float64 and divides by the token count (a scalar scale does not
  change the result); llm-compressor's unstructured block threshold `score <= sorted[int(numel*s)]` prunes one
  weight more per block than sparselm's exact top-k; sparselm stores the updated weights in the checkpoint's
  dtype (bf16) while llm-compressor keeps them in float32 (the bf16-rounded column shows the size of that effect).
  Small float differences flip a few mask decisions and then propagate through the column sweep, so masks agree
  on most but not all weights and perplexities agree to within a few tenths of a percent.
* Speed: both tools run each block twice (statistics, then propagation of the pruned outputs). sparselm
  accumulates the full Gram XᵀX (float32 products per batch, summed in float64) once per distinct layer input
  (q/k/v share one, gate/up another): SparseGPT needs it, and it gives every layer's exact functional error
  ‖X(W−Ŵ)ᵀ‖ in the manifest, even for Wanda, whose llm-compressor version keeps only the squared input norms.
"""


if __name__ == "__main__":
    main()
