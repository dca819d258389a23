"""The only place that names an accelerator: picks the device and says why."""
from __future__ import annotations

import functools
import logging
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from .errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")


def pick(requested: str | None = None) -> torch.device:
    """``None``/"auto": the first CUDA device if there is one, else the CPU (logged with the reason)."""
    if requested in (None, "auto"):
        if torch.cuda.is_available():
            log.info("device: cuda (a CUDA device is available)")
            return torch.device("cuda")
        log.info("device: cpu (no CUDA device found)")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"--device {requested!r} is not a device name", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {requested} asked for, but no CUDA device is available", "use --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The largest cache in front of ``device``'s memory: a CUDA device's L2, else the CPU's last level (Linux
    sysfs, cpu0); None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size) or None
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=None)


def peak_memory(device: torch.device) -> int | None:
    """Peak allocated bytes on an accelerator since the last reset (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)



def for_rank(device: torch.device, local_rank: int) -> torch.device:
    """The device of one process of several on a node: its own GPU (``cuda:LOCAL_RANK``), or the CPU."""
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"process {local_rank} of this node has no GPU ({torch.cuda.device_count()} found)",
                             "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def dist_backend(device: torch.device) -> str:
    """The torch.distributed backend for processes computing on ``device``: NCCL between GPUs, else gloo."""
    return "nccl" if device.type == "cuda" else "gloo"


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's AVX-512 BF16 / AMX kernels); elsewhere a bf16 GEMM
    is emulated and several times slower than float32 (AVX2-only AMD EPYC: 512x2048x2048 322 ms vs 42 ms,
    1536x460x460 237 ms vs 10.4 ms)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_name() -> str:
    """``"<model name> xN"`` from /proc/cpuinfo (N logical CPUs), else ``platform.processor()`` or "unknown":
    benchmark tables name the machine their numbers come from."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        return f"{names[0]} x{len(names)}"
    except (OSError, IndexError):
        return platform.processor() or "unknown"


@functools.cache
def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (oneDNN then runs bf16 GEMMs on them: 2048x2048x512 in 3 ms on 2 cores of
    the Intel Xeon of docs/benchmarks/kernels.md, so unpack + GEMM beats a GEMV from fewer tokens)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def low_precision(device: torch.device) -> torch.dtype | None:
    """bf16 where ``device`` multiplies it natively (CUDA with bf16; a CPU with `native_bf16_cpu`), else None."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and native_bf16_cpu() else None


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            line = next(ln for ln in f if ln.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def layer_workers(device: torch.device, tasks: int, task_bytes: int) -> int:
    """How many layers' independent work (option tables, compressions) runs side by side on ``device``: on a CPU one
    layer per torch thread, each with one thread (`map_layers`), at most ``tasks``, and no more than half of the
    memory available now holds at ``task_bytes`` each (unknown: one); one on an accelerator. A layer's work scales
    poorly over threads (SmolLM2's ROCKET tables, 2 threads: triangular solves 1.26x, eigendecompositions 1.5x,
    compiled mask loops 1.0x), two layers side by side fully (docs/benchmarks/README.md, session 21)."""
    if device.type != "cpu" or tasks < 2:
        return 1
    free = available_memory()
    fit = 1 if free is None else free // 2 // max(task_bytes, 1)
    return int(max(1, min(torch.get_num_threads(), tasks, fit)))


def map_layers(fn: Callable[..., T], items: Sequence, workers: int, cost: Callable | None = None) -> list[T]:
    """``[fn(x) for x in items]``, in ``workers`` Python threads with one torch thread each (torch's thread count is
    per thread: the caller's stays as it is), the costliest items (``cost``) first; results in order, the first
    error raised."""
    if workers < 2:
        return [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost is not None else range(len(items))
    threads = torch.get_num_threads()
    pool, done = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)), False
    try:
        futures = {i: pool.submit(fn, items[i]) for i in order}
        results = [futures[i].result() for i in range(len(items))]
        done = True
        return results
    finally:  # after an error (or Ctrl-C) nothing more starts and the caller does not wait for the running ones
        pool.shutdown(wait=done, cancel_futures=True)
        # torch keeps the last count set in any thread as the process's, and a thread's first parallel region in
        # each library (a C++ extension has its own) takes it: without this, the caller's next one there ran on 1
        torch.set_num_threads(threads)
