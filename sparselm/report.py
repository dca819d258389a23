"""The human report: tables and plots of what was done, built from the manifest (``sparselm.json``) alone.

``render(manifest)`` is one run's self-contained ``report.html`` (inline base64 PNGs, no network): per-layer
functional error and chosen method / ratio as heatmaps over blocks x projections, bytes before / after by
component, predicted vs measured error (knapsack runs), perplexity and task scores before / after,
calibration, timing and versions. ``compare(runs)`` puts several runs side by side: quality vs stored ratio
per method, time vs quality, one table with every run. The figures are drawn in `figures` (matplotlib's object
API on the Agg canvas, no pyplot, no global backend switch).
"""
from __future__ import annotations

import base64
import html
import re

from matplotlib.figure import Figure

from .figures import bytes_figure, heatmap, method_map, png, predicted_figure, quality_figure

GENERATOR = '<meta name="generator" content="sparselm report">'  # marks files `sparselm report` may replace
_NAME = re.compile(r"^(?P<prefix>.*?)\.(?P<block>\d+)\.(?P<proj>.+)$")
CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
       "th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}"
       "div.t{overflow-x:auto}img{max-width:100%;margin:.5em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}")


# --- data from the manifest ----------------------------------------------------------------------------
def run_label(manifest: dict) -> str:
    """``"wanda"``, ``"rocket+knapsack"``, ``"mixed+knapsack"``."""
    recipe = manifest.get("recipe") or {}
    methods = recipe.get("methods") or [{}]
    name = "mixed" if len(methods) > 1 else str(methods[0].get("method", "?"))
    return name + ("+knapsack" if recipe.get("allocate") == "knapsack" else "")


def layer_rows(manifest: dict) -> list[dict]:
    """One row per targeted layer: name, block, projection, method, ratio_stored, bytes, errors."""
    rows = []
    for name, e in (manifest.get("layers") or {}).items():
        acc = e.get("accounting") or {}
        rows.append({"layer": name, "method": (e.get("spec") or {}).get("method"), "class": e.get("class"),
                     "ratio_stored": acc.get("ratio_stored"), "dense_bytes": acc.get("dense_bytes", 0),
                     "stored_bytes": acc.get("stored_bytes", 0), "rel_error": e.get("rel_error"),
                     "predicted_error": e.get("predicted_error"),
                     "target": _target((e.get("spec") or {}).get("target"))})
    for name, e in (manifest.get("structured") or {}).items():  # plain layers narrowed by structured pruning
        acc = e.get("accounting") or {}
        rows.append({"layer": name, "method": (e.get("spec") or {}).get("method"), "class": "Linear (narrowed)",
                     "ratio_stored": acc.get("ratio_stored"), "dense_bytes": acc.get("dense_bytes", 0),
                     "stored_bytes": acc.get("stored_bytes", 0), "rel_error": None, "predicted_error": None,
                     "target": _target((e.get("spec") or {}).get("target"))})
    for a in manifest.get("allocation") or []:
        if a.get("method") == "dense":
            dense = int(a["shape"][0] * a["shape"][1] * (4 if manifest.get("storage_dtype") == "float32" else 2))
            rows.append({"layer": a["layer"], "method": "dense", "class": "Linear", "ratio_stored": 0.0,
                         "dense_bytes": dense, "stored_bytes": dense, "rel_error": 0.0, "predicted_error": 0.0,
                         "target": None})
    for r in rows:
        m = _NAME.match(r["layer"])
        r["block"], r["proj"] = (int(m["block"]), m["proj"]) if m else (0, r["layer"])
    return sorted(rows, key=lambda r: r["block"])  # stable: module order within a block


def _target(t) -> str | None:
    return " ".join(f"{k} {v}" for k, v in t.items()) if isinstance(t, dict) else t


def mean_error(manifest: dict) -> float | None:
    """Dense-byte-weighted mean functional error over the targeted layers."""
    rows = [r for r in layer_rows(manifest) if r["rel_error"] is not None]
    total = sum(r["dense_bytes"] for r in rows)
    return sum(r["rel_error"] * r["dense_bytes"] for r in rows) / total if total else None


# --- HTML ----------------------------------------------------------------------------------------------------
def _img(fig: Figure | None, alt: str) -> str:
    if fig is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png(fig)).decode()}">'


def _cell(v) -> str:
    if isinstance(v, float):
        return f'<td class="n">{v:.5g}</td>'
    if isinstance(v, int):
        return f'<td class="n">{v}</td>'
    return f"<td>{html.escape('' if v is None else str(v))}</td>"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<div class="t"><table><tr>{head}</tr>{body}</table></div>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8">{GENERATOR}<title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _kv(d: dict) -> str:
    return table(["", ""], [[k, v if not isinstance(v, (dict, list)) else str(v)] for k, v in d.items()])


