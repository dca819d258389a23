"""Model adapter: the only module that knows Hugging Face attribute paths.

Loads any HF causal LM or encoder (local directory or hub id, safetensors only, no remote code unless
asked), finds the repeated blocks without model-name tests (via ``_no_split_modules``), lists the linear
layers of a block (``nn.Linear`` and GPT-2's transposed ``Conv1D``) and swaps modules by name. It also
knows how a block is called (`block_call`, `block_output`, `stand_ins`), which projections read a block's
input (`SHARED_INPUT_PROJECTIONS`) and how to rebuild a plain layer of the original kind (`dense_like`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import InputError
from .outdir import MARKERS

log = logging.getLogger(__name__)
BUNDLED = Path(__file__).parent / "bundled" / "tiny-llama"


def is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(getattr(config, "is_decoder", False))


def _check_dir(path: Path) -> None:
    if (path / MARKERS["compress"]).is_file():
        raise InputError(f"{str(path)!r} is a sparselm output, not a plain model",
                         "compress the original model (the manifest's base_model), or `sparselm export` this "
                         "directory to a dense one first")
    if not (path / "config.json").is_file():
        raise InputError(f"model directory {str(path)!r} has no config.json",
                         "point to a Hugging Face model directory (save_pretrained output) or a hub id")
    if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
        raise InputError(f"model directory {str(path)!r} has only pickled .bin weights",
                         "sparselm reads safetensors only; convert with save_pretrained(safe_serialization=True)")


def _refuse_remote_code(path: Path) -> None:
    """A local directory whose config or tokenizer asks for its own code (``auto_map``) is refused unless the
    user passed --trust-remote-code: transformers would otherwise ask (or, told yes, run it)."""
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            asks = "auto_map" in json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{str(f)!r} is not valid JSON ({e})", "repair or replace the file") from None
        if asks:
            raise InputError(f"{str(f)!r} asks to run code shipped with the model (auto_map)",
                             "pass --trust-remote-code (trust_remote_code=True) only if you trust that code")


def _read_safely(auto, src: str | Path, trust_remote_code: bool, what: str, fix: str):
    """``auto.from_pretrained(src)`` (AutoConfig / AutoTokenizer) without running the model's code unless
    ``trust_remote_code``; its failures as input errors."""
    if Path(src).is_dir() and not trust_remote_code:
        _refuse_remote_code(Path(src))
    try:
        return auto.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise InputError(f"could not read the {what} of {str(src)!r} ({type(e).__name__}: {first})", fix) from None


def read_config(src: str | Path, trust_remote_code: bool = False):
    """The model's config, never running code from the model unless ``trust_remote_code``."""
    from transformers import AutoConfig
    return _read_safely(AutoConfig, src, trust_remote_code, "config",
                        "give a directory with a valid config.json, or a reachable hub id")


