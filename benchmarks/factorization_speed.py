"""Wall time of the factorization stage: CoSpaDi's fast engines against the reference twin at equal settings,
and SVD-LLM, on random weights with a real model's projection shapes.

Per distinct projection shape of a HF config (q/o, k/v, gate/up, down), with a random weight and the Gram of
synthetic activations with a decaying spectrum (a low-rank correlated part plus per-channel variances
``∝ 1/j`` and a few outlier channels), it times:
  * SVD-LLM (`lowrank.svd_llm`: whitening + SVD + triangular solve), the whole matrix;
  * CoSpaDi fast engines: OMP + K-SVD sweeps on the first ``--max-cols`` output columns, linearly
    extrapolated to all columns (both engines are linear in the column count);
  * the reference twin (`methods._reference`): per-column OMP on ``--ref-cols`` full columns, sequential K-SVD
    on ``--ref-atoms`` atoms of the same column subset; extrapolated to all columns and all ``k`` atoms.
Per-iteration times are then extrapolated to ``--iters`` iterations and to the whole model (every matrix of
every layer). The report says which numbers are measured and which are extrapolated.

Error parity: the same shapes divided by ``--parity-scale`` are learned to completion by both engines for
``--parity-iters`` iterations over ``--parity-seeds`` seeds, and the whitened relative errors are compared.

    python benchmarks/factorization_speed.py --config benchmarks/configs/llama-3.2-1b.json --device cpu \\
        --threads 1 --max-cols 64 --ref-cols 1        # writes docs/benchmarks/factorization_speed.{md,json}

``--coder`` runs only the GEMM-coder section instead (`coder_speed.py`: one coding pass by exact OMP and by
HTP per shape, whole CoSpaDi runs on the real layers named by ``--real label=DIR``) and merges it into the
existing files, keeping the sections above as they were measured:

    python benchmarks/factorization_speed.py --coder --threads 1 --ratio 0.3 --max-cols 128 \\
        --real smollm2=/tmp/smollm2 --blocks 3                  # /tmp/smollm2: scripts/smollm2_to_hf.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sparselm.capture import LinearStats  # noqa: E402
from sparselm.config import CoefStorage, Init, Ratio, SVDLLMSpec  # noqa: E402
from sparselm.device import synchronize  # noqa: E402
from sparselm.methods import _reference as ref  # noqa: E402
from sparselm.methods.cospadi import init_dictionary, learn_dictionary, sizes_for_ratio  # noqa: E402
from sparselm.methods.ksvd import ksvd_update, refit_coefficients  # noqa: E402
from sparselm.methods.lowrank import svd_llm  # noqa: E402
from sparselm.methods.omp import Engine, auto_engine, omp  # noqa: E402
from sparselm.methods.whiten import whiten  # noqa: E402

OUT = ROOT / "docs" / "benchmarks" / "factorization_speed"


@dataclass
class Shape:
    name: str
    d_in: int
    d_out: int
    per_layer: int  # matrices of this shape in one decoder block


def model_shapes(cfg: dict) -> list[Shape]:
    """Distinct (in, out) projection shapes of a Llama-style block, with their count per block."""
    d, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    return [Shape("q_proj, o_proj", d, d, 2), Shape("k_proj, v_proj", d, kv, 2),
            Shape("gate_proj, up_proj", d, ffn, 2), Shape("down_proj", ffn, d, 1)]


def synthetic_layer(d_in: int, d_out: int, seed: int, device: torch.device) -> tuple[torch.Tensor, LinearStats]:
    """Random ``W`` ``(out, in)`` (noise + a rank-64 part) and the Gram of synthetic activations."""
    g = torch.Generator().manual_seed(seed)
    W = 0.02 * torch.randn(d_out, d_in, generator=g)
    W += torch.randn(d_out, 64, generator=g) @ torch.randn(64, d_in, generator=g) * (0.02 / 8)
    r = min(256, d_in)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / torch.arange(1, r + 1).double().sqrt()[:, None]
    var = 1.0 / torch.arange(1, d_in + 1, dtype=torch.float64)[torch.randperm(d_in, generator=g)]
    var[torch.randperm(d_in, generator=g)[:4]] = 50.0  # outlier channels
    tokens = 4096
    gram = tokens * (A.T @ A / r + torch.diag(var))  # (in, in)
    return W.to(device), LinearStats(gram.to(device), tokens)


def timed(fn, device: torch.device):
    synchronize(device)
    t = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t, out


def bench_shape(shape: Shape, args, device: torch.device) -> dict:
    W, stats = synthetic_layer(shape.d_in, shape.d_out, 0, device)
    k, s = sizes_for_ratio(args.ratio, shape.d_in, shape.d_out, args.rho, torch.bfloat16, CoefStorage.BF16_14BIT)
    row = {"shape": shape.name, "in": shape.d_in, "out": shape.d_out, "per_layer": shape.per_layer, "k": k, "s": s}
    row["svd_llm_s"], _ = timed(lambda: svd_llm(W, stats, SVDLLMSpec(target=Ratio(args.ratio)), torch.bfloat16),
                                device)
    row["whiten_s"], wh = timed(lambda: whiten(stats), device)
    Y = wh.apply(W.T).float()  # (in, out)
    cols = min(args.max_cols, shape.d_out)
    scale = shape.d_out / cols
    Ys = Y[:, :cols].contiguous()  # (in, cols)
    D = init_dictionary(Y, k, Init.RANDOM_COLUMNS, 42)
    t_omp = t_ksvd = 0.0
    for _ in range(args.measure_iters):
        dt, codes = timed(lambda: omp(D, Ys, s), device)
        t_omp += dt / args.measure_iters
        S, mask = codes.dense(k), codes.mask(k)
        dt, upd = timed(lambda: ksvd_update(Ys, D, S, mask, args.power_iters), device)
        t_ksvd += dt / args.measure_iters
        D = upd.D
    t_refit, _ = timed(lambda: refit_coefficients(Ys, D, upd.S, mask), device)
    engine = auto_engine(device, Ys.dtype)  # what `omp` ran above
    t_batched = timed(lambda: omp(D, Ys, s, engine=Engine.TORCH), device)[0] if engine is Engine.COMPILED else t_omp
    row.update(cols_measured=cols, omp_engine=engine.value, fast_omp_s=t_omp * scale,
               batched_omp_s=t_batched * scale, fast_ksvd_s=t_ksvd * scale, fast_refit_s=t_refit * scale)
    row.update(bench_reference(Ys, D, upd.S, mask, s, args, device, scale))
    row["fast_iter_s"] = row["fast_omp_s"] + row["fast_ksvd_s"]
    row["ref_iter_s"] = row["ref_omp_s"] + row["ref_ksvd_s"]
    row["speedup"] = row["ref_iter_s"] / row["fast_iter_s"]
    return row


def bench_reference(Ys, D, S, mask, s, args, device, scale) -> dict:
    """Reference per-column OMP (full columns) and sequential K-SVD (a sample of atoms), extrapolated."""
    k, cols = mask.shape
    n_cols = min(args.ref_cols, cols)
    t, _ = timed(lambda: [ref.omp_column(D, Ys[:, j], s) for j in range(n_cols)], device)
    per_col = t / n_cols
    used = mask.any(1).nonzero().squeeze(1)
    atoms = used[torch.randperm(len(used), generator=torch.Generator().manual_seed(0))[: args.ref_atoms]]
    R, D2, S2 = Ys - D @ S, D.clone(), S.clone()
    t, _ = timed(lambda: [ref.ksvd_atom(R, D2, S2, mask, int(i), args.power_iters) for i in atoms], device)
    per_atom = t / max(1, len(atoms))
    return {"ref_cols_measured": n_cols, "ref_atoms_measured": len(atoms), "ref_omp_per_col_s": per_col,
            "ref_omp_s": per_col * cols * scale, "ref_ksvd_s": per_atom * k * scale}


def parity(shape: Shape, args, device: torch.device) -> dict:
    """Both engines to completion on the shape divided by ``--parity-scale``: errors and measured times."""
    d_in, d_out = max(8, shape.d_in // args.parity_scale), max(8, shape.d_out // args.parity_scale)
    k, s = sizes_for_ratio(args.ratio, d_in, d_out, args.rho, torch.bfloat16, CoefStorage.BF16_14BIT)
    fast_err, ref_err, fast_t, ref_t = [], [], 0.0, 0.0
    for seed in range(args.parity_seeds):
        W, stats = synthetic_layer(d_in, d_out, seed, device)
        Y = whiten(stats).apply(W.T).float()  # (in, out)
        D0 = init_dictionary(Y, k, Init.RANDOM_COLUMNS, seed)
        dt, f = timed(lambda: learn_dictionary(Y, D0, s, args.parity_iters, args.power_iters, None), device)
        fast_t, fast_err = fast_t + dt, fast_err + [f.rel_error]
        dt, r = timed(lambda: ref.learn_reference(Y, D0, s, args.parity_iters, args.power_iters, None), device)
        ref_t, ref_err = ref_t + dt, ref_err + [r.rel_error]
    ratios = [a / b for a, b in zip(fast_err, ref_err)]
    return {"shape": shape.name, "in": d_in, "out": d_out, "k": k, "s": s, "fast_rel_error": fast_err,
            "ref_rel_error": ref_err, "error_ratio_mean": statistics.mean(ratios), "error_ratio_max": max(ratios),
            "fast_s": fast_t, "ref_s": ref_t, "speedup": ref_t / fast_t}


def whole_model(rows: list[dict], layers: int, iters: int) -> dict:
    def total(key_iter, extra):
        return sum(r["per_layer"] * layers * (iters * r[key_iter] + sum(r[e] for e in extra)) for r in rows)
    fast = total("fast_iter_s", ["whiten_s", "fast_refit_s"])
    reference = total("ref_iter_s", ["whiten_s"])
    svd = sum(r["per_layer"] * layers * r["svd_llm_s"] for r in rows)
    return {"iters": iters, "fast_s": fast, "ref_s": reference, "svd_llm_s": svd, "speedup": reference / fast}


def _fmt(sec: float) -> str:
    return f"{sec:.3g} s" if sec < 120 else (f"{sec / 60:.3g} min" if sec < 7200 else f"{sec / 3600:.3g} h")


def markdown(result: dict) -> str:
    a, m = result["settings"], result["model"]
    lines = [f"# Factorization speed: {result['config']}", "",
             f"Device `{result['device']}`, torch threads {a['threads']}, ratio {a['ratio']}, ρ = {a['rho']}, "
             f"power iterations {a['power_iters']}, sizing by stored bytes (bf16 D, 14-bit coefficients).",
             f"Written by `benchmarks/factorization_speed.py` ({result['date']}).", "",
             "## Per matrix (one iteration = OMP + K-SVD sweep)", "",
             f"Fast engines timed on the first `cols` output columns ({a['measure_iters']} iteration(s)) and "
             "scaled linearly to all columns; fixed per-call overheads get scaled too, so the fast times are upper "
             f"bounds. Reference: OMP timed on {a['ref_cols']} full column(s), sequential K-SVD on "
             f"{a['ref_atoms']} atoms of the same column subset, scaled to all columns and all k atoms. "
             "**Both are extrapolations from measured per-column / per-atom times**; SVD-LLM (whitening + SVD + "
             "solve) and whitening alone are measured on the whole matrix. Fast OMP is the engine `omp` picks on "
             "this device (on CPU with numba: the compiled per-column loop); *batched OMP* is the tensor form "
             "GPUs run, timed on the same columns for comparison (not part of the fast iteration).", "",
             "| shape | in×out | k / s | cols | SVD-LLM | whitening | fast OMP | batched OMP | fast K-SVD | fast iter | "
             "ref OMP | ref K-SVD | ref iter | speedup |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["shapes"]:
        lines.append(f"| {r['shape']} | {r['in']}×{r['out']} | {r['k']} / {r['s']} | {r['cols_measured']} | "
                     f"{_fmt(r['svd_llm_s'])} | "
                     f"{_fmt(r['whiten_s'])} | {_fmt(r['fast_omp_s'])} | {_fmt(r['batched_omp_s'])} | "
                     f"{_fmt(r['fast_ksvd_s'])} | "
                     f"{_fmt(r['fast_iter_s'])} | {_fmt(r['ref_omp_s'])} | {_fmt(r['ref_ksvd_s'])} | "
                     f"{_fmt(r['ref_iter_s'])} | {r['speedup']:.0f}× |")
    lines += ["", f"## Whole model ({m['matrices']} matrices, {m['iters']} iterations each, no early stop; "
              "extrapolated)", "", "| CoSpaDi fast | CoSpaDi reference twin | speedup | SVD-LLM |", "|---|---|---|---|",
              f"| {_fmt(m['fast_s'])} | {_fmt(m['ref_s'])} | {m['speedup']:.0f}× | {_fmt(m['svd_llm_s'])} |", "",
              f"## Error parity (shapes ÷ {a['parity_scale']}, {a['parity_iters']} iterations, "
              f"{a['parity_seeds']} seed(s), both engines run to completion)", "",
              "Relative whitened error ‖Y − DS‖/‖Y‖ before coefficient rounding; the fast engine uses blocks "
              "of atoms and a final exact refit, the reference sequential K-SVD and lstsq OMP. Times measured.",
              "",
              "| shape | in×out | k / s | fast error | reference error | fast/ref (mean, max) | fast | ref | "
              "speedup |", "|---|---|---|---|---|---|---|---|---|"]
    for p in result["parity"]:
        fe = ", ".join(f"{e:.4f}" for e in p["fast_rel_error"])
        re_ = ", ".join(f"{e:.4f}" for e in p["ref_rel_error"])
        lines.append(f"| {p['shape']} | {p['in']}×{p['out']} | {p['k']} / {p['s']} | {fe} | {re_} | "
                     f"{p['error_ratio_mean']:.4f}, {p['error_ratio_max']:.4f} | {_fmt(p['fast_s'])} | "
                     f"{_fmt(p['ref_s'])} | {p['speedup']:.0f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "benchmarks/configs/llama-3.2-1b.json"))
    p.add_argument("--device", default="cpu", help="a torch device name")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--power-iters", type=int, default=8)
    p.add_argument("--iters", type=int, default=60, help="iterations for the whole-model extrapolation")
    p.add_argument("--measure-iters", type=int, default=1, help="fast iterations actually timed per shape")
    p.add_argument("--max-cols", type=int, default=1 << 30, help="output columns the fast engines are timed on")
    p.add_argument("--ref-cols", type=int, default=2, help="columns the reference OMP is timed on")
    p.add_argument("--ref-atoms", type=int, default=16, help="atoms the reference K-SVD is timed on")
    p.add_argument("--parity-scale", type=int, default=16)
    p.add_argument("--parity-iters", type=int, default=8)
    p.add_argument("--parity-seeds", type=int, default=2)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--coder", action="store_true", help="run only the GEMM-coder section and merge it in")
    p.add_argument("--real", nargs="*", default=[], help="label=DIR of real models for whole CoSpaDi runs")
    p.add_argument("--blocks", type=int, nargs="*", default=[3], help="blocks of the real models to run")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for the real models")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=["omp+ksvd", "htp+ksvd", "htp+mod"],
                   help="whole-run variants (coder+dict_update); omp+ksvd is the reference and must be first")
    p.add_argument("--shapes", nargs="*", default=None, help="only these projection shapes of the config (--coder)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = json.loads(Path(args.config).read_text())
    shapes = model_shapes(cfg)
    omp(torch.eye(8, device=device), torch.ones(8, 2, device=device), 2)  # compile / warm up before timing
    if args.coder:
        return merge_coder(args, device, shapes)
    rows = []
    for sh in shapes:
        rows.append(bench_shape(sh, args, device))
        print(json.dumps(rows[-1]), flush=True)
    par = []
    for sh in shapes:
        par.append(parity(sh, args, device))
        print(json.dumps(par[-1]), flush=True)
    model = whole_model(rows, cfg["num_hidden_layers"], args.iters)
    model["matrices"] = sum(r["per_layer"] for r in rows) * cfg["num_hidden_layers"]
    result = {"config": cfg.get("model", Path(args.config).stem), "device": str(device),
              "date": time.strftime("%Y-%m-%d"), "settings": {**vars(args), "threads": torch.get_num_threads()},
              "shapes": rows, "model": model, "parity": par}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def merge_coder(args, device, shapes) -> None:
    """The GEMM-coder section (`coder_speed`), written into the existing JSON (key ``coder``) and markdown."""
    import coder_speed

    if args.shapes is not None:  # `--shapes` alone: no coding-pass rows, only the real runs
        shapes = [sh for sh in shapes if sh.name in args.shapes]
    res = coder_speed.run(args, device, shapes, synthetic_layer, lambda: synchronize(device))
    res["config"] = str(Path(args.config).name)
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    kept = old.get("coder", {})
    for part in ("passes", "real", "real_models"):  # a section this run did not measure keeps its last table
        if not res[part] and kept.get(part):
            res[part], res.setdefault("kept_from", {})[part] = kept[part], kept.get("date")
    old["coder"] = res
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(old, indent=1))
    head = markdown(old) if "shapes" in old else ""
    out.with_suffix(".md").write_text(head + coder_speed.markdown(res))
    print(coder_speed.markdown(res))


if __name__ == "__main__":
    main()
