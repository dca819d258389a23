"""`sparselm` command line: thin wrappers over `sparselm.api`. The only module that prints.

Exit codes: 0 success; 2 bad input (the message names what, where, what was expected, how to fix);
1 unexpected failure. With ``--json`` the last stdout line is one JSON object.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress pretrained transformers without retraining: pruning, low rank, sparse dictionaries.")
err = Console(stderr=True, soft_wrap=True)
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 220)


def _run(fn, as_json: bool, show) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers
    transformers.utils.logging.set_verbosity_error()  # their load reports and progress bars are noise here
    transformers.utils.logging.disable_progress_bar()
    try:
        from . import kernels
        kernels.check_environment()  # every command runs compressed layers (or compresses): fail before the work
        result = fn()
    except InputError as e:
        err.print(f"[bold red]error:[/] {escape(e.what)}")
        if e.fix:
            err.print(f"[bold]fix:[/] {escape(e.fix)}")
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err.print("interrupted: no output was written (compress: rerun with --resume to continue from the last "
                  "finished block)")
        raise typer.Exit(130)
    from . import dist
    if dist.rank() != 0:  # several processes (torchrun): rank 0 reports for all
        return
    if as_json:
        print(json.dumps(result, default=str))
    else:
        show(result)


def _progress_bar():
    bar = Progress(TextColumn("[bold]compressing[/] block {task.completed}/{task.total}"), BarColumn(),
                   TimeElapsedColumn(), console=err, transient=False)
    task = {}

    def update(done: int, total: int):
        from . import dist
        if dist.rank() != 0:  # several processes: one bar
            return
        if not task:
            bar.start()
            task["id"] = bar.add_task("blocks", total=total)
        bar.update(task["id"], completed=done)
        if done == total:
            bar.stop()
    return update


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="hub id or local HF directory; omitted: the bundled tiny model"),
    method: Optional[str] = typer.Option(None, help="magnitude|wanda|sparsegpt|gqsa|gptq|svd|asvd|svd-llm|cospadi|"
                                                   "rocket|flap|ziplm "
                                                   "(default: rocket; rocket runs with knapsack allocation and "
                                                   "--ratio 0.2 unless told otherwise)"),
    ratio: Optional[float] = typer.Option(None, help="fraction of the targeted layers' stored bytes removed"),
    sparsity: Optional[float] = typer.Option(None, help="pruning: fraction of weights set to zero"),
    pattern: Optional[str] = typer.Option(None, help="pruning: N:M semi-structured pattern, e.g. 2:4"),
    refine: Optional[str] = typer.Option(None, help="pruning: refine the mask: dsnot (DSnoT swaps, each lowering the "
                                                   "exact error) or dsnot-mean (the paper's test); default none"),
    storage: Optional[str] = typer.Option(None, help="how the values are stored, every format: dtype (the model's, "
                                                     "default) | bf16 | fp16 | bf16-14bit | int8 | int4 (counted in "
                                                     "--ratio with their scales)"),
    quant_group: Optional[int] = typer.Option(None, help="int8/int4: inputs sharing one scale (0: one per row, "
                                                         "the default; gqsa: 16, gptq: 128)"),
    calib: Optional[str] = typer.Option(None, help="stdlib | FILE.txt | FILE.jsonl | wikitext2 | c4 (default: "
                                                   "the recipe's calibration.source, else stdlib)"),
    nsamples: Optional[int] = typer.Option(None, help="calibration windows (default 64 bundled, 128 otherwise)"),
    seqlen: Optional[int] = typer.Option(None, help="calibration window length (default 256 bundled, 2048 otherwise)"),
    allocate: Optional[str] = typer.Option(None, help="uniform | knapsack (default: knapsack for rocket, the "
                                                       "default method; uniform for every other method)"),
    out: Optional[str] = typer.Option(None, help="output directory (default compressed/<model>-<method>-<knob>)"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory written by sparselm"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    recipe: Optional[str] = typer.Option(None, help="YAML recipe (methods, allocate, targets, ignore)"),
    resume: bool = typer.Option(False, help="continue an interrupted run with the same settings from its last "
                                            "finished block"),
    eval: Optional[bool] = typer.Option(None, "--eval/--no-eval", help="perplexity before/after (default: on "
                                                                        "for the bundled model)"),
    eval_dataset: str = typer.Option("stdlib", help="held-out text for --eval"),
    batch_size: Optional[int] = typer.Option(None, help="calibration / evaluation batch size (default 8)"),
    seed: Optional[int] = typer.Option(None, help="calibration sampling seed (default 0)"),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own code (off by default)"),
    tasks: Optional[str] = typer.Option(None, help="lm-eval task scores before and after (names, YAML files or "
                                                   "task directories, comma-separated; needs .[eval])"),
    num_fewshot: Optional[int] = typer.Option(None, help="lm-eval few-shot examples (default: each task's own)"),
    limit: Optional[float] = typer.Option(None, help="lm-eval: first N examples per task (< 1: a fraction)"),
    offload_activations: Optional[str] = typer.Option(None, help="keep the calibration activations between "
                                                                 "blocks on disk in a private folder under DIR "
                                                                 "(removed after the run): for models whose "
                                                                 "activations do not fit in memory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
):
    """Compress a model layer by layer and save it (with recipe.yaml, report.html and a model card README.md).

    Examples:
        sparselm compress
        sparselm compress ./my-llama --method sparsegpt --sparsity 0.5 --calib notes.txt --out pruned/
        sparselm compress --method gqsa --sparsity 0.5 --storage int4 --quant-group 16
    """
    from . import api

    def work():
        r = api.build_recipe(method, ratio, sparsity, pattern, allocate, recipe, refine, storage, quant_group)
        return api.compress_model(model, r, calib, nsamples, seqlen, out, overwrite, device, eval, eval_dataset,
                                  batch_size=batch_size, seed=seed, trust_remote_code=trust_remote_code,
                                  progress=None if as_json else _progress_bar(), resume=resume, tasks=tasks,
                                  num_fewshot=num_fewshot, limit=_limit(limit),
                                  offload_activations=offload_activations)

    _run(work, as_json, _show_compressed)


def _show_compressed(s: dict) -> None:
    """`compress`'s human summary of its result `s` (the --json object)."""
    console.print(f"compressed {s['model']} with {s['method']} ({s['allocate']}) in {s['compress_seconds']:.1f}s "
                  f"-> {s['out']}")
    console.print(f"ratio removed: stored {s['ratio_stored']:.3f}  params {s['ratio_params']:.3f}  "
                  f"paper {s['ratio_paper']:.3f}")
    if "perplexity_after" in s:
        console.print(f"perplexity: before {s['perplexity_before']:.3f}  after {s['perplexity_after']:.3f}")
    for task, after in (s.get("tasks_after") or {}).items():
        before = s["tasks_before"].get(task, {})
        console.print(f"{task}: " + "  ".join(f"{k} {before.get(k, float('nan')):.4f} -> {v:.4f}"
                                              for k, v in after.items() if isinstance(v, float)))
    console.print(f"report: {s['out']}/report.html")


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Argument(None, help="sparselm output dir, HF dir or hub id; omitted: bundled"),
    dataset: str = typer.Option("stdlib", help="stdlib | FILE.txt | FILE.jsonl | wikitext2 | c4"),
    seqlen: int = typer.Option(512, help="window length"),
    max_windows: int = typer.Option(64, help="first N non-overlapping windows (0: all)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    batch_size: int = typer.Option(8),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own code (off by default)"),
    tasks: Optional[str] = typer.Option(None, help="lm-eval tasks, in process: names (piqa,hellaswag,...), task "
                                                   "YAML files or task directories, comma-separated (needs "
                                                   "pip install -e '.[eval]')"),
    num_fewshot: Optional[int] = typer.Option(None, help="lm-eval few-shot examples (default: each task's own)"),
    limit: Optional[float] = typer.Option(None, help="lm-eval: first N examples per task (< 1: a fraction); "
                                                     "for quick checks, not for reported numbers"),
    include_path: Optional[str] = typer.Option(None, help="lm-eval: extra directory of task YAMLs"),
    fidelity: bool = typer.Option(False, help="agreement with the dense base model named in the manifest: "
                                              "block/final hidden-state error, top-1 agreement and KL (causal), "
                                              "embedding cosine and nearest-neighbour agreement (encoders)"),
    record: bool = typer.Option(False, help="add the results to the directory's sparselm.json and rebuild its "
                                            "report.html and README.md"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Token-level perplexity with the pinned protocol (non-overlapping windows, none skipped); optionally
    lm-eval task scores (--tasks) and fidelity to the dense model (--fidelity).

    Examples:
        sparselm eval pruned/ --dataset held_out.txt --seqlen 512 --json
        sparselm eval pruned/ --tasks piqa,hellaswag,arc_easy --json
        sparselm eval pruned/ --fidelity
    """
    from . import api
    _run(lambda: api.evaluate_model(model, dataset, seqlen, max_windows or None, device, batch_size,
                                    trust_remote_code, tasks, num_fewshot, _limit(limit), include_path, fidelity,
                                    record),
         as_json, _show_eval)


def _limit(limit: float | None):
    """lm-eval reads an int as a count and a float below 1 as a fraction."""
    return int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit


def _show_eval(r: dict) -> None:
    if "perplexity" in r:
        console.print(f"perplexity {r['perplexity']:.4f} on {r['dataset']} ({r['windows']} windows x "
                      f"{r['seqlen']} tokens, {r['tokens']} predicted tokens)")
    fid = r.get("fidelity")
    if fid:
        parts = [f"final hidden-state error {fid['final_rel_error']:.4f}",
                 "block errors " + " ".join(f"{e:.4f}" for e in fid["block_rel_error"])]
        for key in ("top1_agreement", "kl_nats_per_token", "embedding_cosine", "nn_agreement"):
            if fid.get(key) is not None:
                parts.append(f"{key} {fid[key]:.4f}")
        console.print(f"fidelity to {fid['base_model']}: " + "; ".join(parts))
    for task, scores in (r.get("lm_eval") or {}).get("tasks", {}).items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))
        note = "  (word perplexity: lm-eval's, not the token-level one above)" if "word_perplexity" in scores else ""
        console.print(f"{task}: {shown}{note}")


@app.command()
def inspect(directory: str = typer.Argument(..., help="a sparselm output directory"),
            as_json: bool = typer.Option(False, "--json")):
    """Per-layer table (class, method, bytes, ratios, error) and the three overall ratios."""
    from . import api

    def show(r):
        t = Table(title=f"{r['dir']} (from {r['base_model']}, {r['storage_dtype']})")
        cols = ("layer", "class", "method", "target", "k/s", "shape", "stored", "dense", "r_stored", "r_params",
                "err", "predicted")
        for col in cols:
            t.add_column(col, justify="left" if col in cols[:4] else "right")

        def num(v):
            return "" if v is None else f"{v:.4f}"
        for row in r["layers"]:
            target = row["target"] or {}
            t.add_row(row["layer"], row["class"], row["method"], " ".join(f"{k} {v}" for k, v in target.items()),
                      f"{row['k']}/{row['s']}" if row.get("k") else "", "x".join(map(str, row["shape"])),
                      str(row["stored_bytes"]), str(row["dense_bytes"]), f"{row['ratio_stored']:.3f}",
                      f"{row['ratio_params']:.3f}", num(row["rel_error"]), num(row["predicted_error"]))
        console.print(t)
        console.print(f"ratio removed: stored {r['ratio_stored']:.4f}  params {r['ratio_params']:.4f}  "
                  f"paper {r['ratio_paper']:.4f}")
        if r.get("evaluation"):
            ev = r["evaluation"]
            console.print(f"perplexity ({ev['dataset']}, {ev['windows']}x{ev['seqlen']}): before "
                      f"{ev['perplexity_before']:.3f} after {ev['perplexity_after']:.3f}")
    _run(lambda: api.inspect_dir(directory), as_json, show)


@app.command()
def export(directory: str = typer.Argument(..., help="a sparselm output directory"),
           out_dir: str = typer.Option(..., "--out", help="where to write the dense HF directory"),
           overwrite: bool = typer.Option(False, help="replace an earlier export (never anything else)"),
           trust_remote_code: bool = typer.Option(False, help="allow the model's own code (off by default)"),
           as_json: bool = typer.Option(False, "--json")):
    """Write a plain dense HF directory (loads with from_pretrained in any tool)."""
    from . import api
    _run(lambda: api.export_dense(directory, out_dir, overwrite, trust_remote_code), as_json,
         lambda r: console.print(f"exported {r['layers']} layers densely ({r['dtype']}) -> {r['out']}"))


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{text!r} is not a comma-separated list of integers", "e.g. 512,2048") from None


@app.command()
def report(directories: list[str] = typer.Argument(..., help="sparselm output directories"),
           out: Optional[str] = typer.Option(None, help="report file (default: DIR/report.html for one directory, "
                                                        "comparison.html for several)"),
           as_json: bool = typer.Option(False, "--json")):
    """Rebuild a run's report.html, or compare runs: quality vs stored ratio per method, time vs quality, a table.

    Examples:
        sparselm report pruned/
        sparselm report runs/wanda-r0.3 runs/sparsegpt-r0.3 runs/svd-llm-r0.3 --out compare.html
    """
    from . import api
    _run(lambda: api.report_dirs(directories, out), as_json,
         lambda r: console.print(f"report of {r['runs']} run(s), {r['images']} plots -> {r['out']}"))


@app.command()
def bench(model: Optional[str] = typer.Argument(None, help="sparselm output dir, HF dir or hub id; omitted: bundled"),
          repeats: int = typer.Option(3, help="timed runs per measurement (after one warm-up)"),
          layer_tokens: str = typer.Option("1,512,2048", help="token counts for the per-layer latencies"),
          prefill: str = typer.Option("512,2048", help="prompt lengths for prefill tokens/s"),
          batch_sizes: str = typer.Option("1,8", help="generate batch sizes"),
          new_tokens: int = typer.Option(32, help="tokens generated per run"),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)"),
          device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
          trust_remote_code: bool = typer.Option(False, help="allow the model's own code (off by default)"),
          as_json: bool = typer.Option(False, "--json")):
    """Latency, throughput and memory beside the dense original (apart from quality evaluation).

    Examples:
        sparselm bench compressed/tiny-rocket --repeats 5 --json
    """
    from . import bench as benchmod
    _run(lambda: benchmod.run(model, repeats, _ints(layer_tokens), _ints(prefill), _ints(batch_sizes), new_tokens,
                              device, threads, trust_remote_code), as_json, _show_bench)


def _show_bench(r: dict) -> None:
    console.print(f"{r['model']} on {r['device']} ({r['threads']} threads, {r['dtype']}, kernels: {r['kernels']}; "
                  f"dense: {r.get('dense_source', 'none')}); median of {r['repeats']} runs [min-max]")
    t = Table(title="end to end")
    for col in ("measure", "compressed", "dense", "speedup"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    c, d = r["compressed"], r.get("dense", {})
    for key, v in c.items():
        if isinstance(v, dict) and "tokens_per_s" in v:
            dv = d.get(key, {})
            t.add_row(f"{key} tokens/s", f"{v['tokens_per_s']} [{v['min_ms']:.1f}-{v['max_ms']:.1f} ms]",
                      str(dv.get("tokens_per_s", "")), str(r.get("speedup", {}).get(key, "")))
    for key in ("resident_weight_bytes", "compressed_stored_bytes", "compressed_resident_bytes"):
        t.add_row(key, str(c["memory"][key]), str(d.get("memory", {}).get(key, "")), "")
    t.add_row("peak_rss_bytes", str(c["peak_rss_bytes"]), str(d.get("peak_rss_bytes", "")), "")
    console.print(t)
    lt = Table(title=f"per layer (ms; caches evicted before each call, {r['layer_cache_evicted_bytes'] >> 20} MiB: "
                     "weights read from memory, as in a model's decode)")
    for col in ("layer", "tokens", "compressed", "nn.Linear", "torch.mv", "vs linear", "vs best dense"):
        lt.add_column(col, justify="left" if col == "layer" else "right")
    for row in r["layers"]:
        lt.add_row(row["layer"], str(row["tokens"]), f"{row['compressed_ms']:.3f}",
                   str(row.get("dense_linear_ms", "")), str(row.get("dense_mv_ms", "")),
                   str(row.get("vs_linear", "")), str(row.get("vs_best_dense", "")))
    console.print(lt)


if __name__ == "__main__":  # python -m sparselm.cli ... (same as python -m sparselm ...)
    app(prog_name="sparselm")