def run_facts(manifest: dict) -> dict:
    totals, ev = manifest.get("totals") or {}, manifest.get("evaluation") or {}
    facts = {"base model": manifest.get("base_model"), "method": run_label(manifest),
             "storage dtype": manifest.get("storage_dtype"), "targeted layers": totals.get("layers"),
             "ratio removed (stored / params / paper)": " / ".join(
                 f"{totals[k]:.4f}" for k in ("ratio_stored", "ratio_params", "ratio_paper") if k in totals)}
    if "perplexity_after" in ev:
        facts["perplexity before / after"] = f"{ev['perplexity_before']:.4f} / {ev['perplexity_after']:.4f}"
    if manifest.get("kept_dense"):
        facts["kept dense by the allocator"] = ", ".join(manifest["kept_dense"])
    return facts


def evaluation_section(manifest: dict) -> str:
    """Perplexity protocol and lm-eval scores with what reproduces them."""
    out = []
    ev = manifest.get("evaluation")
    if ev:
        out.append(table(["metric", "dataset", "split", "seqlen", "windows", "tokens", "before", "after"],
                         [[ev.get("metric"), ev.get("dataset"), ev.get("split"), ev.get("seqlen"), ev.get("windows"),
                           ev.get("tokens"), ev.get("perplexity_before"), ev.get("perplexity_after")]]))
    lm = manifest.get("lm_eval") or {}
    rows = []
    for task, after in (lm.get("after") or {}).items():
        before = (lm.get("before") or {}).get(task, {})
        rep = ((lm.get("reproduce") or {}).get("tasks") or {}).get(task, {})
        for metric, value in after.items():
            if isinstance(value, float):
                label = "word perplexity (lm-eval's, not token-level)" if metric == "word_perplexity" else metric
                rows.append([task, label, before.get(metric), value, rep.get("version"), rep.get("num_fewshot"),
                             rep.get("samples"), rep.get("dataset"), rep.get("split")])
    if rows:
        r = lm.get("reproduce") or {}
        out.append(table(["task", "metric", "before", "after", "version", "few-shot", "samples", "dataset", "split"],
                         rows))
        out.append(f"<p>lm-eval {html.escape(str(r.get('lm_eval_version')))}, limit {html.escape(str(r.get('limit')))}"
                   f", seed {html.escape(str(r.get('seed')))}.</p>")
    if manifest.get("evaluations"):
        out += ["<h3>Later evaluations (sparselm eval --record)</h3>", table(
            ["date", "dataset", "seqlen", "windows", "perplexity", "task scores", "fidelity", "versions"],
            [[e.get("date"), e.get("dataset"), e.get("seqlen"), e.get("windows"), e.get("perplexity"),
              task_summary(e.get("lm_eval")), fidelity_summary(e.get("fidelity")),
              " ".join(f"{k} {v}" for k, v in (e.get("versions") or {}).items())] for e in manifest["evaluations"]])]
    return "".join(out) or "<p>No evaluation was run (compress with --eval / --tasks).</p>"


def task_summary(lm: dict | None) -> str:
    """``"piqa acc 0.61 acc_norm 0.62 (v1.0, 0-shot, 1838 samples)"`` per task."""
    parts = []
    for task, scores in ((lm or {}).get("tasks") or {}).items():
        rep = ((lm.get("reproduce") or {}).get("tasks") or {}).get(task, {})
        shown = " ".join(f"{'word_perplexity (lm-eval)' if k == 'word_perplexity' else k} {v:.4f}"
                         for k, v in scores.items() if isinstance(v, float))
        parts.append(f"{task} {shown} (v{rep.get('version')}, {rep.get('num_fewshot')}-shot, "
                     f"{rep.get('samples')} samples)")
    return "; ".join(parts)


def fidelity_summary(fid: dict | None) -> str:
    if not fid:
        return ""
    keys = ("final_rel_error", "top1_agreement", "kl_nats_per_token", "embedding_cosine", "nn_agreement")
    return " ".join(f"{k} {fid[k]:.4f}" for k in keys if isinstance(fid.get(k), float))


