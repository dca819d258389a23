"""Lazy input: compress a model larger than host memory.

`open_lazy` builds the model's skeleton with its parameters on the meta device (accelerate's
``init_empty_weights``: buffers the model computes itself, such as rotary frequencies, stay real) and reads
only the tensors outside the repeated blocks (embeddings, final norm, head) from the checkpoint's safetensors
shards. `LazyBlocks` is what the block walk (`blocks.walk`) asks for a block's weights: ``load(i)`` reads
block ``i``'s tensors from the shards (one ``safe_open`` per shard and block, so no file stays mapped), and
``release(indices, finished)`` hands finished blocks to ``write`` (the output is written window by window)
and puts their tensors back on the meta device. Host memory is then about one window of blocks + the
embeddings/head + the calibration activations, whatever the model's depth.

The lazy model is the in-memory one (`model.load_hf`) tensor for tensor: the same classes built from the same
config, every tensor read from the same file and cast to the same dtype. A checkpoint whose tensor names do not
match the model's own (transformers renames some on load) is not opened lazily (`open_lazy` returns None).
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import model as adapter
from .errors import InputError

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor: the shard index, else every ``*.safetensors`` file's keys."""
    index = path / INDEX
    try:
        if index.is_file():
            return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        found = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                found.update(dict.fromkeys(h.keys(), f))
        return found
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise InputError(f"could not load model {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
                         "the checkpoint is incomplete or corrupt; download it again") from None


def _persistent(module: nn.Module, prefix: str = "") -> list[str]:
    """Qualified names of the module's parameters and persistent buffers (what a checkpoint holds)."""
    return [f"{prefix}{n}" for n in module.state_dict(keep_vars=True)]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _current(model: nn.Module, name: str) -> torch.Tensor | None:
    module, attr = _owner(model, name)
    return module._parameters.get(attr, module._buffers.get(attr))


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module, attr = _owner(model, name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


@dataclass
class LazyBlocks:
    """The blocks' weights, read from ``files`` when the walk reaches them (see the module docstring).
    ``write(indices)``: called with each finished window before its tensors are dropped."""
    model: nn.Module
    files: dict[str, Path]
    dtype: torch.dtype
    write: Callable[[list[int]], None] | None = None
    loads: list[int] = field(default_factory=list)  # block indices in the order they were read (tests, logs)

    def __post_init__(self):
        self.prefix, self.blocks = adapter.find_blocks(self.model)

    def read(self, names: list[str]) -> None:
        """Materialize ``names`` (qualified) from the shards, each cast to ``dtype`` if floating."""
        by_file = defaultdict(list)
        for n in names:
            by_file[self.files[n]].append(n)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    want = _current(self.model, n)
                    if want is not None and tuple(want.shape) != tuple(t.shape):
                        raise InputError(f"{path.name}: tensor {n} has shape {tuple(t.shape)}, the model's config "
                                         f"says {tuple(want.shape)}", "the checkpoint does not match its config.json")
                    _assign(self.model, n, t.to(self.dtype) if t.is_floating_point() else t)

    def load(self, i: int) -> None:
        """Block ``i``'s tensors that are still on the meta device (layers restored by --resume are not)."""
        prefix = adapter.block_prefix(self.prefix, i)
        state = self.blocks[i].state_dict(keep_vars=True)
        self.read([prefix + n for n, t in state.items() if t.is_meta])
        self.loads.append(i)

    def release(self, indices: list[int], finished: bool) -> None:
        """Drop the blocks' tensors (back to meta); ``finished`` (the compress walk): ``write`` them first."""
        if finished and self.write is not None:
            self.write(indices)
        for i in indices:
            prefix = adapter.block_prefix(self.prefix, i)
            for n, t in self.blocks[i].state_dict(keep_vars=True).items():
                if not t.is_meta:
                    _assign(self.model, prefix + n, torch.empty_like(t, device="meta"))


def open_lazy(src: str | Path, config, dtype: torch.dtype, trust_remote_code: bool = False) -> LazyBlocks | None:
    """The model of the local HF directory ``src`` with only its non-block tensors read, and the reader of its
    blocks; None when the checkpoint's tensor names are not the model's (load it in memory instead)."""
    from accelerate import init_empty_weights
    path = Path(src)
    files = checkpoint_files(path)
    with init_empty_weights():
        model = adapter.auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    prefix, _ = adapter.find_blocks(model)
    inside = f"{prefix}."
    names = _persistent(model)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings",
                                                                             False) else set()
    missing = [n for n in names if n not in files and n not in tied]
    if missing:
        log.info("%s: %d tensors (e.g. %s) are not stored under the model's own names; loading it in memory",
                 src, len(missing), missing[:3])
        return None
    lazy = LazyBlocks(model, files, dtype)
    lazy.read([n for n in names if not n.startswith(inside) and n in files])
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta and not n.startswith(inside)]
    if left:
        log.info("%s: %s not found in the checkpoint; loading it in memory", src, left[:3])
        return None
    return lazy


def load_lazy(name: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
              ) -> tuple[adapter.Loaded, LazyBlocks] | None:
    """`model.load_hf` of a local directory, lazily: the model (blocks on the meta device) and its block reader;
    None when it cannot be read lazily."""
    src, config = adapter.resolve(name, trust_remote_code)
    saved = adapter._dtype_of(config) or dtype  # before the model is built: building sets config.dtype
    blocks = open_lazy(src, config, dtype, trust_remote_code)
    if blocks is None:
        return None
    return adapter.Loaded(blocks.model, adapter.load_tokenizer(src, trust_remote_code), str(src), saved), blocks
