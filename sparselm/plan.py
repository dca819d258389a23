"""The plan a compression follows, and planning with the knapsack (`budget`) of ROCKET's cap.

`plan_knapsack`: profiled options + a target ratio -> one `Allocation` row per layer; `Plan` (layer -> spec, the
layers compressed jointly, the rows) is what compression and a resumed run both follow; a checkpoint stores it
(`Plan.to_dict`), so a resumed run never plans again on a half-compressed model. Mixed menus: `menu_label` names
an entry, `method_errors` and `rescale` convert each entry's per-layer errors to its measured end-to-end effect.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .budget import Option, allocate, search_alpha
from .config import MethodSpec
from .errors import InputError
from .recipes import spec_from_dict, spec_to_dict

log = logging.getLogger(__name__)

DENSE = "dense"  # how a kept-dense row names its method in the manifest


@dataclass(frozen=True)
class Allocation:
    """The knapsack's choice for one targeted layer: its spec (None: kept dense), bytes and predicted error."""
    layer: str
    spec: MethodSpec | None
    size: float
    predicted_error: float
    shape: tuple[int, int]        # (out, in) of the dense weight
    error_cap: float | None

    @property
    def kept_dense(self) -> bool:
        return self.spec is None

    def to_dict(self) -> dict:
        """The manifest's allocation row (its keys are part of the saved format)."""
        spec = self.spec
        return {"layer": self.layer, "method": spec.name if spec else DENSE,
                "target": str(getattr(spec, "target", None)), "ks": getattr(spec, "ks", None), "bytes": self.size,
                "predicted_error": self.predicted_error, "shape": list(self.shape), "error_cap": self.error_cap}

    @staticmethod
    def kept_dense_row(row: dict) -> bool:
        """Whether a manifest allocation row (as `to_dict` wrote it) is a layer the knapsack kept dense."""
        return row["method"] == DENSE


@dataclass
class Plan:
    """What compression does: ``specs`` (layer -> spec; layers kept dense are absent), ``sets`` (the layers
    compressed together, in order: a set of several shares one dictionary; every planned layer is in exactly
    one set, and all of a set have the same spec) and, for the knapsack, its ``allocation`` rows. ``selection``:
    for a mixed menu, the candidate plans scored end to end, their scores and which one this is
    (`pipeline.select_plan`). ``structured``: a structured pruning spec that a mixed menu kept over the per-layer
    plans; then the whole model is pruned structurally with it (its own flow, `sparselm.structured`) and
    ``specs`` and ``sets`` are empty."""
    specs: dict[str, MethodSpec]
    sets: list[tuple[str, ...]]
    allocation: list[Allocation] | None = None
    selection: list[dict] | None = None
    structured: MethodSpec | None = None
    predicted: dict[str, float] = field(init=False)

    def __post_init__(self):
        self.predicted = {a.layer: a.predicted_error for a in self.allocation or []}
        for names in self.sets:
            if len({self.specs[n] for n in names}) != 1:
                raise ValueError(f"layers {names} are compressed together but planned with different specs")

    @property
    def shared(self) -> list[tuple[str, ...]]:
        return [s for s in self.sets if len(s) > 1]

    def to_dict(self) -> dict:
        return {"specs": {n: spec_to_dict(s) for n, s in self.specs.items()}, "sets": [list(s) for s in self.sets],
                "allocation": None if self.allocation is None else
                [{**a.to_dict(), "spec": None if a.spec is None else spec_to_dict(a.spec)} for a in self.allocation],
                "selection": self.selection,
                "structured": None if self.structured is None else spec_to_dict(self.structured)}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        rows = None if d["allocation"] is None else [
            Allocation(r["layer"], None if r["spec"] is None else spec_from_dict(r["spec"]), r["bytes"],
                       r["predicted_error"], tuple(r["shape"]), r["error_cap"]) for r in d["allocation"]]
        structured = d.get("structured")
        return cls({n: spec_from_dict(s) for n, s in d["specs"].items()}, [tuple(s) for s in d["sets"]], rows,
                   d.get("selection"), None if structured is None else spec_from_dict(structured))


def uniform_reference(options: Mapping[str, Sequence[Option]], ratio: float) -> float:
    """ROCKET's ē: the mean over layers of the error the uniform allocation would give each layer (its option
    nearest ``ratio``; with several methods, the best of them there). Layers with no compressed option are skipped."""
    errors = []
    for opts in options.values():
        compressed = [o for o in opts if o.payload is not None]
        if compressed:
            gap = min(abs(o.payload.target.value - ratio) for o in compressed)
            errors.append(min(o.error for o in compressed if abs(o.payload.target.value - ratio) == gap))
    return sum(errors) / max(len(errors), 1)


def plan_knapsack(options: Mapping[str, Sequence[Option]], shapes: Mapping[str, tuple[int, int]], ratio: float,
                  budget_bytes: float) -> list[Allocation]:
    """One `Allocation` per layer: the multiple-choice knapsack under ``budget_bytes`` with ROCKET's cap.

    Options carry their spec as ``payload`` (None: keep the layer dense). As in ROCKET, no layer may exceed
    ``α·ē`` (`uniform_reference` at ``ratio``, smallest feasible α of `budget.ALPHAS`): without the cap the knapsack
    may starve a few layers, and a sum of per-layer errors does not see how one badly damaged layer hurts the
    whole model (measured: SVD-LLM at ratio 0.5 on the bundled model, perplexity 25.5 without the cap, 23.9
    with it, 24.2 uniform).
    """
    reference = uniform_reference(options, ratio)
    try:
        cap = search_alpha(options, budget_bytes, reference) * reference
    except InputError:
        log.warning("knapsack: no error cap up to 2x the uniform mean error fits the budget; allocating without")
        cap = None
    choice = allocate(options, budget_bytes, error_cap=cap)
    return [Allocation(name, options[name][i].payload, options[name][i].size, options[name][i].error,
                       tuple(shapes[name]), cap) for name, i in choice.items()]


# --- mixed menus: per-method calibration of the errors -------------------------------------------------
def menu_label(spec: MethodSpec) -> str:
    """A menu entry's name: the method, and its value storage when it is not the method's default
    (``sparsegpt``, ``sparsegpt/int8``, ``gqsa``): one method at two storages is two entries of a mixed menu.
    Other fields do not make an entry (profiling varies some of them: ROCKET's ``ks`` per ratio)."""
    store = spec.store
    return spec.name if store == type(spec)().store else f"{spec.name}/{store}"


def method_errors(options: Mapping[str, Sequence[Option]], ratio: float) -> dict[str, float]:
    """Per entry of the menu (`menu_label`), the sum over layers of its option's error nearest ``ratio``: what a
    uniform allocation of that entry alone predicts, in the knapsack's unit."""
    sums: dict[str, float] = {}
    for opts in options.values():
        by_entry: dict[str, list[Option]] = {}
        for o in opts:
            if o.payload is not None:
                by_entry.setdefault(menu_label(o.payload), []).append(o)
        for label, found in by_entry.items():
            gap = min(abs(o.payload.target.value - ratio) for o in found)
            sums[label] = sums.get(label, 0.0) + min(o.error for o in found
                                                     if abs(o.payload.target.value - ratio) == gap)
    return sums


def rescale(options: Mapping[str, Sequence[Option]], scale: Mapping[str, float]) -> dict[str, list[Option]]:
    """The options with each entry's errors multiplied by ``scale[menu_label(spec)]`` (kept-dense options
    unchanged)."""
    return {n: [o if o.payload is None else Option(o.size, o.error * scale[menu_label(o.payload)], o.payload)
                for o in opts] for n, opts in options.items()}
