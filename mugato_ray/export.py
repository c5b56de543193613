"""A checkpoint exported in the layout of a Hugging Face model repository, and loaded back without pickle.

``export_model(checkpoint, out)`` writes, into ``out`` (complete or absent: a hidden temporary directory renamed
into place):

- ``model.safetensors``: the weights (a JSON header and raw tensors; tensors that share memory are stored once
  and tied again on load), the header's metadata holding what builds the model (``model.model_meta``);
- ``config.json``: the run config, as JSON (``config.load_config`` reads it like config.yaml);
- ``layouts.json``: the task specs and sequence layouts acting uses; ``tokenizer.json``: the BPE, when the run
  used one;
- ``README.md``: the model card, YAML front matter (``library_name``, ``tags``, the tasks) then what the model
  is and its evaluation table, from an ``eval.json`` given or found beside the checkpoint (else it says the
  model was not evaluated).

``load_export(out)`` returns the model ready to act, built from JSON and safetensors only (``model.load_model``,
the one loading path: evaluation accepts an export directory as ``--checkpoint``). Pushing to a hub is left to
the user (``huggingface-cli upload``): nothing here reaches one.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from mugato_ray.checkpoints import (
    EXPORT_CONFIG_FILE,
    EXPORT_MODEL_FILE,
    TOKENIZER_FILE,
    find_model_file,
    saved_config_file,
)
from mugato_ray.config import Config, config_to_dict, load_config
from mugato_ray.data import LAYOUTS_FILE
from mugato_ray.model import GatoModel, load_model, save_model

CARD_FILE = "README.md"
EVAL_FILE = "eval.json"
LIBRARY_NAME = "mugato-ray"
TAGS = ["reinforcement-learning", "gato", "generalist-agent", "gymnasium", "ray"]


def export_model(checkpoint: str | Path, out: str | Path, eval_json: str | Path | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Export ``checkpoint`` (anything ``jobs/evaluate.py --checkpoint`` accepts) into the new directory ``out``.

    ``eval_json``: the evaluation to put in the model card; default: ``eval/eval.json`` of the checkpoint's run,
    found by :func:`find_eval_report`. FileExistsError when ``out`` exists and is not empty."""
    model_file, out = find_model_file(checkpoint), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory; choose a new one")
    model = load_model(model_file)
    saved = saved_config_file(model_file.parent)
    cfg = load_config(saved) if saved is not None else None
    eval_path = Path(eval_json) if eval_json is not None else find_eval_report(model_file, log)
    report = json.loads(eval_path.read_text()) if eval_path is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, tmp / EXPORT_MODEL_FILE)
        if cfg is not None:
            (tmp / EXPORT_CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1))
        for name in (LAYOUTS_FILE, TOKENIZER_FILE):
            if (model_file.parent / name).is_file():
                shutil.copyfile(model_file.parent / name, tmp / name)
        (tmp / CARD_FILE).write_text(model_card(model, cfg, model_file, report))
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {model_file} to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out


def load_export(directory: str | Path, map_location: str = "cpu") -> GatoModel:
    """The model of an export directory, in eval mode, from its JSON and safetensors only (no pickle)."""
    return load_model(Path(directory) / EXPORT_MODEL_FILE, map_location=map_location).eval()


def find_eval_report(model_file: Path, log: Callable[[str], None] = print) -> Path | None:
    """``eval/eval.json`` of the run a model file belongs to (the nearest of its parent directories that has one,
    at most four levels up: ``<run_dir>/checkpoints/<run>/checkpoint_N/model.pt``), when that report evaluated
    this very model file; None otherwise (a report of another checkpoint is not this model's, and is logged)."""
    for parent in list(model_file.parents)[:4]:
        path = parent / "eval" / EVAL_FILE
        if path.is_file():
            evaluated = json.loads(path.read_text()).get("checkpoint")
            if evaluated == str(model_file):
                return path
            log(f"export: {path} evaluated {evaluated}, not {model_file}; the model card will say it was not "
                "evaluated (pass --eval to use a report anyway)")
            return None
    return None


def model_card(model: GatoModel, cfg: Config | None, model_file: Path, report: dict | None) -> str:
    """README.md of an export: YAML front matter, then the model, its tasks, its evaluation and how to load it."""
    tasks = [t.name for t in cfg.tasks] if cfg is not None else sorted((report or {}).get("tasks", {}))
    meta = {"library_name": LIBRARY_NAME, "tags": TAGS + tasks, "pipeline_tag": "reinforcement-learning"}
    step = re.search(r"(?:checkpoint|step)_(\d+)$", model_file.parent.name)
    c = model.cfg
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {LIBRARY_NAME}: {Path(cfg.run_dir).name + ', ' if cfg is not None else ''}{model_file.parent.name}", "",
        "A GATO-style generalist agent (arXiv 2205.06175): one causal transformer over tokenized text, images and "
        "discrete and continuous observations and actions, acting as a policy in Gymnasium environments.", "",
        f"- model: preset `{c.preset}`, {model.num_params():,} parameters, context {c.context} tokens",
        f"- vocabulary: {model.vocab.size} ids (text {model.vocab.text_size}, values {model.vocab.value_bins} bins)",
        f"- training steps: {int(step.group(1)) if step else 'unknown'}",
        f"- tasks: {', '.join(tasks) if tasks else 'unknown (the checkpoint had no run config)'}", "",
        "## Evaluation", "",
        *(eval_table(report) if report is not None else
          ["Not evaluated: no eval.json of this checkpoint was found beside it or given with `--eval`."]),
        "", "## Use", "",
        "```python",
        "from mugato_ray.export import load_export",
        "model = load_export(\"THIS_DIRECTORY\")  # JSON and safetensors only: no pickle",
        "```", "",
        "`python jobs/evaluate.py --checkpoint THIS_DIRECTORY run_dir=/tmp/eval` scores it on its tasks.", "",
        "Files: `model.safetensors` (weights), `config.json` (the run config), `layouts.json` (the task specs and "
        "sequence layouts), `tokenizer.json` (the BPE, when used).",
    ]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def eval_table(report: dict) -> list[str]:
    """The model card's evaluation: one row per task of an eval.json, then the IQM of the normalized scores."""
    seeds = report.get("seeds", {})
    lines = [f"Evaluated: `{report.get('checkpoint')}`, {seeds.get('episodes', '?')} episodes per task from seed "
             f"{seeds.get('offset', '?')}; normalized score = (return - random) / (expert - random).", "",
             "| task | episodes | mean return (95% CI) | success | normalized (95% CI) |",
             "| --- | ---: | --- | ---: | --- |"]
    for name, t in report["tasks"].items():
        lo, hi = t["ci95"]
        nci = t.get("normalized_ci95")
        norm = _fmt(t["normalized_score"]) + (f" ({_fmt(nci[0])}-{_fmt(nci[1])})" if nci else "")
        lines.append(f"| {name} | {t['episodes']} | {_fmt(t['mean_return'])} ({_fmt(lo)}-{_fmt(hi)}) "
                     f"| {_fmt(t['success_rate'], 2)} | {norm} |")
    lines += ["", f"IQM of the normalized scores: {_fmt(report.get('iqm_normalized_score'))}"]
    lines += [f"- skipped {k}: {v}" for k, v in report.get("skipped", {}).items()]
    return lines
