"""Specs validate themselves; recipes round-trip through YAML and reject unknown keys."""
from __future__ import annotations

import pytest

from sparselm.config import (Allocate, CoefStorage, CoSpaDiSpec, Pattern, Ratio, Recipe, SparseGPTSpec, Sparsity,
                             SVDLLMSpec, WandaSpec, load_recipe, recipe_from_dict, recipe_to_dict)
from sparselm.errors import InputError


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
    recipe = Recipe(methods=(CoSpaDiSpec(target=Ratio(0.3), coef_storage=CoefStorage.INT8, group_size=2),
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
])
def test_recipe_errors(bad, message):
    with pytest.raises(InputError, match=message):
        recipe_from_dict(bad)
