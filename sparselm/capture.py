"""Calibration statistics of linear inputs, and hooks to record them that are always removed.

`LinearStats` is what every data-aware method sees: the input Gram ``G = XᵀX`` (batches summed in float64),
the token count, the squared column norms (``diag G``, what Wanda needs) and the per-channel sum ``Σx`` (its
mean and variance: what FLAP's fluctuation metric and bias, and DSnoT's expected error need).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError


def gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` for ``x`` ``(tokens, in)`` by block rows (about eighths, multiples of 64, at least 128 wide): row
    block ``i`` is one product with the columns from ``i`` on, the blocks left of the diagonal are the transposes
    of those above it; 9/16 of the multiply-adds of ``x.T @ x`` in wide products, the same sums (BLAS has
    symmetric rank-k updates; torch does not expose them). One thread, 2048 tokens, SmolLM2's widths 576 / 1536:
    6.9 / 46.7 ms against 9.0 / 61.7 for one product and 7.7 / 53.5 for halves split again (medians; 128-wide
    block rows of 1536 took 57 ms)."""
    d = x.shape[1]
    w = max(128, d // 8 // 64 * 64)
    if d < 2 * w:
        return x.T @ x
    out = x.new_empty(d, d)  # (in, in)
    for s in range(0, d, w):
        torch.mm(x[:, s:s + w].T, x[:, s:], out=out[s:s + w, s:])
    for s in range(0, d, w):
        out[s + w:, s:s + w] = out[s:s + w, s + w:].T
        diagonal = out[s:s + w, s:s + w]  # a GEMM's own diagonal block need not be bitwise symmetric
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
    return out


@dataclass
class LinearStats:
    """Running statistics of one linear layer's inputs X ``(tokens, in)``.

    Buffers: ``gram`` ``(in, in)`` float64 = Σ xᵀx; ``count`` = number of tokens seen; ``total`` ``(in,)``
    float64 = Σ x (None when built from a Gram alone: then `mean` is an error).
    """
    gram: torch.Tensor
    count: int = 0
    total: torch.Tensor | None = None

    @classmethod
    def empty(cls, in_features: int, device: torch.device | str = "cpu") -> "LinearStats":
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64, device=device), 0,
                   torch.zeros(in_features, dtype=torch.float64, device=device))

    @classmethod
    def from_inputs(cls, x: torch.Tensor) -> "LinearStats":
        stats = cls.empty(x.shape[-1], x.device)
        stats.add_batch(x)
        return stats

    def add_batch(self, x: torch.Tensor, name: str = "") -> None:
        """Add one batch: its products in float32 (float64 inputs stay float64), summed into the float64 Gram.

        A float32 product is 2× (CPU) to 60× (consumer GPUs) faster than a float64 one; its rounding, about
        1e-6 of the batch's sum of |x_i x_j|, is far below the whitening and damping regularizations the
        methods apply. (On CUDA, leave TF32 matmuls off, PyTorch's default, for this precision.) The batch's
        ``Σx`` likewise (16× faster than summing into float64 on CPU, 2e-7 relative).
        """
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        self.gram.add_(gram(x))
        if self.total is not None:
            self.total += x.sum(0)  # the batch summed in x's dtype (pairwise: as accurate as the Gram's products)
        self.count += x.shape[0]
        # diag G = Σ x_j²: non-finite exactly when some activation is (no float64 overflow from float32 inputs)
        if not torch.isfinite(self.gram.diagonal()).all():
            raise InputError(f"non-finite activations at the input of layer {name or '?'}",
                             "check the model's weights and dtype (try float32) and the calibration text")

    @property
    def sq_norms(self) -> torch.Tensor:
        """Squared L2 norm of each input feature over all tokens, ``(in,)`` float64."""
        return self.gram.diagonal()

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input feature over the tokens, ``(in,)`` float64."""
        if self.total is None or self.count == 0:
            raise InputError("these calibration statistics have no per-channel sums (built from a Gram alone)",
                             "record them with `capture.record` or build them with `LinearStats.from_inputs`")
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each input feature over the tokens, ``diag G / N − μ²``, ``(in,)`` float64."""
        return (self.sq_norms / self.count - self.mean ** 2).clamp_min(0)

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]

    @staticmethod
    def average(stats: list["LinearStats"]) -> "LinearStats":
        """Shared metric of a group of layers (CoSpaDi §3.3): Ḡ = (1/|g|) Σ G_ℓ."""
        totals = None if any(s.total is None for s in stats) else sum(s.total for s in stats) / len(stats)
        return LinearStats(sum(s.gram for s in stats) / len(stats), stats[0].count, totals)


@contextlib.contextmanager
def record(modules: dict[str, torch.nn.Module], stats: dict[str, LinearStats],
           input_of: Callable[[torch.nn.Module, tuple], torch.Tensor] | None = None) -> Iterator[None]:
    """Accumulate each module's input into ``stats[name]`` while inside the block; hooks always removed.

    Modules fed the very same input tensor one after another (q/k/v, gate/up) share one `LinearStats`
    object: the Gram is accumulated once. Methods treat statistics as read-only.
    """
    handles = []
    last: dict = {}  # the previous hook's input tensor and the statistics it went into

    def hook_for(name: str):
        def hook(module, args, kwargs=None):
            x = input_of(module, args) if input_of else args[0]
            if last.get("x") is x and stats.get(name, last["stats"]) is last["stats"]:
                stats[name] = last["stats"]
                return
            if name not in stats:
                stats[name] = LinearStats.empty(x.shape[-1], x.device)
            stats[name].add_batch(x.detach(), name)
            last.update(x=x, stats=stats[name])
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        yield
    finally:
        last.clear()
        for h in handles:
            h.remove()


class Spilled:
    """A list of activation tensors kept on disk (one safetensors file per item, in a private directory under
    ``folder``), read back one at a time onto the device they came from: calibration activations that do not fit
    in memory. The files go when the list does."""

    def __init__(self, folder: str | Path):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="sparselm-activations-", dir=folder))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.devices: list[torch.device] = []

    def append(self, t: torch.Tensor) -> None:
        save_file({"x": t.detach().contiguous().cpu()}, str(self.dir / f"{len(self.devices)}.safetensors"))
        self.devices.append(t.device)

    def __len__(self) -> int:
        return len(self.devices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_file(str(self.dir / f"{i}.safetensors"))["x"].to(self.devices[i])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


def activation_store(folder: str | Path | None) -> Callable[[], list]:
    """A factory of activation lists: in memory (``folder`` None), else `Spilled` under ``folder``."""
    return list if folder is None else (lambda: Spilled(folder))
