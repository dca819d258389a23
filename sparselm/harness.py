"""lm-evaluation-harness in process: zero-shot / few-shot task scores of a loaded (compressed) model.

lm-eval's ``HFLM`` wrapper takes a model object, so a compressed model is evaluated as it is loaded — no
export. lm-eval is an optional extra (``pip install -e ".[eval]"``). Offline (``HF_HUB_OFFLINE`` set, or
the Hub unreachable within a few seconds), the Hub is never contacted: a task whose dataset is not in the
local cache fails at once with a message naming the dataset, never a hang in retries.

Scores are reported as lm-eval gives them (``acc``, ``acc_norm`` … per task, filter ``none`` dropped from
the key). lm-eval's ``wikitext`` *word* perplexity is a different quantity from sparselm's pinned
token-level perplexity and is labelled so. Every run records what reproduces it (task versions, datasets,
splits, few-shot counts, limit, seeds, library versions).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import InputError

log = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[eval]"  (or: pip install "lm-eval>=0.4.13,<0.5")'
SEED = 1234  # lm-eval's default random seed; the numpy / torch / few-shot seeds follow it
WORD_PPL_NOTE = ("lm-eval word perplexity (per whitespace word, document level) - not sparselm's token-level "
                 "perplexity")
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    """``"piqa, hellaswag,my/task.yaml"`` -> ``["piqa", "hellaswag", "my/task.yaml"]`` (at least one)."""
    items = spec if isinstance(spec, list) else str(spec or "").split(",")
    tasks = [t.strip() for t in items if t and t.strip()]
    if not tasks:
        raise InputError(f"--tasks {spec!r} names no task", "give lm-eval task names or YAML paths, e.g. "
                         "--tasks piqa,hellaswag")
    return tasks


def requested(tasks: str | list[str] | None) -> list[str] | None:
    """The task list of a ``--tasks`` value (None: none asked for); lm-eval missing is an error now, before any
    model is loaded."""
    if tasks is None:
        return None
    found = parse_tasks(tasks)
    _lm_eval()
    return found


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("--tasks needs lm-evaluation-harness, which is not installed", f"install it: {INSTALL}") \
            from None
    return lm_eval, HFLM, TaskManager


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout`` seconds (and offline mode is not asked for)."""
    if any(os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE") for f in _OFFLINE_FLAGS):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_hub(offline: bool):
    """While inside, the Hub libraries act as if ``HF_HUB_OFFLINE=1`` (they read it at import, so their
    module constants are switched too); everything is restored on exit."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub
    saved_env = {f: os.environ.get(f) for f in _OFFLINE_FLAGS}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update({f: "1" for f in _OFFLINE_FLAGS})
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for f, v in saved_env.items():
            os.environ.pop(f, None) if v is None else os.environ.__setitem__(f, v)


def _resolve(tasks: list[str], include_path: str | None, TaskManager):
    """(task specs lm-eval loads, the TaskManager): a directory names every task in it, a YAML file itself."""
    paths, specs = [], []
    for t in tasks:
        p = Path(t)
        if p.is_dir():
            paths.append(str(p))
            specs.extend(TaskManager(include_path=str(p), include_defaults=False).all_subtasks or [None])
            if specs[-1] is None:
                raise InputError(f"--tasks {t!r}: the directory holds no lm-eval task YAML", "give a task directory")
        elif p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise InputError(f"--tasks {t!r}: no such task file", "check the path of the task YAML")
            specs.append(str(p.resolve()))
        else:
            specs.append(t)
    if include_path:
        if not Path(include_path).is_dir():
            raise InputError(f"--include-path {include_path!r} is not a directory", "give a directory of task YAMLs")
        paths.append(include_path)
    by_name = any(not (Path(t).is_dir() or Path(t).suffix in (".yaml", ".yml")) for t in tasks)
    return specs, TaskManager(include_path=paths or None, include_defaults=by_name)


def _dataset_of(manager, spec: str) -> str:
    entry = manager.task_index.get(spec)
    cfg = (entry.cfg if entry is not None else None) or {}
    if not cfg and Path(spec).is_file():
        import yaml
        with contextlib.suppress(Exception):
            cfg = yaml.safe_load(Path(spec).read_text()) or {}
    name = cfg.get("dataset_path")
    return f"{name}{'/' + cfg['dataset_name'] if cfg.get('dataset_name') else ''}" if name else "(its dataset)"


def _diagnose(manager, specs: list[str], offline: bool) -> InputError | None:
    """After a failed run: load each task alone; the first that fails is named with its dataset."""
    for spec in specs:
        try:
            manager.load([spec])
        except KeyError:
            return InputError(f"unknown lm-eval task {spec!r}", "list them with `lm-eval ls tasks`, or give a task "
                              "YAML path / directory (--tasks path.yaml, --include-path DIR)")
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
            where = "is not in the local cache and the Hub is offline" if offline else "could not be loaded"
            return InputError(f"lm-eval task {spec!r}: dataset {_dataset_of(manager, spec)} {where} "
                              f"({type(e).__name__}: {str(e)[:200]})",
                              "run once with network access to cache it (under HF_HOME), or give a local task "
                              "YAML whose dataset is a local file")
    return None


def run_tasks(model, tokenizer, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              batch_size: int = 8, device: str = "cpu", seed: int = SEED, include_path: str | None = None) -> dict:
    """Evaluate ``model`` (already on ``device``) on lm-eval ``tasks``; scores per task + reproducibility."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    offline = not hub_reachable()
    with offline_hub(offline):
        specs, manager = _resolve(tasks, include_path, TaskManager)
        quiet = logging.getLogger("lm_eval.models.huggingface")  # it warns that a model object was passed: intended
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=batch_size)
        finally:
            quiet.setLevel(level)
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot,
                                          limit=limit, log_samples=False, bootstrap_iters=0, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except Exception:
            found = _diagnose(manager, specs, offline)
            if found is None:
                raise
            raise found from None
    out = summarize(res, limit, seed, offline)
    out["reproduce"]["model_dtype"] = str(getattr(model, "dtype", "")).removeprefix("torch.")
    return out


def _scores(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    if "word_perplexity" in out:
        out["word_perplexity_note"] = WORD_PPL_NOTE
    return out


def summarize(res: dict, limit, seed: int, offline: bool) -> dict:
    """lm-eval's result object -> ``{"tasks": {name: scores}, "reproduce": {...}}`` (JSON-ready)."""
    import torch
    import transformers
    configs = res.get("configs", {})
    tasks, reproduce = {}, {}
    for name, metrics in res["results"].items():
        tasks[name] = _scores(metrics)
        cfg = configs.get(name, {})
        reproduce[name] = {"version": res.get("versions", {}).get(name), "num_fewshot": res.get("n-shot", {}).get(name),
                           "samples": (res.get("n-samples", {}).get(name) or {}).get("effective"),
                           "dataset": cfg.get("dataset_path"), "dataset_name": cfg.get("dataset_name"),
                           "split": cfg.get("test_split") or cfg.get("validation_split"),
                           "revision": (cfg.get("dataset_kwargs") or {}).get("revision"),
                           "data_files": (cfg.get("dataset_kwargs") or {}).get("data_files")}
    return {"tasks": tasks, "reproduce": {"tasks": reproduce, "limit": limit, "seed": seed, "offline": offline,
                                          "lm_eval_version": res.get("lm_eval_version"),
                                          "transformers_version": transformers.__version__,
                                          "torch_version": torch.__version__}}
