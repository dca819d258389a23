"""`sparselm bench`: latency, throughput and memory of a compressed model beside the dense model it came
from; kept apart from quality evaluation.

Measured (median and spread of ``repeats`` runs after a warm-up, compressed and dense interleaved):
  * per layer type and shape: latency of one compressed layer vs its dense ``nn.Linear`` (and ``torch.mv``
    at one token), at decode (1 token) and prefill (``layer_tokens``), each call with cold caches (`_Evict`): in
    a model's decode every layer reads its weight from memory, and timing one layer over and over would read it
    from cache (the Intel Xeon here has a 480 MiB L3) and measure arithmetic instead;
  * end to end: ``generate`` tokens/s with the KV cache at each batch size, prefill tokens/s;
  * memory: resident weight bytes (compressed layers: stored vs resident, runtime forms included; the rest)
    and the peak resident set while running (CPU) or peak allocated bytes (accelerator).
The dense original is the manifest's ``base_model``; if it cannot be loaded, it is rebuilt in memory by
multiplying the factors back (as `io.export` does).
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from torch import nn

from . import device as devices, io, kernels
from . import model as adapter
from .modules import CompressedLinear

log = logging.getLogger(__name__)


def _stats(times: list[float]) -> dict:
    ms = [t * 1000 for t in times]
    return {"median_ms": round(statistics.median(ms), 4), "min_ms": round(min(ms), 4), "max_ms": round(max(ms), 4),
            "runs": len(ms)}


class _Evict:
    """Evicts the caches in front of ``dev``'s memory: reads and writes a buffer twice the last-level cache
    (`device.last_level_cache_bytes`; 64 MiB if unknown, at most 2 GiB). A plain fill would not do: large
    memsets use stores that bypass the cache."""

    def __init__(self, dev: torch.device):
        llc = devices.last_level_cache_bytes(dev)
        self.nbytes = min(2 * llc, 2 << 30) if llc else 64 << 20
        self._buf = torch.zeros(self.nbytes // 4, dtype=torch.int32, device=dev)

    def __call__(self) -> None:
        self._buf.add_(1)


def _interleaved(fns: dict, repeats: int, dev: torch.device, before=None) -> dict:
    """Time each function ``repeats`` times, one round of all of them at a time (fair under shared load);
    ``before`` (untimed) runs before each timed call."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up: builds runtime forms and the C++ extension, grows scratch buffers
    for _ in range(repeats):
        for k, f in fns.items():
            if before is not None:
                before()
            devices.synchronize(dev)
            t = time.perf_counter()
            f()
            devices.synchronize(dev)
            times[k].append(time.perf_counter() - t)
    return {k: _stats(v) for k, v in times.items()}


class _PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 2 ms; Linux /proc)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def resident(model: nn.Module) -> dict:
    """Weight bytes held by ``model``: compressed layers (stored and resident) and everything else."""
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    inside = {t.data_ptr() for m in layers for t in m.buffers()}
    seen, other = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in inside or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        other += t.numel() * t.element_size()
    stored = sum(m.stored_bytes() for m in layers)
    res = sum(m.resident_bytes() for m in layers)
    return {"compressed_layers": len(layers), "compressed_stored_bytes": stored, "compressed_resident_bytes": res,
            "other_weight_bytes": other, "resident_weight_bytes": res + other,
            "panel_scratch_bytes": kernels.scratch_bytes()}


def _load(path: str | None, trust_remote_code: bool = False) -> tuple[nn.Module, dict | None]:
    if path is not None and (Path(path) / io.MANIFEST).is_file():
        return io.load(path, trust_remote_code=trust_remote_code), io.read_manifest(path)
    loaded = adapter.load_hf(path, trust_remote_code=trust_remote_code)
    return loaded.model.to(loaded.storage_dtype), None


