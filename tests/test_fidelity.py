"""Fidelity without labels, and `eval --tasks` without lm-eval installed."""
from __future__ import annotations

import sys

import pytest
import torch

from sparselm import api, fidelity
from sparselm.errors import InputError
from tests.conftest import VOCAB, tiny_model


def _damaged(arch: str, scale: float):
    m = tiny_model(arch)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.add_(scale * p.std() * torch.randn_like(p))
    return m


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_identity_is_perfect_and_damage_is_measured(arch):
    windows = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(3))
    same = fidelity.compare(tiny_model(arch), tiny_model(arch), windows, batch_size=5)
    assert same["final_rel_error"] == 0 and all(e == 0 for e in same["block_rel_error"])
    assert len(same["block_rel_error"]) == 2
    little = fidelity.compare(tiny_model(arch), _damaged(arch, 0.05), windows, batch_size=5)
    much = fidelity.compare(tiny_model(arch), _damaged(arch, 0.5), windows, batch_size=5)
    assert 0 < little["final_rel_error"] < much["final_rel_error"]
    assert 0 < little["block_rel_error"][0] < much["block_rel_error"][0]
    if arch == "bert":
        assert same["embedding_cosine"] == pytest.approx(1) and same["nn_agreement"] == 1
        assert much["embedding_cosine"] < little["embedding_cosine"] < 1
        assert much["nn_agreement"] < 1
    else:
        assert same["top1_agreement"] == 1 and same["kl_nats_per_token"] == pytest.approx(0, abs=1e-6)
        assert much["top1_agreement"] < little["top1_agreement"] <= 1
        assert much["kl_nats_per_token"] > little["kl_nats_per_token"] > 0


def test_eval_fidelity_of_a_compressed_dir(tiny_llama_dir, tmp_path):
    from sparselm.config import Recipe, Sparsity, WandaSpec
    out = tmp_path / "w"
    api.compress_model(str(tiny_llama_dir), Recipe(methods=(WandaSpec(target=Sparsity(0.5)),)), nsamples=4,
                       seqlen=32, out=str(out), evaluate_ppl=False)
    r = api.evaluate_model(str(out), seqlen=32, max_windows=4, fidelity=True)
    fid = r["fidelity"]
    assert fid["base_model"] == str(tiny_llama_dir) and len(fid["block_rel_error"]) == 2
    assert 0 < fid["final_rel_error"] and 0 < fid["top1_agreement"] < 1 and fid["kl_nats_per_token"] > 0
    assert "perplexity" in r
    from typer.testing import CliRunner
    from sparselm.cli import app
    cli = CliRunner().invoke(app, ["eval", str(out), "--seqlen", "32", "--max-windows", "4", "--fidelity", "--json"])
    assert cli.exit_code == 0, cli.output
    last = __import__("json").loads(cli.stdout.strip().splitlines()[-1])
    assert {"perplexity", "tokens", "dataset", "seqlen"} <= set(last)
    assert last["fidelity"]["top1_agreement"] == pytest.approx(fid["top1_agreement"])
    api.evaluate_model(str(out), seqlen=32, max_windows=4, fidelity=True, record=True)
    recorded = __import__("json").loads((out / "sparselm.json").read_text())["evaluations"]
    assert len(recorded) == 1 and recorded[0]["fidelity"]["top1_agreement"] == pytest.approx(fid["top1_agreement"])
    assert f"top1_agreement {fid['top1_agreement']:.4f}" in (out / "report.html").read_text()
    assert f"top1_agreement {fid['top1_agreement']:.4f}" in (out / "README.md").read_text()
    assert not list(out.glob(".*partial*"))
    manifest = __import__("json").loads((out / "sparselm.json").read_text())
    (out / "sparselm.json").write_text(__import__("json").dumps({**manifest, "base_model": None}))
    with pytest.raises(InputError, match="names no base_model"):  # never the bundled model by default
        api.evaluate_model(str(out), seqlen=32, max_windows=1, fidelity=True)
    with pytest.raises(InputError, match="not a sparselm output"):
        api.evaluate_model(str(tiny_llama_dir), seqlen=32, max_windows=1, fidelity=True)


def test_tasks_without_lm_eval_is_an_input_error(tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(InputError, match="lm-evaluation-harness, which is not installed") as e:
        api.evaluate_model(str(tiny_llama_dir), seqlen=32, max_windows=1, tasks="piqa")
    assert '.[eval]' in e.value.fix
