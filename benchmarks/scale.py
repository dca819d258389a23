"""Scale: peak host memory of `sparselm compress` read lazily (block by block) and in memory, as a function of
the model's depth and width and of the calibration size; wall time of 2 processes (torchrun, gloo) vs 1.

Memory: each point runs in a fresh process that first compresses a model of tiny widths (imports, first calls),
then resets its peak resident size (Linux ``/proc/self/clear_refs``) and compresses the measured model; the
point is the peak (``VmHWM``) minus the resident size at the start. Models are random Llamas built from a config
and saved in bf16 (computed in float32, as `sparselm compress` does); method: magnitude 50 % (the method's own
working memory is a few copies of one layer; see docs/scale.md).

    python benchmarks/scale.py memory   # docs/benchmarks/scale_memory.md and .json
    python benchmarks/scale.py dist     # docs/benchmarks/scale_dist.md and .json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
MIB = 2 ** 20

PEAK = r"""
import json, re, sys
import torch
torch.set_num_threads(1)
from sparselm import api, job
job.run_files = lambda *a, **k: {}
warm, model, out, calib, nsamples, seqlen, lazy = sys.argv[1:]
recipe = api.build_recipe("magnitude", None, 0.5, None)
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
api.compress_model(warm, recipe, calib=calib, nsamples=2, seqlen=32, out=out + "-warm", lazy_load=lazy == "1")
open("/proc/self/clear_refs", "w").write("5")
start = status("VmRSS")
api.compress_model(model, recipe, calib=calib, nsamples=int(nsamples), seqlen=int(seqlen), out=out,
                   lazy_load=lazy == "1")