def render(manifest: dict, title: str | None = None) -> str:
    """One run's report (a complete HTML page)."""
    rows = layer_rows(manifest)
    parts = ["<h2>Summary</h2>", _kv(run_facts(manifest))]
    parts += ["<h2>Quality</h2>", _img(quality_figure(manifest), "quality before and after"),
              evaluation_section(manifest)]
    if rows:
        parts += ["<h2>Per layer</h2>", _img(heatmap(rows, "rel_error", "functional error ‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖ per layer",
                                                     "magma"), "functional error heatmap"),
                  _img(method_map(rows), "method and ratio per layer"),
                  _img(heatmap(rows, "ratio_stored", "stored ratio removed per layer", "Blues"), "ratio heatmap"),
                  _img(predicted_figure(rows), "predicted vs measured error"),
                  "<h2>Bytes</h2>", _img(bytes_figure(rows, manifest.get("file_bytes")), "bytes by component"),
                  table(["total", "dense bytes", "stored bytes", "ratio stored", "ratio params", "ratio paper"],
                        [["targeted layers", *(manifest.get("totals", {}).get(k) for k in (
                            "dense_bytes", "stored_bytes", "ratio_stored", "ratio_params", "ratio_paper"))]]),
                  "<h2>Layers</h2>",
                  table(["layer", "class", "method", "target", "ratio stored", "stored bytes", "dense bytes",
                         "error", "predicted"],
                        [[r["layer"], r["class"], r["method"], r["target"], r["ratio_stored"], r["stored_bytes"],
                          r["dense_bytes"], r["rel_error"], r["predicted_error"]] for r in rows])]
    parts += ["<h2>Calibration, timing, versions</h2>", _kv({**{f"calibration {k}": v for k, v in (
        manifest.get("calibration") or {}).items()}, "compress seconds": manifest.get("compress_seconds"),
        **(manifest.get("versions") or {"sparselm": manifest.get("sparselm_version"),
                                         "torch": manifest.get("torch_version")}),
        "whitening regularization": manifest.get("regularization") or "none"})]
    return _page(title or f"sparselm report: {manifest.get('base_model')} ({run_label(manifest)})", "".join(parts))


# --- comparing runs ------------------------------------------------------------------------------------------
def _quality(manifest: dict) -> tuple[str, float | None]:
    ev = manifest.get("evaluation") or {}
    if "perplexity_after" in ev:
        return f"perplexity after ({ev.get('dataset')}, {ev.get('windows')}x{ev.get('seqlen')})", ev["perplexity_after"]
    return "mean functional error", mean_error(manifest)


def compare_rows(runs: list[tuple[str, dict]]) -> list[dict]:
    out = []
    for label, m in runs:
        totals, ev = m.get("totals") or {}, m.get("evaluation") or {}
        tasks = {f"{t} {k}": v for t, s in ((m.get("lm_eval") or {}).get("after") or {}).items()
                 for k, v in s.items() if k in ("acc", "acc_norm")}
        out.append({"run": label, "method": run_label(m), "base_model": m.get("base_model"),
                    **{k: totals.get(k) for k in ("ratio_stored", "ratio_params", "ratio_paper")},
                    "perplexity_before": ev.get("perplexity_before"), "perplexity_after": ev.get("perplexity_after"),
                    "mean_error": mean_error(m), "seconds": m.get("compress_seconds"), **tasks})
    return out


def _curves(runs: list[tuple[str, dict]], x_key: str, x_label: str, title: str) -> Figure:
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    name = _quality(runs[0][1])[0]
    by_method: dict[str, list] = {}
    for label, m in runs:
        x = (m.get("totals") or {}).get("ratio_stored") if x_key == "ratio" else m.get("compress_seconds")
        y = _quality(m)[1]
        if x is not None and y is not None:
            by_method.setdefault(run_label(m), []).append((x, y))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot(*zip(*pts), "o-" if x_key == "ratio" else "o", label=method)
    dense = [(m.get("evaluation") or {}).get("perplexity_before") for _, m in runs]
    if "perplexity" in name and dense[0] is not None:
        ax.axhline(dense[0], color="#888", ls="--", lw=1, label="dense")
    ax.set_xlabel(x_label)
    ax.set_ylabel(name)
    if x_key != "ratio":
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def compare(runs: list[tuple[str, dict]]) -> str:
    """Several runs side by side (a complete HTML page); ``runs`` is [(label, manifest)]."""
    names = {_quality(m)[0].split(" (")[0] for _, m in runs}
    rows = compare_rows(runs)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    parts = [f"<p>Quality axis: {html.escape(_quality(runs[0][1])[0])} (the first run's; lower is better).</p>"]
    if len(names) > 1:
        parts.append("<p>Not every run has a perplexity evaluation: the plots use the mean functional error "
                     "where it is missing; compare like with like.</p>")
    parts += ["<h2>Quality vs stored ratio, per method</h2>",
              _img(_curves(runs, "ratio", "stored ratio removed (targeted layers)", "quality vs size"),
                   "quality vs ratio"),
              "<h2>Time vs quality</h2>",
              _img(_curves(runs, "time", "compress seconds", "time vs quality"), "time vs quality"),
              "<h2>Every run</h2>", table(keys, [[r.get(k) for k in keys] for r in rows])]
    return _page(f"sparselm: {len(runs)} runs compared", "".join(parts))
