"""The streamed save of a lazily loaded run: the output directory written window by window while the model is
compressed, never its whole state in memory (`StreamedSave`), then one ``model.safetensors`` joined by byte copy
(`join_safetensors`). The saved format is `io.save`'s.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from . import io, model as adapter, outdir


class StreamedSave:
    """Write an output directory while the model is being compressed, without its whole state in memory:
    `add` writes each finished window of blocks into a part file (while its tensors still exist), `finish`
    writes the rest (embeddings, norms, head), joins the parts into one ``model.safetensors`` by copying their
    bytes (`join_safetensors`: constant memory) and completes the directory as `save` does. The directory is
    atomic as with `save`: ``with StreamedSave(...) as s:`` — nothing is left if the block fails."""

    def __init__(self, out: str | Path, dtype: torch.dtype, overwrite: bool = False):
        self.out, self.dtype, self.overwrite = Path(out), dtype, overwrite
        self.parts: list[Path] = []
        self.aliases: dict[str, str] = {}
        self.written: list[str] = []  # block prefixes already in a part

    def __enter__(self) -> "StreamedSave":
        outdir.check_out(self.out, "compress", self.overwrite)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(outdir.locked(self.out))
        self._stack.enter_context(io.writing(self.out))
        self.tmp = self._stack.enter_context(outdir.atomic_dir(self.out))
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def _part(self, model: nn.Module, keep: Callable[[str], bool]) -> None:
        state, aliases = io.state_for_save(model, self.dtype, keep)
        path = self.tmp / f".part-{len(self.parts):05d}.safetensors"
        with io.writing(self.out):
            save_file(state, str(path))
        self.parts.append(path)
        self.aliases.update(aliases)

    def add(self, model: nn.Module, blocks: list[int]) -> None:
        """Write these blocks' tensors (a window: tensors shared inside it are stored once)."""
        root, _ = adapter.find_blocks(model)
        prefixes = tuple(adapter.block_prefix(root, i) for i in blocks)
        self._part(model, lambda name: name.startswith(prefixes))
        self.written += prefixes

    def finish(self, model: nn.Module, tokenizer, manifest: dict, extras=None) -> Path:
        root, blocks = adapter.find_blocks(model)
        if len(self.written) != len(blocks):
            raise RuntimeError(f"StreamedSave: {len(self.written)} of {len(blocks)} blocks were written")
        self._part(model, lambda name: not name.startswith(f"{root}."))
        with io.writing(self.out):
            join_safetensors(self.parts, self.tmp / io.WEIGHTS)
            for p in self.parts:
                p.unlink()
            io.complete_dir(self.tmp, model, tokenizer, manifest, self.dtype, self.aliases, extras)
        return self.out


def join_safetensors(parts: list[Path], dest: Path, chunk: int = 1 << 24) -> None:
    """One safetensors file holding every tensor of ``parts`` (names distinct), written by copying each part's
    data bytes behind one merged header: memory is one ``chunk``, whatever the files' sizes."""
    header, offset, sizes = {"__metadata__": {"format": "pt"}}, 0, []
    for p in parts:
        n, h = io.safetensors_header(p)
        h.pop("__metadata__", None)
        for name, e in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"]):
            a, b = e["data_offsets"]
            header[name] = {**e, "data_offsets": [a + offset, b + offset]}
        sizes.append((n, p.stat().st_size - 8 - n))
        offset += sizes[-1][1]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(dest, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for p, (n, _) in zip(parts, sizes):
            with open(p, "rb") as f:
                f.seek(8 + n)
                shutil.copyfileobj(f, out, chunk)
