"""Specs and recipes as plain dicts and YAML: what recipe files, manifests and resume checkpoints hold.

Unknown keys are errors; every value is coerced by its field's declared type (an int field takes ``3`` or
``"3"``, never ``"abc"``, ``true`` or a list) and a wrong one is an `InputError` naming the key. Keys renamed
since (`RENAMED_KEYS`) are read under their new name.
"""
from __future__ import annotations

import enum
import functools
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Union

from .config import SPECS, Allocate, Calibration, MethodSpec, Pattern, Ratio, Recipe, Sparsity, Target
from .errors import InputError

RENAMED_KEYS = {"coef_storage": "storage"}  # older recipes and manifests: read under the new name


def _encode(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (Ratio, Sparsity)):
        return {type(value).__name__.lower(): value.value}
    if isinstance(value, Pattern):
        return {"pattern": str(value)}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def spec_to_dict(spec: MethodSpec) -> dict:
    return {"method": spec.name, **{f.name: _encode(getattr(spec, f.name)) for f in fields(spec)}}


def target_from_dict(d: dict, where: str = "target") -> Target:
    if not isinstance(d, dict) or len(d) != 1:
        raise InputError(f"{where} {d!r} must have exactly one of ratio, sparsity, pattern", "e.g. {ratio: 0.3}")
    (key, value), = d.items()
    makers = {"ratio": lambda v: Ratio(coerce(f"{where}.ratio", v, float)),
              "sparsity": lambda v: Sparsity(coerce(f"{where}.sparsity", v, float)),
              "pattern": lambda v: Pattern.parse(coerce(f"{where}.pattern", v, str))}
    if key not in makers:
        raise InputError(f"unknown target key {key!r} in {where}", "use ratio, sparsity or pattern")
    return makers[key](value)


def coerce(where: str, value: Any, hint: Any) -> Any:
    """``value`` as the declared type ``hint`` of the field at ``where``, or an `InputError` naming it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint == Target:
        return target_from_dict(value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(where, value, inner)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise InputError(f"{where}={value!r} is not valid", f"choose one of {[e.value for e in hint]}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}={value!r} is not a list", f"write {where.rpartition('.')[2]}: [...]")
        return tuple(coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
    if hint in (int, float) and not isinstance(value, bool):
        try:
            number = hint(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            number = None
        if number is not None and (hint is float or not isinstance(value, float) or value.is_integer()):
            return number
    elif hint in (str, bool) and isinstance(value, hint):
        return value
    kind = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}[hint]
    raise InputError(f"{where}={value!r} is not {kind}", f"write {where.rpartition('.')[2]} as {kind}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def spec_from_dict(d: dict) -> MethodSpec:
    if not isinstance(d, dict):
        raise InputError(f"method entry {d!r} is not a mapping", "write each method as {method: NAME, ...}")
    d = dict(d)
    if "method" not in d:
        raise InputError(f"method entry {d!r} has no 'method' key",
                         f"name the method: {{method: NAME, ...}} with NAME one of {', '.join(SPECS)}")
    name = d.pop("method")
    if name not in SPECS:
        raise InputError(f"unknown method {name!r}", f"choose one of {', '.join(SPECS)}")
    cls = SPECS[name]
    for old, new in RENAMED_KEYS.items():
        if old in d:
            if new in d:
                raise InputError(f"method {name!r} has both {old!r} and {new!r}", f"keep only {new!r}")
            d[new] = d.pop(old)
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        budget = sorted(unknown & {"ratio", "sparsity", "pattern"})  # the CLI's knobs: in a recipe, the target's
        hint = f"; write the budget as target: {{{budget[0]}: ...}}" if budget and "target" in known else ""
        raise InputError(f"unknown key(s) {sorted(unknown)} for method {name!r}", f"known keys: {sorted(known)}{hint}")
    hints = _field_types(cls)
    return cls(**{key: coerce(f"{name}.{key}", value, hints[key]) for key, value in d.items()})


def recipe_to_dict(recipe: Recipe) -> dict:
    out = {"methods": [spec_to_dict(s) for s in recipe.methods], "allocate": recipe.allocate.value,
           "targets": list(recipe.targets), "ignore": list(recipe.ignore)}
    if recipe.calibration is not None:
        out["calibration"] = {f.name: getattr(recipe.calibration, f.name) for f in fields(Calibration)}
    return out


def calibration_from_dict(d) -> Calibration:
    known = [f.name for f in fields(Calibration)]
    if not isinstance(d, dict) or set(d) - set(known):
        bad = sorted(set(d) - set(known)) if isinstance(d, dict) else d
        raise InputError(f"recipe calibration: unknown key(s) {bad}", f"known keys: {', '.join(known)}")
    return Calibration(**d)


def recipe_from_dict(d: dict) -> Recipe:
    if not isinstance(d, dict):
        raise InputError(f"recipe must be a mapping (got {type(d).__name__})",
                         "write methods: [{method: NAME, ...}] at the top level (README.md, 'Recipes')")
    unknown = set(d) - {"methods", "allocate", "targets", "ignore", "calibration"}
    if unknown:
        raise InputError(f"unknown recipe key(s) {sorted(unknown)}",
                         "known keys: methods, allocate, targets, ignore, calibration")
    try:
        allocate = Allocate(d.get("allocate", "uniform"))
    except ValueError:
        raise InputError(f"allocate={d.get('allocate')!r} is not valid", "use uniform or knapsack") from None
    kw = {k: coerce(k, d[k], tuple[str, ...]) for k in ("targets", "ignore") if k in d}
    if d.get("calibration") is not None:
        kw["calibration"] = calibration_from_dict(d["calibration"])
    methods = d.get("methods", [])
    if not isinstance(methods, list):
        raise InputError(f"methods={methods!r} is not a list", "write methods: [{method: NAME, ...}, ...]")
    return Recipe(methods=tuple(spec_from_dict(m) for m in methods), allocate=allocate, **kw)


def load_recipe(path) -> Recipe:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise InputError(f"recipe file {str(p)!r} not found", "give the path of a YAML recipe")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"recipe {str(p)!r} is not valid YAML ({e})", "fix the YAML syntax") from None
    return recipe_from_dict(data)