print(json.dumps({"rise": status("VmHWM") - start}))
"""

# (hidden, layers, nsamples, seqlen)
MEMORY_POINTS = [(256, 4, 8, 128), (256, 16, 8, 128), (512, 4, 8, 128), (512, 16, 8, 128), (512, 8, 8, 128),
                 (512, 8, 64, 256)]


def build(path: Path, hidden: int, layers: int, tok) -> dict:
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512)
    model = tf.LlamaForCausalLM(cfg)
    sizes = {"model_bytes": sum(p.numel() * 4 for p in model.parameters()),
             "block_bytes": sum(p.numel() * 4 for p in model.model.layers[0].parameters())}
    sizes["outside_bytes"] = sizes["model_bytes"] - layers * sizes["block_bytes"]
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return sizes


def calibration_text(where: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from sparselm.data import stdlib_files
    # many short documents (.jsonl): a single .txt file is tokenized whole (`data.calibration_data`), which
    # would measure the tokenizer on the file rather than the compression
    path = where / "calib.jsonl"
    text = "".join(p.read_text(errors="ignore") for p in stdlib_files("train")[:20])[:1_000_000]
    path.write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n" for i in range(0, len(text), 2000)))
    return path


def tokenizer():
    sys.path.insert(0, str(ROOT))
    from tests.conftest import _tiny_tokenizer
    return _tiny_tokenizer()


def memory() -> list[dict]:
    # glibc keeps freed chunks below its dynamic mmap threshold (which rises up to 32 MiB) in the heap, so freed
    # blocks of these small models would look like growth; real models' block tensors lie above it. A fixed
    # threshold makes the small tensors behave as large ones do (docs/scale.md).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok, calib = tokenizer(), calibration_text(d)
        build(d / "warm", 32, 2, tok)
        for hidden, layers, nsamples, seqlen in MEMORY_POINTS:
            sizes = build(d / "m", hidden, layers, tok)
            row = {"hidden": hidden, "layers": layers, "nsamples": nsamples, "seqlen": seqlen, **sizes,
                   "activation_bytes": nsamples * seqlen * hidden * 4}
            for lazy in (True, False):
                out = d / f"o-{lazy}"
                r = subprocess.run([sys.executable, "-c", PEAK, str(d / "warm"), str(d / "m"), str(out), str(calib),
                                    str(nsamples), str(seqlen), "1" if lazy else "0"], env=env, capture_output=True,
                                   text=True, cwd=ROOT)
                if r.returncode:
                    raise RuntimeError(r.stderr[-3000:])
                row["lazy_rise" if lazy else "in_memory_rise"] = json.loads(r.stdout.strip().splitlines()[-1])["rise"]
                subprocess.run(["rm", "-rf", str(out), f"{out}-warm"])
            print(json.dumps(row), flush=True)
            rows.append(row)
            subprocess.run(["rm", "-rf", str(d / "m")])
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = ["| hidden | layers | calibration (samples x tokens) | model MiB | block MiB | embeddings/head MiB | "
             "activations MiB | peak rise, lazy MiB | peak rise, in memory MiB |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['hidden']} | {r['layers']} | {r['nsamples']} x {r['seqlen']} | {r['model_bytes'] / MIB:.1f} "
                     f"| {r['block_bytes'] / MIB:.2f} | {r['outside_bytes'] / MIB:.2f} | "
                     f"{r['activation_bytes'] / MIB:.2f} | {r['lazy_rise'] / MIB:.1f} | "
                     f"{r['in_memory_rise'] / MIB:.1f} |")
    return "\n".join(lines)


def dist_runs(hidden: int = 384, layers: int = 8) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok, calib = tokenizer(), calibration_text(d)
        sizes = build(d / "m", hidden, layers, tok)
        args = ["compress", str(d / "m"), "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "32",
                "--seqlen", "128", "--batch-size", "4", "--calib", str(calib), "--json"]
        runs = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes (gloo), 1 thread each",
                                                                               2, 1)]
        for label, procs, threads in runs:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
            out = d / f"o{procs}{threads}"
            cmd = ([sys.executable, "-m", "sparselm"] if procs == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "sparselm"])
            t = time.perf_counter()
            r = subprocess.run(cmd + args + ["--out", str(out)], env=env, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            s = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"run": label, "processes": procs, "threads": threads, "compress_seconds": s["compress_seconds"],
                         "command_seconds": round(wall, 2), "load_average": round(os.getloadavg()[1], 1),
                         "hidden": hidden, "layers": layers, **sizes})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def dist_table(rows: list[dict]) -> str:
    lines = ["| run | compress s | whole command s | machine load (5 min) |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['compress_seconds']:.1f} | {r['command_seconds']:.1f} | "
              f"{r.get('load_average', '?')} |" for r in rows]
    return "\n".join(lines)


def main(which: str) -> None:
    machine = f"{os.cpu_count()} CPU cores, shared with other jobs while measured"
    if which == "memory":
        rows = memory()
        (DOCS / "scale_memory.json").write_text(json.dumps(rows, indent=1))
        (DOCS / "scale_memory.md").write_text(
            "# Peak host memory of `sparselm compress`: lazy vs in memory\n\n"
            f"`python benchmarks/scale.py memory` ({machine}). Each point: the rise of the process's peak resident\n"
            "size during one `compress` (after a warm-up run on a tiny model), magnitude 50 %, bf16 checkpoint\n"
            "computed in float32, `MALLOC_MMAP_THRESHOLD_=131072` (see docs/scale.md). Lazy: the default for a\n"
            "local directory without evaluation.\n\n"
            + memory_table(rows) + "\n")
    else:
        rows = dist_runs()
        (DOCS / "scale_dist.json").write_text(json.dumps(rows, indent=1))
        (DOCS / "scale_dist.md").write_text(
            "# Two processes (torch.distributed, gloo) vs one\n\n"
            f"`python benchmarks/scale.py dist` ({machine}). SparseGPT 50 % on a random Llama "
            f"(hidden {rows[0]['hidden']}, {rows[0]['layers']} blocks, {rows[0]['model_bytes'] / MIB:.0f} MiB in "
            "float32), 32 x 128 calibration tokens in batches of 4. The outputs are identical tensor for tensor "
            "(tests/test_dist.py).\n\n" + dist_table(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "memory")
