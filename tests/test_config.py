"""Specs validate themselves; recipes round-trip through YAML and reject unknown keys."""
from __future__ import annotations

import pytest

from sparselm.config import (Allocate, CoefStorage, CoSpaDiSpec, Pattern, Ratio, Recipe, SparseGPTSpec, Sparsity,
                             SVDLLMSpec, WandaSpec)
from sparselm.errors import InputError
from sparselm.recipes import load_recipe, recipe_from_dict, recipe_to_dict


@pytest.mark.parametrize("make", [lambda: Ratio(0.0), lambda: Ratio(1.0), lambda: Sparsity(-0.1),
                                  lambda: Pattern(4, 4), lambda: SVDLLMSpec(target=Sparsity(0.5)),
                                  lambda: SparseGPTSpec(blocksize=0), lambda: CoSpaDiSpec(rho=0.5),
                                  lambda: Recipe(methods=(WandaSpec(), SVDLLMSpec()))])
def test_invalid_specs_raise(make):
    with pytest.raises(InputError):
        make()


def test_pattern_parse():
    assert Pattern.parse("2:4") == Pattern(2, 4)
    with pytest.raises(InputError, match="N:M"):
        Pattern.parse("2x4")


def test_recipe_round_trip(tmp_path):
    recipe = Recipe(methods=(CoSpaDiSpec(target=Ratio(0.3), storage=CoefStorage.INT8, group_size=2),
                             WandaSpec(target=Pattern(2, 4))), allocate=Allocate.KNAPSACK, ignore=("*lm_head*",))
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    import yaml
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    assert load_recipe(path) == recipe


@pytest.mark.parametrize("bad, message", [
    ({"methods": [{"method": "wanda", "sparsty": 0.5}]}, "unknown key"),
    ({"methods": [{"method": "wanda"}], "allocat": "uniform"}, "unknown recipe key"),
    ({"methods": [{"method": "cospadi", "init": "zeros"}]}, "not valid"),
    ({"methods": [{"method": "svd", "target": {"ratio": 0.3, "sparsity": 0.1}}]}, "exactly one"),
    ({"methods": [{"name": "wanda"}]}, "has no 'method' key"),
    ([{"method": "wanda"}], "must be a mapping"),
])
def test_recipe_errors(bad, message):
    with pytest.raises(InputError, match=message):
        recipe_from_dict(bad)


def test_a_cli_budget_knob_in_a_recipe_points_to_the_target_key():
    with pytest.raises(InputError) as e:
        recipe_from_dict({"methods": [{"method": "wanda", "ratio": 0.5}]})
    assert "['ratio']" in e.value.what and "target: {ratio: ...}" in e.value.fix


@pytest.mark.parametrize("bad, key", [
    ({"method": "cospadi", "iters": "abc"}, "cospadi.iters"),
    ({"method": "cospadi", "iters": 2.5}, "cospadi.iters"),
    ({"method": "cospadi", "iters": True}, "cospadi.iters"),
    ({"method": "cospadi", "rho": [2.0]}, "cospadi.rho"),
    ({"method": "cospadi", "shared": "*q_proj"}, "cospadi.shared"),
    ({"method": "cospadi", "shared": [3]}, "cospadi.shared[0]"),
    ({"method": "svd", "target": {"ratio": "abc"}}, "svd.target.ratio"),
    ({"method": "svd", "target": {"ratio": [0.3]}}, "svd.target.ratio"),
    ({"method": "rocket", "coef_storage": 8}, "rocket.storage"),
])
def test_recipe_values_are_checked_against_their_declared_types(bad, key):
    with pytest.raises(InputError) as e:
        recipe_from_dict({"methods": [bad]})
    assert e.value.what.startswith(key + "=")


def test_recipe_values_are_coerced_by_declared_type_not_default():
    spec = recipe_from_dict({"methods": [{"method": "cospadi", "iters": "7", "rho": 3, "shared": ["*q_proj"],
                                          "target": {"ratio": "0.25"}, "group_size": 2.0}]}).methods[0]
    assert spec == CoSpaDiSpec(target=Ratio(0.25), iters=7, rho=3.0, shared=("*q_proj",), group_size=2)
    assert type(spec.rho) is float and type(spec.iters) is int and type(spec.group_size) is int
    assert recipe_from_dict({"methods": [{"method": "cospadi", "shared": None}]}).methods[0].shared is None
    with pytest.raises(InputError, match="targets"):
        recipe_from_dict({"methods": [{"method": "svd"}], "targets": "*"})


def test_wrong_recipe_type_exits_2_naming_the_key(tmp_path):
    from typer.testing import CliRunner
    from sparselm.cli import app
    path = tmp_path / "r.yaml"
    path.write_text("methods:\n  - {method: cospadi, iters: abc}\n")
    r = CliRunner().invoke(app, ["compress", "--recipe", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "cospadi.iters" in r.output and not (tmp_path / "o").exists()


def test_every_method_has_the_same_storage_keys_and_the_old_name_still_reads():
    """One storage rule: ``storage`` + ``quant_group`` on every spec, the model dtype by default (gqsa / gptq:
    int4 groups); ``coef_storage`` (the key's name before) is read as ``storage``, both together are an error."""
    from sparselm.config import SPECS, GPTQSpec, GQSASpec, Storage, StructuredSpec
    for name, cls in SPECS.items():
        if issubclass(cls, StructuredSpec):  # plain narrower dense layers: no values to store otherwise
            assert cls().store == Storage()
            with pytest.raises(InputError, match="structured pruning keeps plain dense"):
                cls(storage=CoefStorage.INT8)
            continue
        default = Storage(CoefStorage.INT4, {"gqsa": 16, "gptq": 128}[name]) if name in ("gqsa", "gptq") else Storage()
        assert cls().store == default, name
        spec = recipe_from_dict({"methods": [{"method": name, "storage": "int8", "quant_group": 64}]}).methods[0]
        assert spec.store == Storage(CoefStorage.INT8, 64)
    old = recipe_from_dict({"methods": [{"method": "cospadi", "coef_storage": "bf16-14bit"}]}).methods[0]
    assert old.storage is CoefStorage.BF16_14BIT and "coef_storage" not in recipe_to_dict(Recipe((old,)))["methods"][0]
    with pytest.raises(InputError, match="both"):
        recipe_from_dict({"methods": [{"method": "rocket", "coef_storage": "int8", "storage": "int8"}]})
    with pytest.raises(InputError, match="has no scales"):
        WandaSpec(storage=CoefStorage.BF16, quant_group=16)
    with pytest.raises(InputError, match=">= 0"):
        WandaSpec(storage=CoefStorage.INT4, quant_group=-1)
    with pytest.raises(InputError, match="int4 or int8"):
        GQSASpec(storage=CoefStorage.DTYPE, quant_group=0)
    assert GPTQSpec().accepts == (Ratio,)