def load_tokenizer(src: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer, under the same rule as `read_config`."""
    from transformers import AutoTokenizer
    return _read_safely(AutoTokenizer, src, trust_remote_code, "tokenizer",
                        "the directory needs the tokenizer files save_pretrained writes")


def resolve(name: str | Path | None, trust_remote_code: bool = False) -> tuple[str | Path, Any]:
    """The model's source (``None``: the bundled tiny model) and its config, checked: a local directory must be
    a plain HF model with safetensors; encoder-decoder models are refused."""
    src = BUNDLED if name is None else name
    if Path(src).exists():
        _check_dir(Path(src))
    elif Path(str(src)).is_absolute() or str(src).startswith((".", "~")):
        raise InputError(f"model directory {str(src)!r} does not exist", "check the path")
    config = read_config(src, trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{str(src)!r} is an encoder-decoder model ({type(config).__name__})",
                         "sparselm compresses decoder-only causal LMs and encoders")
    return src, config


def auto_class(config):
    """The transformers auto class that builds this config's model (causal LM head, or the bare encoder)."""
    from transformers import AutoModel, AutoModelForCausalLM
    return AutoModelForCausalLM if is_causal(config) else AutoModel


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    source: str
    storage_dtype: torch.dtype  # the dtype the checkpoint was saved in: byte budgets are measured in it


def load_hf(name: str | Path | None = None, dtype: torch.dtype | None = torch.float32,
            trust_remote_code: bool = False) -> Loaded:
    """Load a local directory or hub id (``None``: the bundled tiny model) to compute in ``dtype`` (``None``:
    the checkpoint's own dtype, as `sparselm.load` and ``from_pretrained`` do)."""
    src, config = resolve(name, trust_remote_code)
    saved = _dtype_of(config) or dtype or torch.float32
    dtype = dtype or saved
    cls = auto_class(config)
    try:
        model, info = cls.from_pretrained(src, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                                          output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise InputError(f"could not load model {str(src)!r} ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
                         "give a local HF directory with config.json + *.safetensors, or a reachable hub id") from None
    bad = sorted(map(str, info.get("missing_keys") or ())) + sorted(map(str, info.get("mismatched_keys") or ()))
    if bad:
        raise InputError(f"model {str(src)!r}: {len(bad)} tensors missing from or mismatched in its safetensors "
                         f"(e.g. {bad[:3]}); they would be random", "the checkpoint is incomplete; download it again")
    tokenizer = load_tokenizer(src, trust_remote_code)
    model.eval()
    return Loaded(model, tokenizer, str(src), saved)


def _dtype_of(config) -> torch.dtype | None:
    # the old name only where a config stores it: transformers 5's `torch_dtype` property logs a deprecation
    d = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of repeated transformer blocks and its qualified name."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m).__name__ for m in module}
        if len(classes) != 1:
            continue
        hit = classes <= block_classes or not block_classes
        if hit and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise InputError(f"no repeated transformer blocks found in {type(model).__name__}",
                         "sparselm supports HF models whose blocks are listed in _no_split_modules")
    return best


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's transposed linear (transformers.pytorch_utils)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out, in)`` (GPT-2 ``Conv1D`` stores it transposed)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def original_kind(module: nn.Module) -> str:
    """What a compressed layer records as the kind it replaced (``meta['original']``): "Linear" or "Conv1D"."""
    return "Conv1D" if _is_conv1d(module) else "Linear"


def dense_like(kind: str, W: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A plain layer of ``kind`` (see `original_kind`) computing ``x Wᵀ + b`` for ``W`` ``(out, in)``."""
    out_f, in_f = W.shape
    if kind == "Conv1D":
        from transformers.pytorch_utils import Conv1D
        dense = Conv1D(out_f, in_f)
        dense.weight.data = W.T.contiguous()  # (in, out)
    else:
        dense = nn.Linear(in_f, out_f, bias=bias is not None)
        dense.weight.data = W.contiguous()
    if bias is not None:
        dense.bias.data = bias.clone()
    return dense.to(W.dtype)


# --- how blocks are called -----------------------------------------------------------------------------
CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "cache", "layer_past")  # never replayed
# fnmatch patterns on a linear's name inside its block for the projections that read the block's (normed)
# input: a dictionary shared across blocks is learned for these (CoSpaDi §2.6)
SHARED_INPUT_PROJECTIONS = ("*q_proj", "*k_proj", "*v_proj", "*gate_proj", "*up_proj", "*query", "*key", "*value",
                            "*intermediate.dense", "*c_attn", "*c_fc", "*fc1")


def block_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    """A block's call split into its hidden states and the other keyword arguments (masks, positions,
    rotary embeddings), without cache arguments and with ``use_cache`` off: what replays the call."""
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    rest = {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}
    if "use_cache" in rest:
        rest["use_cache"] = False
    return hidden, rest


def block_output(out) -> torch.Tensor:
    """The hidden states a block returns (a tensor in transformers 5; the first item of a tuple before)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def stand_ins(blocks: nn.ModuleList, seen: Callable[[int, torch.Tensor, dict], None]) -> Iterator[None]:
    """Inside the context every block only reports its call to ``seen(index, hidden, kwargs)`` and returns its
    input unchanged (its own hooks are held back: this is not a real forward). Running the model then gives
    every block's own arguments at the cost of the embeddings (they do not depend on the hidden states)."""
    saved = []

    def stand_in(i: int):
        def forward(*args, **kwargs):
            hidden, rest = block_call(args, kwargs)
            seen(i, hidden, rest)
            return hidden
        return forward

    try:
        for i, block in enumerate(blocks):
            saved.append((block, block.__dict__.get("forward"), block._forward_pre_hooks, block._forward_hooks))
            block._forward_pre_hooks, block._forward_hooks = OrderedDict(), OrderedDict()
            block.forward = stand_in(i)
        yield
    finally:
        for block, forward, pre, post in saved:
            del block.forward
            if forward is not None:  # a forward set on the instance before (e.g. by accelerate)
                block.forward = forward
            block._forward_pre_hooks, block._forward_hooks = pre, post


def block_prefix(prefix: str, index: int) -> str:
    """The qualified-name prefix of block ``index`` of the block list at ``prefix``."""
    return f"{prefix}.{index}."


def linears(block: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Linear layers of a block by qualified name (prefixed), in definition order."""
    return {f"{prefix}{n}": m for n, m in block.named_modules() if n and is_linear(m)}


def select(names: list[str], targets: tuple[str, ...], ignore: tuple[str, ...]) -> list[str]:
    """Names matching any ``targets`` pattern and no ``ignore`` pattern (fnmatch on qualified names)."""
    return [n for n in names if any(fnmatch.fnmatch(n, t) for t in targets)
            and not any(fnmatch.fnmatch(n, i) for i in ignore)]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_finite(model: nn.Module, names: list[str]) -> None:
    for name in names:
        w = linear_weight(get_module(model, name))
        if not torch.isfinite(w).all():
            raise InputError(f"layer {name} has non-finite weights", "the checkpoint is corrupt or overflowed; "
                             "reload it in float32 or exclude the layer with an ignore pattern")


# --- structured pruning: a block's prunable parts -------------------------------------------------------
# fnmatch patterns on a linear's name inside its block. Attention: the projections whose output rows are the
# heads, and the one that reads the heads (its input columns); MLP likewise for the hidden channels.
ATTENTION_IN = ("*q_proj", "*k_proj", "*v_proj", "attention.self.query", "attention.self.key", "attention.self.value")
ATTENTION_OUT = ("*o_proj", "*out_proj", "attention.output.dense")
MLP_IN = ("*gate_proj", "*up_proj", "*fc1", "intermediate.dense")
MLP_OUT = ("*down_proj", "*fc2", "output.dense")
QUERY = ("*q_proj", "attention.self.query")


@dataclass
class Part:
    """The attention or the MLP of one block, as structured pruning sees it: ``units`` prunable units (a
    KV-head group with its query heads, or an MLP channel). Unit ``u`` is the input columns
    ``cols[u]`` ``(width,)`` of the ``output`` linear and the output rows ``rows[name][u]`` of each linear in
    ``inputs`` (q/k/v or gate/up)."""
    kind: str                     # "attention" | "mlp"
    inputs: list[str]             # qualified names
    output: str
    cols: torch.Tensor            # (units, width) long
    rows: dict[str, torch.Tensor]  # name -> (units, rows per unit) long

    @property
    def units(self) -> int:
        return self.cols.shape[0]


def _heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the (text) config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_h = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_h
    d_h = getattr(config, "head_dim", None) or config.hidden_size // n_h
    return n_h, n_kv, d_h


def _units(n: int, width: int) -> torch.Tensor:
    return torch.arange(n * width).view(n, width)  # (n, width): unit u = [u*width, (u+1)*width)


def block_parts(model: nn.Module, block: nn.Module, prefix: str) -> list[Part]:
    """The prunable parts of a block (nn.Linear projections found by name; GPT-2's fused Conv1D has none).
    Attention units are whole KV groups (HF's ``repeat_kv``: query head ``h`` reads KV head ``h // g``)."""
    rel = {n: m for n, m in block.named_modules() if n and isinstance(m, nn.Linear)}

    def pick(patterns):
        return [n for n in rel if any(fnmatch.fnmatch(n, p) for p in patterns)]

    parts = []
    a_in, a_out = pick(ATTENTION_IN), pick(ATTENTION_OUT)
    if len(a_in) == 3 and len(a_out) == 1:
        n_h, n_kv, d_h = _heads(model.config)
        g = n_h // n_kv
        if rel[a_out[0]].in_features == n_h * d_h and all(
                rel[n].out_features == (n_h if n in pick(QUERY) else n_kv) * d_h for n in a_in):
            rows = {prefix + n: _units(n_kv, (g if n in pick(QUERY) else 1) * d_h) for n in a_in}
            parts.append(Part("attention", [prefix + n for n in a_in], prefix + a_out[0], _units(n_kv, g * d_h), rows))
    m_in, m_out = pick(MLP_IN), [n for n in pick(MLP_OUT) if n not in a_out]
    if m_in and len(m_out) == 1 and all(rel[n].out_features == rel[m_out[0]].in_features for n in m_in):
        width = rel[m_out[0]].in_features
        parts.append(Part("mlp", [prefix + n for n in m_in], prefix + m_out[0], _units(width, 1),
                          {prefix + n: _units(width, 1) for n in m_in}))
    return parts


def narrow_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` keeping output ``rows`` / input ``cols`` of ``layer`` (None: all), with its weight
    taken from ``weight`` ``(out, in)`` (default: the layer's) and ``bias`` (default: the layer's, narrowed)."""
    W = layer.weight.detach() if weight is None else weight.to(layer.weight.dtype)
    W = W if rows is None else W[rows]
    W = W if cols is None else W[:, cols]
    if bias is None and layer.bias is not None:
        bias = layer.bias.detach() if rows is None else layer.bias.detach()[rows]
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=layer.weight.dtype)
    new.weight.data.copy_(W)
    if bias is not None:
        new.bias.data.copy_(bias.to(new.bias.dtype))
    return new


def block_widths(model: nn.Module) -> list[dict[str, int]]:
    """Each block's attention and MLP widths as config fields (after structured pruning they may differ from
    the config): query / key-value heads from the q and k projections' rows, ``head_dim``, ``intermediate_size``."""
    _, blocks = find_blocks(model)
    n_h, n_kv, d_h = _heads(model.config)
    out = []
    for block in blocks:
        rel = {n: m for n, m in block.named_modules() if n and isinstance(m, nn.Linear)}
        w = {"head_dim": d_h}
        for n, m in rel.items():
            if any(fnmatch.fnmatch(n, p) for p in QUERY):
                w["num_attention_heads"] = m.out_features // d_h
            elif any(fnmatch.fnmatch(n, p) for p in ATTENTION_IN) and n.endswith(("k_proj", "key")):
                w["num_key_value_heads"] = m.out_features // d_h
            elif any(fnmatch.fnmatch(n, p) for p in MLP_IN):
                w["intermediate_size"] = m.out_features
        out.append(w)
    return out


def export_configs(model: nn.Module, widths: dict[str, int] | None) -> Iterator[Any]:
    """Candidate standard configs for an exported structurally pruned model, simplest first: ``widths`` set
    (None: the original widths, for a model padded back to them), then with the config's bias flags on
    (``attention_bias``, ``mlp_bias``: FLAP's compensation needs o_proj / down_proj biases). The caller keeps
    the first whose freshly built model has every tensor of the right shape."""
    import copy
    flags = [f for f in ("attention_bias", "mlp_bias") if getattr(model.config, f, None) is False]
    for on in [(), *((f,) for f in flags)] + ([tuple(flags)] if len(flags) > 1 else []):
        config = copy.deepcopy(model.config)
        for k, v in (widths or {}).items():
            if k != "num_key_value_heads" or hasattr(config, k):
                setattr(config, k, v)
        for f in on:
            setattr(config, f, True)
        yield config


def padded_linear(layer: nn.Linear, dense_shape: tuple[int, int], rows: list[int] | None,
                  cols: list[int] | None) -> nn.Linear:
    """A narrowed layer put back at its dense shape: the removed rows / columns are zeros (so are their biases)."""
    W = torch.zeros(dense_shape, dtype=layer.weight.dtype)
    r = torch.arange(dense_shape[0]) if rows is None else torch.tensor(rows)
    c = torch.arange(dense_shape[1]) if cols is None else torch.tensor(cols)
    W[r.unsqueeze(1), c.unsqueeze(0)] = layer.weight.detach()
    new = nn.Linear(dense_shape[1], dense_shape[0], bias=layer.bias is not None, dtype=layer.weight.dtype)
    new.weight.data.copy_(W)
    if layer.bias is not None:
        b = torch.zeros(dense_shape[0], dtype=layer.bias.dtype)
        b[r] = layer.bias.detach()
        new.bias.data.copy_(b)
    return new
