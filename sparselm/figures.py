"""The report's figures, from the per-layer rows (`report.layer_rows`) and the manifest: heatmaps over blocks x
projections, bytes by component, predicted vs measured error, quality before / after. matplotlib's object API on
the Agg canvas (no pyplot, no global backend switch); `png` renders one.
"""
from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _grid(rows: list[dict], key: str):
    blocks = sorted({r["block"] for r in rows})
    projs = list(dict.fromkeys(r["proj"] for r in rows))
    grid = [[float("nan")] * len(projs) for _ in blocks]
    for r in rows:
        if r.get(key) is not None and not isinstance(r[key], str):
            grid[blocks.index(r["block"])][projs.index(r["proj"])] = float(r[key])
    return blocks, projs, grid


def _heat_axes(rows: list[dict], title: str):
    blocks, projs, _ = _grid(rows, "ratio_stored")
    fig = Figure(figsize=(1.6 + 1.1 * len(projs), 1.4 + 0.38 * len(blocks)), dpi=100)
    ax = fig.add_subplot()
    ax.set_xticks(range(len(projs)), [p.split(".")[-1] for p in projs], rotation=30, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=10)
    return fig, ax


def heatmap(rows: list[dict], key: str, title: str, cmap: str = "viridis") -> Figure:
    """``key`` (``rel_error``, ``ratio_stored``) over blocks x projections, each cell labelled."""
    _, _, grid = _grid(rows, key)
    fig, ax = _heat_axes(rows, title)
    im = ax.imshow(grid, aspect="auto", cmap=cmap)
    fig.colorbar(im, ax=ax, fraction=0.04)
    if len(grid) <= 48:
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                if v == v:
                    ax.text(j, i, f"{v:.3f}" if v < 10 else f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < (max(max(x for x in g if x == x) for g in grid) / 2) else "black")
    fig.tight_layout()
    return fig


def method_map(rows: list[dict]) -> Figure:
    """Which method each layer got (colour) and its stored ratio removed (text)."""
    methods = sorted({str(r["method"]) for r in rows})
    coded = [{**r, "code": methods.index(str(r["method"]))} for r in rows]
    _, _, grid = _grid(coded, "code")
    _, _, ratios = _grid(rows, "ratio_stored")
    fig, ax = _heat_axes(rows, "method (colour) and stored ratio removed (text) per layer")
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974"]
    ax.imshow(grid, aspect="auto", cmap=ListedColormap(palette[:max(len(methods), 1)]), vmin=-0.5,
              vmax=len(methods) - 0.5)
    for i, line in enumerate(ratios):
        for j, v in enumerate(line):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
    for k, m in enumerate(methods):
        ax.plot([], [], "s", color=palette[k % len(palette)], label=m)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def bytes_figure(rows: list[dict], file_bytes: dict | None = None) -> Figure:
    """Dense vs stored bytes, summed per projection (component) over blocks; with the manifest's
    ``file_bytes``, also the whole checkpoint before / after (targeted weights, their biases, everything else)."""
    projs = list(dict.fromkeys(r["proj"].split(".")[-1] for r in rows))
    dense = [sum(r["dense_bytes"] for r in rows if r["proj"].split(".")[-1] == p) / 2 ** 20 for p in projs]
    stored = [sum(r["stored_bytes"] for r in rows if r["proj"].split(".")[-1] == p) / 2 ** 20 for p in projs]
    fig = Figure(figsize=(1.5 + 0.9 * len(projs) + (3.5 if file_bytes else 0), 3.2), dpi=100)
    ax = fig.add_subplot(1, 2, 1) if file_bytes else fig.add_subplot()
    if file_bytes:
        _checkpoint_bars(fig.add_subplot(1, 2, 2), rows, file_bytes)
    xs = range(len(projs))
    ax.bar([x - 0.2 for x in xs], dense, 0.4, label="dense", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], stored, 0.4, label="stored", color="#4c72b0")
    ax.set_xticks(list(xs), projs, rotation=30, ha="right")
    ax.set_ylabel("MiB (all blocks)")
    ax.set_title("bytes of the targeted layers, before / after, by component", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _checkpoint_bars(ax, rows: list[dict], fb: dict) -> None:
    mib = 2 ** 20
    parts = {"before": (sum(r["dense_bytes"] for r in rows), fb.get("compressed_biases", 0), fb.get("other", 0)),
             "after": (fb.get("compressed_layers", 0), fb.get("compressed_biases", 0), fb.get("other", 0))}
    bottom = [0.0, 0.0]
    for i, (label, colour) in enumerate((("targeted weights", "#4c72b0"), ("their biases", "#dd8452"),
                                         ("everything else (embeddings, norms, ...)", "#bbbbbb"))):
        vals = [parts["before"][i] / mib, parts["after"][i] / mib]
        ax.bar([0, 1], vals, 0.6, bottom=bottom, label=label, color=colour)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], ["dense", "compressed"])
    ax.set_ylabel("MiB (model.safetensors)")
    ax.set_title("whole checkpoint", fontsize=10)
    ax.set_ylim(0, max(bottom) * 1.45 or 1)
    ax.legend(fontsize=7, loc="upper right")


def predicted_figure(rows: list[dict]) -> Figure | None:
    """Knapsack runs: the profile's predicted error per layer vs the error measured after compression."""
    pts = [(r["predicted_error"], r["rel_error"]) for r in rows
           if r["predicted_error"] is not None and r["rel_error"] is not None and r["method"] != "dense"]
    if not pts:
        return None
    fig = Figure(figsize=(4.2, 4), dpi=100)
    ax = fig.add_subplot()
    ax.scatter(*zip(*pts), s=14, color="#c44e52")
    hi = max(max(p) for p in pts) * 1.05 or 1.0
    ax.plot([0, hi], [0, hi], "--", color="#888", lw=1, label="measured = predicted")
    ax.set_xlabel("predicted (profile, dense inputs)")
    ax.set_ylabel("measured (compressed inputs)")
    ax.set_title("per-layer functional error", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def quality_figure(manifest: dict) -> Figure | None:
    """Perplexity and lm-eval task scores, before and after."""
    ev, tasks = manifest.get("evaluation") or {}, (manifest.get("lm_eval") or {})
    bars = []
    if "perplexity_after" in ev:
        bars.append((f"perplexity ({ev.get('dataset')})", ev.get("perplexity_before"), ev["perplexity_after"]))
    for task, after in (tasks.get("after") or {}).items():
        before = (tasks.get("before") or {}).get(task, {})
        for metric in ("acc", "acc_norm", "word_perplexity"):
            if metric in after:
                bars.append((f"{task} {metric}", before.get(metric), after[metric]))
    if not bars:
        return None
    fig = Figure(figsize=(2 + 2.2 * len(bars), 3.2), dpi=100)
    axes = fig.subplots(1, len(bars), squeeze=False)[0]
    for ax, (name, before, after) in zip(axes, bars):
        ax.bar([0, 1], [before or 0, after], color=["#bbbbbb", "#4c72b0"])
        ax.set_xticks([0, 1], ["before", "after"])
        ax.set_title(name, fontsize=9)
        for x, v in ((0, before), (1, after)):
            if v is not None:
                ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    return fig
