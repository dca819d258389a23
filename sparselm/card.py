"""The model card: ``README.md`` of an output directory, with Hugging Face front-matter, from the manifest."""
from __future__ import annotations

import yaml

from .report import fidelity_summary, run_label, task_summary


def _methods(manifest: dict) -> list[str]:
    return [str(m.get("method")) for m in (manifest.get("recipe") or {}).get("methods") or []]


def front_matter(manifest: dict) -> dict:
    base = str(manifest.get("base_model") or "")
    meta = {"library_name": "sparselm", "tags": ["sparselm", "compressed", *_methods(manifest)]}
    if base and not base.startswith(("/", ".", "~")):  # a hub id (local paths mean nothing on the Hub)
        meta["base_model"] = base
    meta["pipeline_tag"] = "text-generation" if (manifest.get("evaluation") or {}).get("metric") else None
    return {k: v for k, v in meta.items() if v is not None}


def _results(manifest: dict) -> list[str]:
    lines = []
    ev = manifest.get("evaluation")
    if ev:
        lines += ["| metric | dataset | before | after |", "|---|---|---|---|",
                  f"| {ev.get('metric')} ({ev.get('windows')} windows x {ev.get('seqlen')} tokens) | "
                  f"{ev.get('dataset')} ({ev.get('split')}) | {ev.get('perplexity_before'):.4f} | "
                  f"{ev.get('perplexity_after'):.4f} |"]
    lm = manifest.get("lm_eval") or {}
    for task, after in (lm.get("after") or {}).items():
        before = (lm.get("before") or {}).get(task, {})
        for metric, value in after.items():
            if isinstance(value, float):
                b = before.get(metric)
                label = "word perplexity (lm-eval)" if metric == "word_perplexity" else metric
                lines.append(f"| {task} {label} (lm-eval) | {task} | {'' if b is None else f'{b:.4f}'} | "
                             f"{value:.4f} |")
    if lines and manifest.get("evaluations"):
        lines.append("")
    for e in manifest.get("evaluations") or []:
        ppl = e.get("perplexity")
        what = [f"token-level perplexity {ppl:.4f} ({e.get('dataset')}, {e.get('windows')}x{e.get('seqlen')})"
                if ppl is not None else "", task_summary(e.get("lm_eval")), fidelity_summary(e.get("fidelity"))]
        lines.append(f"* {e.get('date')} `sparselm eval`: " + "; ".join(w for w in what if w))
    return lines or ["No evaluation was recorded (compress with `--eval` and/or `--tasks`)."]


def render(manifest: dict, directory: str = "DIR") -> str:
    """``README.md`` text: front-matter, what was done, results, how to load."""
    totals = manifest.get("totals") or {}
    cal = manifest.get("calibration") or {}
    meta = yaml.safe_dump(front_matter(manifest), sort_keys=False).strip()
    ratios = " / ".join(f"{totals[k]:.4f}" for k in ("ratio_stored", "ratio_params", "ratio_paper") if k in totals)
    body = [f"---\n{meta}\n---", "", f"# {manifest.get('base_model')} compressed with sparselm ({run_label(manifest)})",
            "", f"Compressed without retraining by sparselm {manifest.get('sparselm_version')}"
            f" from `{manifest.get('base_model')}`.", "",
            f"* method: **{run_label(manifest)}**, {totals.get('layers')} targeted linear layers",
            f"* ratio removed (stored bytes / parameters / CoSpaDi paper convention): **{ratios}**",
            f"* calibration: {cal.get('nsamples')} windows x {cal.get('seqlen')} tokens of `{cal.get('source')}`, "
            f"seed {cal.get('seed')}", f"* compress time: {manifest.get('compress_seconds', 0):.1f} s", "",
            "## Evaluation", "", *_results(manifest), "",
            "## How to load", "", "```python", "import sparselm", f'model = sparselm.load("{directory}")'
            "  # a transformers model holding the compressed layers", "```", "",
            "Plain transformers (dense weights multiplied back; any tool loads it):", "", "```bash",
            f"sparselm export {directory} --out {directory}-dense", "```", "",
            "The recipe that produced this directory is `recipe.yaml` (`sparselm compress MODEL --recipe "
            "recipe.yaml` reproduces it); `report.html` has the per-layer plots; `sparselm.json` every number.", ""]
    return "\n".join(body)
