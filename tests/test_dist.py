"""Two processes (torch.distributed, gloo on CPU) give the very tensors of one process: a pruning, a low-rank and
a sparse-dictionary method (a dictionary shared across blocks), with calibration batches that do not split
evenly over the ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparselm import api, io, job
from sparselm.config import CoSpaDiSpec, Ratio, Recipe

RECIPES = {"sparsegpt": lambda: api.build_recipe("sparsegpt", None, 0.5, None),
           "svd-llm": lambda: api.build_recipe("svd-llm", 0.3, None, None),
           "cospadi-shared": lambda: Recipe(methods=(CoSpaDiSpec(target=Ratio(0.3), iters=2, group_size=2),))}
CALIB = dict(nsamples=6, seqlen=32, batch_size=2, evaluate_ppl=False)  # 3 batches over 2 ranks: 2 + 1
NO_REPORT = lambda *a, **k: {}  # noqa: E731 - report.html and the card are not what is compared (and slow)

RANK = """
import json, sys
import torch
torch.set_num_threads(1)
from sparselm import api, dist, job
from tests.test_dist import CALIB, NO_REPORT, RECIPES
job.run_files = NO_REPORT
src, out, calib = sys.argv[1:]
for name, make in RECIPES.items():
    s = api.compress_model(src, make(), out=f"{out}/{name}", calib=calib, **CALIB)
    print(json.dumps({"name": name, "rank": dist.rank(), "processes": s["processes"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_tensors_of_one(tiny_llama_dir, tmp_path, monkeypatch):
    from sparselm.data import stdlib_files
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(p.read_text(errors="ignore") for p in stdlib_files("train")[:2])[:50_000])
    monkeypatch.setattr(job, "run_files", NO_REPORT)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(tiny_llama_dir), str(tmp_path / "two"), str(calib)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600) for p in ranks]
    for p, (out, err) in zip(ranks, outputs):
        assert p.returncode == 0, err[-3000:]
        assert all(json.loads(line)["processes"] == 2 for line in out.strip().splitlines())
    for name, make in RECIPES.items():
        api.compress_model(str(tiny_llama_dir), make(), out=str(tmp_path / "one" / name), calib=str(calib), **CALIB)
        a = load_file(tmp_path / "one" / name / io.WEIGHTS)
        b = load_file(tmp_path / "two" / name / io.WEIGHTS)
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), name
        ma, mb = (json.loads((tmp_path / d / name / io.MANIFEST).read_text()) for d in ("one", "two"))
        assert ma["layers"] == mb["layers"] and ma["tied"] == mb["tied"], name
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(RECIPES)  # rank 0 alone wrote
