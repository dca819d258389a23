"""The resume checkpoint of a `compress` run: what ``--resume`` continues from.

Beside the output (``outdir.checkpoint_dir``: ``.<name>.resume/``) a run keeps
  * ``progress.json``: the run's settings (``key``: a resumed run must use the same) and the plan it follows,
    written once, before the first block's layers;
  * per finished window of blocks, ``blocks-<end>.safetensors`` (the compressed layers' buffers) and then
    ``blocks-<end>.json`` (their class, constructor meta, buffer shapes and records).
Each file is written under a temporary name and renamed into place, and a window's JSON only after its tensors:
a window counts as done exactly when its JSON is there. A checkpoint therefore grows by one window's layers per
window (linear in the model's depth), never rewriting what it already holds.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open

from . import io
from .plan import Plan
from .errors import InputError
from .modules import MODULE_CLASSES, CompressedLinear

PROGRESS = "progress.json"


def _write(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: a reader sees the whole file or none."""
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(ckpt: Path, key: dict, blocks_done: int, records: dict[str, dict],
                    modules: dict[str, CompressedLinear], plan: dict) -> None:
    """Add the layers of the window that ends at block ``blocks_done`` (``modules``, ``records``) to the
    checkpoint; the first call also writes the run's ``key`` and ``plan``. Nothing already written is rewritten.
    A write that fails leaves the checkpoint as it was (and no directory if it held nothing yet)."""
    fresh = not ckpt.exists()
    try:
        with io.writing(ckpt):
            ckpt.mkdir(parents=True, exist_ok=True)
            if not (ckpt / PROGRESS).is_file():
                _write(ckpt / PROGRESS, lambda p: p.write_text(json.dumps({"key": key, "plan": plan}, default=str)))
            stem = f"blocks-{blocks_done:05d}"
            state = {f"{n}.{b}": t.detach().cpu().contiguous().clone() for n, m in modules.items()
                     for b, t in m.state_dict().items()}
            _write(ckpt / f"{stem}.safetensors", lambda p: io.save_file(state, str(p)))
            layers = {n: {"class": type(m).__name__, "meta": m.meta(), "record": records[n],
                          "buffers": {b: [list(t.shape), io._dtype_name(t.dtype)] for b, t in m.named_buffers()}}
                      for n, m in modules.items()}
            _write(ckpt / f"{stem}.json", lambda p: p.write_text(json.dumps({"blocks_done": blocks_done,
                                                                            "layers": layers}, default=str)))
    except BaseException:
        if fresh and not any(ckpt.glob("blocks-*.json")):
            shutil.rmtree(ckpt, ignore_errors=True)
        raise


def load_checkpoint(ckpt: Path, key: dict) -> tuple[int, dict[str, tuple[CompressedLinear, dict]], Plan] | None:
    """(blocks done, {layer: (module, record)}, plan) of an interrupted run with the same settings, else None."""
    if not (ckpt / PROGRESS).is_file():
        return None
    try:
        progress = json.loads((ckpt / PROGRESS).read_text())
        same = progress["key"] == json.loads(json.dumps(key, default=str))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise _corrupt(ckpt, e) from None
    if not same:
        raise InputError(f"the interrupted run in {str(ckpt)!r} used other settings",
                         "rerun with the same model, method, budget and calibration, or without --resume")
    out, blocks_done = {}, 0
    try:
        for window in sorted(ckpt.glob("blocks-*.json")):
            entry = json.loads(window.read_text())
            with safe_open(str(window.with_suffix(".safetensors")), framework="pt") as f:
                for name, layer in io.layer_entries(entry):
                    module = MODULE_CLASSES[layer["class"]].empty(layer["meta"], layer["buffers"])
                    module.load_state_dict({b: f.get_tensor(f"{name}.{b}") for b in layer["buffers"]})
                    out[name] = (module, layer["record"])
            blocks_done = max(blocks_done, int(entry["blocks_done"]))
        return blocks_done, out, Plan.from_dict(progress["plan"])
    except (InputError, OSError, RuntimeError, SafetensorError, KeyError, TypeError, ValueError) as e:
        raise _corrupt(ckpt, e) from None


def _corrupt(ckpt: Path, e: Exception) -> InputError:
    return InputError(f"the checkpoint of the interrupted run in {str(ckpt)!r} is corrupt ({type(e).__name__}: "
                      f"{str(e)[:200]})", "rerun without --resume to start over (that replaces the checkpoint)")

