"""Save / load / export compressed models. The only module that writes model files.

A saved directory is ``config.json`` + tokenizer files (as ``save_pretrained`` writes them),
``model.safetensors`` (compressed buffers + the untouched dense tensors, in the checkpoint's dtype; never
pickle) and ``sparselm.json`` (the manifest: format version, base model, per replaced layer its class,
spec, buffer shapes and accounting, calibration protocol, regularization applied, evaluation results).
Loading builds the base architecture on the meta device, replays the swaps from the manifest (classes
from an allowlist only), then loads the tensors. Writes go to a hidden temporary directory that is
renamed into place only when complete, so a failed run never leaves a directory that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from . import model as adapter
from .errors import InputError
from .modules import MODULE_CLASSES, CompressedLinear

MANIFEST = "sparselm.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


@contextlib.contextmanager
def _atomic_dir(out: Path):
    """Yield a hidden temporary directory that replaces ``out`` only if the block completes."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def cast_dense(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating parameter/buffer outside compressed modules (their storage stays as it is)."""
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and not isinstance(module, CompressedLinear):
                module._buffers[name] = b.to(dtype)
    return model


def _state_for_save(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with dense tensors in ``dtype`` and tied tensors stored once (aliases returned)."""
    inside = {f"{n}.{b}" for n, m in compressed_modules(model).items() for b, _ in m.named_buffers()}
    state, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        if name not in inside and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.detach().contiguous().cpu()
    return state, aliases


def save(model: nn.Module, tokenizer, out_dir: str | Path, manifest: dict, dtype: torch.dtype,
         overwrite: bool = False) -> Path:
    """Write a compressed model directory atomically; ``dtype`` is the checkpoint's dense dtype."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"output directory {str(out)!r} already exists", "choose another --out or pass --overwrite")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise InputError(f"output directory {str(out)!r} exists and is not a sparselm output",
                         "refusing to replace it even with --overwrite; choose another --out")
    with _atomic_dir(out) as tmp:
        state, aliases = _state_for_save(model, dtype)
        config = model.config
        config.dtype = dtype
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": f"sparselm {__version__}"})
        layers = manifest.setdefault("layers", {})
        for name, module in compressed_modules(model).items():
            entry = layers.setdefault(name, {})
            entry.update({"class": type(module).__name__, "meta": module.meta(),
                          "buffers": {b: [list(t.shape), _dtype_name(t.dtype)] for b, t in module.named_buffers()}})
        full = {"format": "sparselm", "format_version": FORMAT_VERSION, "sparselm_version": __version__,
                "storage_dtype": _dtype_name(dtype), "tied": aliases, **manifest}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1, default=str))
    return out


def tensor_names_and_bytes(path: str | Path) -> dict[str, int]:
    """Every tensor's byte size in a safetensors file, from its header (nothing else is read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise InputError(f"{str(path)!r} is not a sparselm output (no {MANIFEST})",
                         "give a directory written by `sparselm compress`")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{str(p)!r} is not valid JSON ({e.msg})", "the directory is corrupt; compress again") from None
    if manifest.get("format") != "sparselm" or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{str(p)!r} has format version {manifest.get('format_version')!r}",
                         f"this sparselm reads format version <= {FORMAT_VERSION}; upgrade sparselm")
    return manifest


def _build_empty(path: Path, manifest: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if adapter._is_causal(config) else AutoModel
    dtype = getattr(torch, manifest["storage_dtype"])
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype)
    for name, entry in manifest["layers"].items():
        if entry["class"] not in MODULE_CLASSES:
            raise InputError(f"{MANIFEST}: layer {name} has unknown class {entry['class']!r}",
                             f"known classes: {sorted(MODULE_CLASSES)}; upgrade sparselm")
        adapter.swap(model, name, MODULE_CLASSES[entry["class"]].empty(entry["meta"], entry["buffers"]))
    return model.to_empty(device="cpu")


def load(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a compressed model from its directory, in the checkpoint's dtype (as ``from_pretrained`` in
    transformers 5). ``dtype`` casts the dense (untouched) tensors; compressed buffers keep their storage format."""
    path = Path(path)
    manifest = read_manifest(path)
    if not (path / WEIGHTS).is_file():
        raise InputError(f"{str(path)!r} has no {WEIGHTS}", "the directory is incomplete; compress again")
    model = _build_empty(path, manifest)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    persistent = set(model.state_dict())
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            names = set(f.keys())
            want = persistent - set(manifest.get("tied", {}))
            if names != want:
                raise InputError(f"{WEIGHTS} does not match the manifest (missing {sorted(want - names)[:3]}, "
                                 f"unexpected {sorted(names - want)[:3]})", "the directory is corrupt; compress again")
            for name in names:
                target = params.get(name, buffers.get(name))
                target.data.copy_(f.get_tensor(name))
    except (OSError, RuntimeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"could not read {str(path / WEIGHTS)!r} ({e})", "the file is corrupt; compress again") from None
    for alias, kept in manifest.get("tied", {}).items():
        src = params.get(kept, buffers.get(kept))
        target = params.get(alias, buffers.get(alias))
        target.data.copy_(src.data)
    _reinit_nonpersistent(model, persistent)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        cast_dense(model, dtype)
    return model.eval()


