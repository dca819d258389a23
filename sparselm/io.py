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
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .version import __version__
from . import model as adapter, outdir
from .errors import InputError
from .metrics import dense_accounting, layer_accounting, narrow_accounting, totals
from .modules import MODULE_CLASSES, CompressedLinear, Narrowed, mark_narrowed, narrowed_of
from .plan import Allocation
from .recipes import spec_from_dict, spec_to_dict

MANIFEST = outdir.MARKERS["compress"]
EXPORT_MARKER = outdir.MARKERS["export"]
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
RUN_FILES = ("report.html", "README.md", "recipe.yaml")  # about the compressed run: not copied by export


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


def state_for_save(model: nn.Module, dtype: torch.dtype, keep: Callable[[str], bool] = lambda name: True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict (the names ``keep`` accepts) with dense tensors in ``dtype`` and tied tensors stored once
    (aliases returned)."""
    inside = {f"{n}.{b}" for n, m in compressed_modules(model).items() for b, _ in m.named_buffers()}
    state, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        if not keep(name):
            continue
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


def layer_entry(module: CompressedLinear, dtype: torch.dtype) -> dict:
    """A compressed layer's manifest entry, from the layer alone: class, constructor meta, buffer shapes,
    spec, accounting against the dense weight in ``dtype`` (a shared dictionary charged once over its
    ``group``), the method's info and the group."""
    return {"class": type(module).__name__, "meta": module.meta(),
            "buffers": {b: [list(t.shape), _dtype_name(t.dtype)] for b, t in module.named_buffers()},
            "spec": spec_to_dict(module.spec) if module.spec is not None else {"method": None},
            "accounting": layer_accounting(module, dtype, max(1, len(module.group))), "info": dict(module.info),
            "group": list(module.group)}


def narrowed_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The plain layers structured pruning narrowed (they carry a `modules.Narrowed` record)."""
    return {n: m for n, m in model.named_modules() if narrowed_of(m) is not None}


def narrowed_entry(module: nn.Linear, dtype: torch.dtype) -> dict:
    """A narrowed layer's manifest entry (the ``structured`` table): kept shape, dense shape, the rows / columns
    it kept, its bias, spec, accounting and the method's info."""
    rec = narrowed_of(module)
    shape = (module.out_features, module.in_features)
    return {"shape": list(shape), "dense_shape": list(rec.dense_shape), "rows": rec.rows, "cols": rec.cols,
            "bias": module.bias is not None, "bias_added": rec.bias_added,
            "spec": spec_to_dict(rec.spec) if rec.spec is not None else {"method": None},
            "accounting": narrow_accounting(shape, rec.dense_shape, rec.bias_added, dtype), "info": dict(rec.info)}


def describe(model: nn.Module, dtype: torch.dtype, allocation: list[Allocation] | None = None) -> dict:
    """The model's part of a manifest: every compressed layer's `layer_entry`, every structurally narrowed
    layer's `narrowed_entry` (``structured``), and the three ratios over them and over the targeted layers a
    knapsack ``allocation`` kept dense (they count at full size)."""
    layers = {n: layer_entry(m, dtype) for n, m in compressed_modules(model).items()}
    narrowed = {n: narrowed_entry(m, dtype) for n, m in narrowed_modules(model).items()}
    kept = [a for a in allocation or [] if a.kept_dense]
    rows = ([e["accounting"] for e in layers.values()] + [e["accounting"] for e in narrowed.values()]
            + [dense_accounting(*a.shape, dtype) for a in kept])
    return {"layers": layers, "structured": narrowed, "kept_dense": [a.layer for a in kept],
            "totals": totals(rows) if rows else None}


@contextlib.contextmanager
def writing(out: Path):
    """Errors of the file system while writing ``out`` (disk full, read-only) become input errors (exit 2)."""
    try:
        yield
    except OSError as e:
        raise outdir.write_error(out, e) from None


def save(model: nn.Module, tokenizer, out_dir: str | Path, manifest: dict, dtype: torch.dtype,
         overwrite: bool = False, extras=None) -> Path:
    """Write a compressed model directory atomically; ``dtype`` is the checkpoint's dense dtype.

    The manifest is completed from the model (`describe`): ``manifest`` adds to it (e.g. base model,
    calibration, per-layer errors under ``layers``) and wins where both say something.
    ``extras(manifest) -> {file name: text}``: more files (report, model card, recipe) built from the complete
    manifest and written in the same atomic step, so an incomplete run never leaves one."""
    out = Path(out_dir)
    outdir.check_out(out, "compress", overwrite)
    with outdir.locked(out), writing(out), outdir.atomic_dir(out) as tmp:
        state, aliases = state_for_save(model, dtype)
        # one metadata key: safetensors writes its metadata map in random order (the version is in the manifest)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        complete_dir(tmp, model, tokenizer, manifest, dtype, aliases, extras)
    return out


def complete_dir(tmp: Path, model: nn.Module, tokenizer, manifest: dict, dtype: torch.dtype, aliases: dict,
              extras) -> None:
    """Everything of an output directory but its weights (already in ``tmp / WEIGHTS``): config, tokenizer,
    the manifest completed from the model, the extra files."""
    config = model.config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    own = describe(model, dtype)
    layers = {n: {**e, **manifest.get("layers", {}).get(n, {})} for n, e in own["layers"].items()}
    full = {"format": "sparselm", "format_version": FORMAT_VERSION, "sparselm_version": __version__,
            "storage_dtype": _dtype_name(dtype), "tied": aliases, **own, **manifest, "layers": layers,
            "file_bytes": _file_bytes(tmp / WEIGHTS, compressed_modules(model))}
    (tmp / MANIFEST).write_text(json.dumps(full, indent=1, default=str))
    for name, text in (extras(json.loads((tmp / MANIFEST).read_text())) if extras else {}).items():
        (tmp / Path(name).name).write_text(text, encoding="utf-8")


def safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def _file_bytes(weights: Path, compressed: dict) -> dict:
    """Bytes of the written checkpoint by component: the compressed layers' buffers, their biases, the rest."""
    sizes = tensor_names_and_bytes(weights)
    inside = tuple(f"{n}." for n in compressed)
    layer = {k: v for k, v in sizes.items() if k.startswith(inside)}
    bias = sum(v for k, v in layer.items() if k.endswith(".bias"))
    return {"compressed_layers": sum(layer.values()) - bias, "compressed_biases": bias,
            "other": sum(sizes.values()) - sum(layer.values())}


def write_report(path: str | Path, text: str, marker: str) -> Path:
    """Write one report file atomically (temporary file, then rename). An existing file is replaced only if it
    is a report sparselm wrote (it contains ``marker``), never a file of the user's."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {str(path)!r} is a directory", "give a file name, e.g. comparison.html")
    if path.exists():
        with open(path, "rb") as f:
            if marker.encode() not in f.read(4096):
                raise InputError(f"--out {str(path)!r} exists and is not a sparselm report",
                                 "refusing to replace it; choose another --out")
    if not path.parent.is_dir():
        raise InputError(f"--out {str(path)!r}: directory {str(path.parent)!r} does not exist", "create it first")
    with writing(path):
        _replace_file(path, text)
    return path


def _replace_file(path: Path, text: str) -> None:
    """``path`` gets ``text`` in one rename: readers see the old file or the new one, never half of one."""
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def record_evaluation(path: str | Path, record: dict, extras=None) -> None:
    """Append ``record`` to the manifest's ``evaluations`` list of an output directory (``eval --record``), then
    rewrite ``extras(manifest)``'s files (report, model card). Each file is replaced atomically, under the
    directory's lock; the model files are not touched."""
    path = Path(path)
    with outdir.locked(path), writing(path):
        manifest = read_manifest(path)
        manifest.setdefault("evaluations", []).append(record)
        files = {MANIFEST: json.dumps(manifest, indent=1, default=str)}
        files.update(extras(json.loads(files[MANIFEST])) if extras else {})
        for name, text in files.items():
            _replace_file(path / Path(name).name, text)


def tensor_names_and_bytes(path: str | Path) -> dict[str, int]:
    """Every tensor's byte size in a safetensors file, from its header (nothing else is read)."""
    _, header = safetensors_header(Path(path))
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


def _build_empty(path: Path, manifest: dict, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM
    config = adapter.read_config(path, trust_remote_code)
    cls = AutoModelForCausalLM if adapter.is_causal(config) else AutoModel
    dtype = _manifest_dtype(manifest, "storage_dtype")
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, entry in layer_entries(manifest):
        try:
            module = MODULE_CLASSES[entry["class"]].empty(entry["meta"], entry["buffers"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"{MANIFEST}: layer {name!r} cannot be rebuilt ({type(e).__name__}: {e})",
                             "the manifest is corrupt; compress again") from None
        restore_record(module, entry)
        adapter.swap(model, name, module)
    for name, entry in structured_entries(manifest):
        adapter.swap(model, name, rebuild_narrowed(entry, dtype))
    return model.to_empty(device="cpu")


def structured_entries(manifest: dict) -> list[tuple[str, dict]]:
    """The manifest's ``structured`` table (layers narrowed by structured pruning), checked."""
    table = manifest.get("structured") or {}
    ok = isinstance(table, dict)
    for name, e in (table.items() if ok else []):
        ok = ok and isinstance(e, dict) and all(
            isinstance(e.get(k), list) and len(e[k]) == 2 and all(isinstance(d, int) and d > 0 for d in e[k])
            for k in ("shape", "dense_shape")) and isinstance(e.get("bias"), bool)
    if not ok:
        raise InputError(f"{MANIFEST}: the 'structured' table lacks or garbles a layer's shape or bias",
                         "the manifest is corrupt; compress again")
    return list(table.items())


def rebuild_narrowed(entry: dict, dtype: torch.dtype) -> nn.Linear:
    """An empty (meta) narrowed ``nn.Linear`` of its entry's shape, with its `Narrowed` record."""
    (out_f, in_f), spec = entry["shape"], entry.get("spec") or {}
    try:
        spec = spec_from_dict(spec) if spec.get("method") else None
    except InputError:
        spec = None
    layer = nn.Linear(in_f, out_f, bias=entry["bias"], device="meta", dtype=dtype)
    return mark_narrowed(layer, Narrowed(tuple(entry["dense_shape"]), entry.get("rows"), entry.get("cols"),
                                         bool(entry.get("bias_added")), spec, dict(entry.get("info") or {})))


def restore_record(module: CompressedLinear, entry: dict) -> None:
    """Give a rebuilt layer back what it was made from (spec, info, group), from its manifest entry."""
    spec = entry.get("spec") if isinstance(entry.get("spec"), dict) else {}
    try:
        module.spec = spec_from_dict(spec) if spec.get("method") else None
    except InputError:  # a spec this version does not know: the layer still loads
        module.spec = None
    info, group = entry.get("info"), entry.get("group")
    module.info = dict(info) if isinstance(info, dict) else {}
    module.group = tuple(group) if isinstance(group, list) else ()


def _manifest_dtype(manifest: dict, key: str) -> torch.dtype:
    dtype = getattr(torch, str(manifest.get(key)), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"{MANIFEST}: {key} is {manifest.get(key)!r}, not a torch dtype name",
                         "the manifest is corrupt; compress again")
    return dtype


def layer_entries(manifest: dict) -> list[tuple[str, dict]]:
    """The manifest's layer table, checked: known classes, buffer shapes as lists of ints, dtype names."""
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise InputError(f"{MANIFEST}: 'layers' is not a table of layers", "the manifest is corrupt; compress again")
    for name, entry in layers.items():
        where = f"{MANIFEST}: layer {name!r}"
        if not isinstance(entry, dict) or not {"class", "meta", "buffers"} <= set(entry):
            raise InputError(f"{where} lacks its class, meta or buffers", "the manifest is corrupt; compress again")
        if entry["class"] not in MODULE_CLASSES:
            raise InputError(f"{where} has unknown class {entry['class']!r}",
                             f"known classes: {sorted(MODULE_CLASSES)}; upgrade sparselm")
        buffers = entry["buffers"]
        for b, spec in (buffers.items() if isinstance(buffers, dict) else [("?", None)]):
            ok = (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], list)
                  and all(isinstance(d, int) and d >= 0 for d in spec[0])
                  and isinstance(getattr(torch, str(spec[1]), None), torch.dtype))
            if not ok:
                raise InputError(f"{where}: buffer {b!r} has shape/dtype {spec!r}", "the manifest is corrupt; "
                                 "compress again")
    return list(layers.items())


def load(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a compressed model from its directory, in the checkpoint's dtype (as ``from_pretrained`` in
    transformers 5). ``dtype`` casts the dense (untouched) tensors; compressed buffers keep their storage format.

    Nothing from the directory is executed: a ``config.json`` that asks for its own code (``auto_map``) is
    refused unless ``trust_remote_code``; tensors are read from safetensors only."""
    path = Path(path)
    manifest = read_manifest(path)
    if not (path / WEIGHTS).is_file():
        raise InputError(f"{str(path)!r} has no {WEIGHTS}", "the directory is incomplete; compress again")
    model = _build_empty(path, manifest, trust_remote_code)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    persistent = set(model.state_dict())
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and v in persistent and k in persistent
                                             for k, v in tied.items()):
        raise InputError(f"{MANIFEST}: 'tied' names tensors the model does not have",
                         "the manifest is corrupt; compress again")
    _reinit_nonpersistent(model, persistent)
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            names = set(f.keys())
            want = persistent - set(tied)
            if names != want:
                raise InputError(f"{WEIGHTS} does not match the manifest (missing {sorted(want - names)[:3]}, "
                                 f"unexpected {sorted(names - want)[:3]})", "the directory is corrupt; compress again")
            for name in names:
                target = params.get(name, buffers.get(name))
                target.data.copy_(f.get_tensor(name))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise InputError(f"could not read {str(path / WEIGHTS)!r} ({e})", "the file is corrupt; compress again") from None
    for alias, kept in tied.items():
        src = params.get(kept, buffers.get(kept))
        target = params.get(alias, buffers.get(alias))
        target.data.copy_(src.data)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        cast_dense(model, dtype)
    return model.eval()


def _reinit_nonpersistent(model: nn.Module, persistent: set[str]) -> None:
    """Compute the non-persistent buffers (rotary inverse frequencies, embedding scales…) that ``to_empty``
    left unset, with the model's own ``_init_weights`` — before the checkpoint's tensors are loaded, so the
    initializer can never overwrite a loaded weight (it re-initializes the whole module it is given)."""
    if not hasattr(model, "_init_weights"):
        return
    for mname, module in model.named_modules():
        own = [b for b, t in module.named_buffers(recurse=False) if t is not None]
        if any(f"{mname}.{b}".lstrip(".") not in persistent for b in own):
            model._init_weights(module)
            for b in own:
                t = module._buffers[b]
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise InputError(f"buffer {mname}.{b} of {type(model).__name__} could not be rebuilt "
                                     "(not computed by the model's initializer)",
                                     "report this architecture to sparselm; `sparselm export` output may still load")


def export(path: str | Path, out: str | Path, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Multiply the factors back into plain layers and write a dense HF directory any tool can load.

    ``out`` is checked like every output (`outdir.check_out`): with ``overwrite`` only an earlier export
    (its ``sparselm-export.json``) or an empty directory is replaced, never the input or anything else."""
    out = Path(out)
    outdir.check_out(out, "export", overwrite, sources=(path,))
    manifest = read_manifest(path)
    with outdir.locked(out):
        model = load(path, dtype=None, trust_remote_code=trust_remote_code)
        dtype = _manifest_dtype(manifest, "storage_dtype")
        for name, module in compressed_modules(model).items():
            W = module.dense_weight().to(dtype)  # (out, in)
            adapter.swap(model, name, adapter.dense_like(module.original, W, module.bias))
        model, widths = standard_model(model, dtype)
        with writing(out), outdir.atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            for f in Path(path).iterdir():  # tokenizer and generation files, as they were
                skip = (WEIGHTS, MANIFEST, "config.json", *RUN_FILES)
                if f.is_file() and f.name not in skip and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
            (tmp / EXPORT_MARKER).write_text(json.dumps({"exported_from": str(Path(path).resolve()),
                                                         "sparselm_version": __version__, "widths": widths},
                                                        indent=1))
    return {"out": str(out), "layers": len(manifest["layers"]) + len(manifest.get("structured") or {}),
            "dtype": manifest["storage_dtype"], "widths": widths}


def standard_model(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, str | None]:
    """``model`` as a standard HF model of its class, and how its structurally pruned widths were written:
    None (nothing narrowed), ``"narrow"`` (every block has the same widths: a config with smaller head counts
    / ``intermediate_size``) or ``"padded"`` (widths differ per block: the removed rows and columns are put
    back as zeros, same logits at the dense size). Bias flags are turned on where FLAP's compensation needs
    them (the biases the architecture would then add are zeros)."""
    narrowed = narrowed_modules(model)
    if not narrowed:
        return model, None
    widths = adapter.block_widths(model)
    if all(w == widths[0] for w in widths):
        fresh = _fit(model, adapter.export_configs(model, widths[0]), dtype)
        if fresh is not None:
            return fresh, "narrow"
    for name, m in narrowed.items():
        rec = narrowed_of(m)
        adapter.swap(model, name, adapter.padded_linear(m, rec.dense_shape, rec.rows, rec.cols))
    fresh = _fit(model, adapter.export_configs(model, None), dtype)
    if fresh is None:
        raise InputError(f"{type(model).__name__}: no standard config describes this structurally pruned model "
                         "(its compensation biases have no config flag)",
                         "load the compressed directory with sparselm.load instead of exporting it")
    return fresh, "padded"


def _fit(model: nn.Module, configs, dtype: torch.dtype) -> nn.Module | None:
    """A fresh model of ``model``'s class from the first config whose tensors all have ``model``'s shapes (the
    extra tensors it has must be biases: they are set to zero), holding ``model``'s tensors; else None."""
    state = model.state_dict()
    for config in configs:
        with torch.device("meta"):
            probe = type(model)(config)
        target = probe.state_dict()
        if all(k in target and target[k].shape == v.shape for k, v in state.items()) and all(
                k in state or k.endswith(".bias") for k in target):
            fresh = type(model)(config).to(dtype)
            full = {k: state[k] if k in state else torch.zeros_like(fresh.state_dict()[k]) for k in target}
            fresh.load_state_dict(full)
            return fresh.eval()
    return None