def dense_twin(compressed: nn.Module, manifest: dict, path: str,
               trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """The dense model a compressed one came from, in its dtype: the base model, else rebuilt in memory."""
    base = manifest.get("base_model")
    try:
        model = adapter.load_hf(base, dtype=compressed.dtype, trust_remote_code=trust_remote_code).model
        return model, str(base)
    except Exception as e:  # unreachable hub id, moved directory: rebuild as export does
        log.warning("base model %r unavailable (%s); rebuilding the dense model in memory", base, e)
    model = io.load(path, trust_remote_code=trust_remote_code)
    for name, m in io.compressed_modules(model).items():
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        dense.weight.data = m.dense_weight().to(compressed.dtype).contiguous()
        if m.bias is not None:
            dense.bias.data = m.bias.to(compressed.dtype).clone()
        adapter.swap(model, name, dense)
    for name, m in io.narrowed_modules(model).items():  # structurally pruned: back at the dense widths (zeros)
        rec = io.narrowed_of(m)
        adapter.swap(model, name, adapter.padded_linear(m, rec.dense_shape, rec.rows, rec.cols))
    return model, "rebuilt from the factors"


def _signature(m: CompressedLinear) -> str:
    extra = getattr(m, "pattern", None) or (str(m.store) if m.storage.value != "dtype" else "")
    return f"{type(m).__name__}{f' {extra}' if extra else ''} {m.in_features}->{m.out_features}"


def layer_rows(compressed: nn.Module, dense: nn.Module | None, tokens: list[int], repeats: int,
               dev: torch.device, evict: _Evict | None = None) -> list[dict]:
    """One row per distinct compressed layer type and shape, per token count (a structurally narrowed plain
    layer beside the dense layer it replaced, each with an input of its own width); ``evict`` runs before each
    timed call."""
    firsts: dict[str, str] = {}
    for name, m in io.compressed_modules(compressed).items():
        firsts.setdefault(_signature(m), name)
    for name, m in io.narrowed_modules(compressed).items():
        firsts.setdefault(f"Linear (narrowed) {m.in_features}->{m.out_features}", name)
    rows = []
    for sig, name in firsts.items():
        cm = compressed.get_submodule(name)
        dm = dense.get_submodule(name) if dense is not None else None
        for t in tokens:
            x = torch.randn(t, cm.in_features, generator=torch.Generator().manual_seed(0)).to(dev, compressed.dtype)
            xd = x if not isinstance(dm, nn.Linear) or dm.in_features == cm.in_features else torch.randn(
                t, dm.in_features, generator=torch.Generator().manual_seed(0)).to(dev, compressed.dtype)
            fns = {"compressed": lambda: cm(x)}
            if isinstance(dm, nn.Linear):
                fns["dense_linear"] = lambda: dm(xd)
                if t == 1:
                    fns["dense_mv"] = lambda: torch.mv(dm.weight, xd[0])
            r = _interleaved(fns, repeats, dev, evict)
            row = {"layer": sig, "example": name, "tokens": t, **{f"{k}_ms": v["median_ms"] for k, v in r.items()},
                   "spread": r}
            if "dense_linear" in r:
                best = min(v["median_ms"] for k, v in r.items() if k != "compressed")
                row["vs_linear"] = round(r["compressed"]["median_ms"] / r["dense_linear"]["median_ms"], 3)
                row["vs_best_dense"] = round(r["compressed"]["median_ms"] / best, 3)
            rows.append(row)
    return rows


def model_rows(model: nn.Module, batch_sizes: list[int], new_tokens: int, prefill: list[int], repeats: int,
               dev: torch.device) -> dict:
    """generate tokens/s with the KV cache (a 8-token prompt) and prefill tokens/s of one model."""
    vocab, out = model.config.vocab_size, {}
    g = torch.Generator().manual_seed(0)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with _PeakRSS() as rss:
        devices.reset_peak_memory(dev)
        for b in batch_sizes:
            ids = torch.randint(0, vocab, (b, 8), generator=g).to(dev)
            s = _interleaved({"g": lambda: model.generate(ids, **kw)}, repeats, dev)["g"]
            out[f"generate_b{b}"] = {**s, "tokens_per_s": round(b * new_tokens / (s["median_ms"] / 1000), 2)}
        for t in prefill:
            ids = torch.randint(0, vocab, (1, t), generator=g).to(dev)
            s = _interleaved({"p": lambda: model(input_ids=ids)}, repeats, dev)["p"]
            out[f"prefill_{t}"] = {**s, "tokens_per_s": round(t / (s["median_ms"] / 1000), 1)}
    out["peak_rss_bytes"] = rss.peak
    out["peak_device_bytes"] = devices.peak_memory(dev)
    return out


@torch.no_grad()
def run(path: str | None, repeats: int = 3, layer_tokens: tuple[int, ...] = (1, 512, 2048),
        prefill_tokens: tuple[int, ...] = (512, 2048), batch_sizes: tuple[int, ...] = (1, 8), new_tokens: int = 32,
        device: str | None = None, threads: int | None = None, trust_remote_code: bool = False) -> dict:
    """Benchmark a sparselm output directory beside its dense original (or a plain HF model alone)."""
    if threads:
        torch.set_num_threads(threads)
    dev = devices.pick(device)
    compressed, manifest = _load(path, trust_remote_code)
    compressed = compressed.to(dev)
    limit = getattr(compressed.config, "max_position_embeddings", None) or max(prefill_tokens)
    prefill = sorted({min(t, limit - 8) for t in prefill_tokens})
    result = {"model": path or "bundled", "device": str(dev), "threads": torch.get_num_threads(),
              "dtype": str(compressed.dtype).removeprefix("torch."), "repeats": repeats,
              "kernels": "C++" if kernels.extension_available() else "torch fallback"}
    result["compressed"] = model_rows(compressed, list(batch_sizes), new_tokens, prefill, repeats, dev)
    result["compressed"]["memory"] = resident(compressed)
    dense, source = (None, None) if manifest is None else dense_twin(compressed, manifest, path, trust_remote_code)
    if dense is not None:
        dense = dense.to(dev).eval()
        result["dense_source"] = source
        result["dense"] = model_rows(dense, list(batch_sizes), new_tokens, prefill, repeats, dev)
        result["dense"]["memory"] = resident(dense)
        result["speedup"] = {k: round(result["compressed"][k]["tokens_per_s"] / result["dense"][k]["tokens_per_s"], 3)
                             for k in result["compressed"] if isinstance(result["compressed"][k], dict)
                             and "tokens_per_s" in result["compressed"][k]}
    evict = _Evict(dev)
    result["layer_cache_evicted_bytes"] = evict.nbytes
    result["layers"] = layer_rows(compressed, dense, list(layer_tokens), repeats, dev, evict)
    return result