def _reinit_nonpersistent(model: nn.Module, persistent: set[str]) -> None:
    """Recompute non-persistent buffers (e.g. rotary inverse frequencies) that ``to_empty`` left unset."""
    for mname, module in model.named_modules():
        own = [b for b, t in module.named_buffers(recurse=False) if t is not None]
        if any(f"{mname}.{b}".lstrip(".") not in persistent for b in own) and hasattr(model, "_init_weights"):
            model._init_weights(module)


def export(path: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Multiply the factors back into plain layers and write a dense HF directory any tool can load."""
    from transformers.pytorch_utils import Conv1D
    manifest = read_manifest(path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"output directory {str(out)!r} already exists", "choose another --out or pass --overwrite")
    model = load(path, dtype=None)
    for name, module in compressed_modules(model).items():
        W = module.dense_weight().to(getattr(torch, manifest["storage_dtype"]))  # (out, in)
        if module.original == "Conv1D":
            dense = Conv1D(module.out_features, module.in_features)
            dense.weight.data = W.T.contiguous()
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = W.contiguous()
        if module.bias is not None:
            dense.bias.data = module.bias.clone()
        adapter.swap(model, name, dense.to(W.dtype))
    with _atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in Path(path).iterdir():  # tokenizer and generation files, as they were
            if f.is_file() and f.name not in (WEIGHTS, MANIFEST, "config.json") and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    return {"out": str(out), "layers": len(manifest["layers"]), "dtype": manifest["storage_dtype"]}


# --- resumable runs ------------------------------------------------------------------------------------
def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def save_checkpoint(ckpt: Path, key: dict, blocks_done: int, records: dict[str, dict],
                    modules: dict[str, CompressedLinear]) -> None:
    """Write the compressed layers done so far (atomically replacing the previous checkpoint)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {f"{n}.{b}": t.detach().cpu().contiguous().clone() for n, m in modules.items()
             for b, t in m.state_dict().items()}
    save_file(state, str(tmp / "layers.safetensors"))
    layers = {n: {"class": type(m).__name__, "meta": m.meta(), "record": records[n],
                  "buffers": {b: [list(t.shape), _dtype_name(t.dtype)] for b, t in m.named_buffers()}}
              for n, m in modules.items()}
    (tmp / "progress.json").write_text(json.dumps({"key": key, "blocks_done": blocks_done, "layers": layers},
                                                  default=str))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def load_checkpoint(ckpt: Path, key: dict) -> tuple[int, dict[str, tuple[CompressedLinear, dict]]] | None:
    """(blocks done, {layer: (module, record)}) of an interrupted run with the same settings, else None."""
    if not (ckpt / "progress.json").is_file():
        return None
    progress = json.loads((ckpt / "progress.json").read_text())
    if progress["key"] != json.loads(json.dumps(key, default=str)):
        raise InputError(f"the interrupted run in {str(ckpt)!r} used other settings",
                         "rerun with the same model, method, budget and calibration, or without --resume")
    out = {}
    with safe_open(str(ckpt / "layers.safetensors"), framework="pt") as f:
        for name, entry in progress["layers"].items():
            module = MODULE_CLASSES[entry["class"]].empty(entry["meta"], entry["buffers"])
            module.load_state_dict({b: f.get_tensor(f"{name}.{b}") for b in entry["buffers"]})
            out[name] = (module, entry["record"])
    return progress["blocks_done"], out
