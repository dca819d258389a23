"""report.html, the comparison report, the model card and the recipe round trip of an output directory."""
from __future__ import annotations

import base64
import io as bytes_io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from matplotlib.image import imread
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparselm import api, io, report
from sparselm.cli import app
from sparselm.config import Allocate, Ratio, Recipe, SVDSpec, WandaSpec
from sparselm.recipes import load_recipe, recipe_from_dict
from sparselm.errors import InputError

runner = CliRunner()


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self._in_cell = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_cell = tag in ("td", "th")

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data.strip())


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert "http://" not in path.read_text() and "https://" not in path.read_text()  # self-contained
    return page


def _check_png(src: str) -> None:
    assert src.startswith("data:image/png;base64,")
    raw = base64.b64decode(src.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(bytes_io.BytesIO(raw))  # (h, w, 4)
    assert pixels.shape[0] >= 150 and pixels.shape[1] >= 250
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
    assert len(colours) > 10  # not a blank / single-colour image


@pytest.fixture(scope="module")
def knapsack_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "wanda-knap"
    api.compress_model(str(tiny_llama_dir), Recipe(methods=(WandaSpec(target=Ratio(0.3)),),
                                                   allocate=Allocate.KNAPSACK),
                       nsamples=4, seqlen=32, out=str(out), evaluate_ppl=True, max_windows=4, seed=3)
    return out


def test_report_of_a_knapsack_run_has_the_plots_and_tables(knapsack_run):
    page = _parse(knapsack_run / "report.html")
    manifest = io.read_manifest(knapsack_run)
    assert len(page.images) >= 5  # quality, error heatmap, method map, ratio heatmap, predicted vs measured, bytes
    for src in page.images:
        _check_png(src)
    for name, entry in manifest["layers"].items():
        assert name in page.cells
        assert f"{entry['accounting']['ratio_stored']:.5g}" in page.cells
    assert f"{manifest['evaluation']['perplexity_after']:.5g}" in page.cells
    assert manifest["versions"]["transformers"] in page.cells


def test_report_command_rebuilds_and_compares(knapsack_run, tiny_llama_dir, tmp_path):
    (knapsack_run / "report.html").unlink()
    r = runner.invoke(app, ["report", str(knapsack_run), "--json"])
    assert r.exit_code == 0, r.output
    assert len(_parse(knapsack_run / "report.html").images) >= 5
    other = tmp_path / "svd"
    api.compress_model(str(tiny_llama_dir), Recipe(methods=(SVDSpec(target=Ratio(0.3)),)), nsamples=4, seqlen=32,
                       out=str(other), evaluate_ppl=True, max_windows=4)
    svd = io.read_manifest(other)  # the checkpoint's bytes by component, from its header, match the accounting
    assert svd["file_bytes"]["compressed_layers"] == svd["totals"]["stored_bytes"] and svd["file_bytes"]["other"] > 0
    cmp = tmp_path / "cmp.html"
    r = runner.invoke(app, ["report", str(knapsack_run), str(other), "--out", str(cmp), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["runs"] == 2
    page = _parse(cmp)
    assert len(page.images) == 2 and {"wanda-knap", "svd", "wanda+knapsack"} <= set(page.cells)
    for src in page.images:
        _check_png(src)
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my own notes</html>")
    r = runner.invoke(app, ["report", str(knapsack_run), str(other), "--out", str(mine)])
    assert r.exit_code == 2 and "not a sparselm report" in r.output and "my own" in mine.read_text()


def test_model_card_front_matter(knapsack_run):
    text = (knapsack_run / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "sparselm" and {"sparselm", "compressed", "wanda"} <= set(meta["tags"])
    assert "sparselm.load(" in text and "sparselm export" in text and "token-level perplexity" in text


def test_recipe_round_trip_gives_identical_tensors(knapsack_run, tiny_llama_dir, tmp_path):
    recipe = load_recipe(knapsack_run / "recipe.yaml")
    assert recipe.calibration.nsamples == 4 and recipe.calibration.seed == 3 and recipe.methods[0].target == Ratio(0.3)
    again = tmp_path / "again"
    r = runner.invoke(app, ["compress", str(tiny_llama_dir), "--recipe", str(knapsack_run / "recipe.yaml"),
                            "--out", str(again), "--no-eval", "--json"])
    assert r.exit_code == 0, r.output
    a, b = load_file(knapsack_run / io.WEIGHTS), load_file(again / io.WEIGHTS)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
    r = runner.invoke(app, ["compress", str(tiny_llama_dir), "--recipe", str(knapsack_run / "recipe.yaml"),
                            "--nsamples", "5", "--out", str(tmp_path / "never")])
    assert r.exit_code == 2 and "contradicts the recipe" in r.output and not (tmp_path / "never").exists()


def test_recipe_calibration_section_is_checked():
    base = {"methods": [{"method": "wanda"}]}
    assert recipe_from_dict({**base, "calibration": {"nsamples": 8}}).calibration.nsamples == 8
    with pytest.raises(InputError, match="unknown key"):
        recipe_from_dict({**base, "calibration": {"samples": 8}})
    with pytest.raises(InputError, match="nsamples"):
        recipe_from_dict({**base, "calibration": {"nsamples": 0}})


def test_report_without_layers_or_evaluation_still_renders():
    text = report.render({"base_model": "x", "recipe": {"methods": [{"method": "svd"}]}, "layers": {}})
    assert "No evaluation" in text and "<img" not in text


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                if __import__("shutil").which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (the image checks above still run)")
def test_report_renders_in_a_real_browser(knapsack_run, tmp_path):
    import subprocess
    shot = tmp_path / "shot.png"
    subprocess.run([BROWSER, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,2400", (knapsack_run / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    _check_png("data:image/png;base64," + base64.b64encode(shot.read_bytes()).decode())


def _fake(method: str, ratio: float, err: float, seconds: float) -> dict:
    layers = {f"model.layers.{b}.mlp.{p}": {"spec": {"method": method, "target": {"ratio": ratio}},
                                            "accounting": {"ratio_stored": ratio, "dense_bytes": 100,
                                                           "stored_bytes": int(100 * (1 - ratio))},
                                            "rel_error": err * (1 + b), "predicted_error": None}
              for b in range(3) for p in ("up_proj", "down_proj")}
    return {"base_model": "m", "recipe": {"methods": [{"method": method}]}, "layers": layers,
            "totals": {"ratio_stored": ratio, "ratio_params": ratio, "ratio_paper": ratio},
            "compress_seconds": seconds}


def test_compare_without_perplexity_uses_the_mean_functional_error():
    runs = [(f"{m}-{r}", _fake(m, r, e, s)) for m, r, e, s in
            (("svd", 0.2, 0.1, 3.0), ("svd", 0.4, 0.3, 4.0), ("wanda", 0.2, 0.05, 1.0), ("wanda", 0.4, 0.1, 2.0))]
    text = report.compare(runs)
    assert text.count("<img ") == 2 and "mean functional error" in text
    assert report.mean_error(runs[0][1]) == pytest.approx(0.2)  # (0.1 + 0.2 + 0.3) / 3, equal bytes


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "falcon", "bert"])  # Conv1D, experts, fused qkv, encoder
def test_run_files_render_for_other_architectures(arch, tmp_path):
    import torch
    from sparselm import pipeline
    from sparselm.config import MagnitudeSpec, Sparsity
    from tests.test_architectures import tiny
    model = tiny(arch)
    recipe = Recipe(methods=(MagnitudeSpec(target=Sparsity(0.3)),))
    pipeline.compress(model, torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(1)), recipe,
                      torch.device("cpu"), torch.float32)
    files = {}
    io.save(model, None, tmp_path / "c", {"base_model": arch, "recipe": {"methods": [{"method": "magnitude"}]}},
            torch.float32, extras=lambda m: files.update(api.run_files(m, recipe, "c")) or files)
    assert set(files) == {"recipe.yaml", "report.html", "README.md"}  # none failed to render (they would be missing)
    page = _parse(tmp_path / "c" / "report.html")
    assert len(page.images) >= 4
    for src in page.images:
        _check_png(src)
    assert next(iter(io.read_manifest(tmp_path / "c")["layers"])) in page.cells
