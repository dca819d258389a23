"""Latency, throughput and weight bytes of forward passes; kept apart from quality evaluation."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import device as devices, io
from . import model as adapter


def _load(path: str | None, trust_remote_code: bool = False):
    if path is not None and (Path(path) / io.MANIFEST).is_file():
        return io.load(path, trust_remote_code=trust_remote_code)
    return adapter.load_hf(path, trust_remote_code=trust_remote_code).model


@torch.no_grad()
def run(path: str | None, seqlen: int = 128, batch_size: int = 1, device: str | None = None,
        repeats: int = 5, trust_remote_code: bool = False) -> dict:
    """Median forward latency over ``repeats`` runs on random tokens, after one warm-up."""
    dev = devices.pick(device)
    model = _load(path, trust_remote_code).to(dev)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seqlen), generator=torch.Generator().manual_seed(0)).to(dev)
    devices.reset_peak_memory(dev)
    model(input_ids=ids)
    times = []
    for _ in range(repeats):
        devices.synchronize(dev)
        t = time.perf_counter()
        model(input_ids=ids)
        devices.synchronize(dev)
        times.append(time.perf_counter() - t)
    latency = sorted(times)[len(times) // 2]
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"model": path or "bundled", "device": str(dev), "batch_size": batch_size, "seqlen": seqlen,
            "latency_ms": round(latency * 1000, 3), "tokens_per_s": round(batch_size * seqlen / latency, 1),
            "weight_bytes_in_memory": weight_bytes, "peak_memory_bytes": devices.peak_memory(dev)}
