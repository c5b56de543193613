"""Model export: a checkpoint as a Hugging Face-style repository (safetensors, JSON, model card) that loads back
bit-identical with no pickle at all, acts through the evaluation path, and refuses a corrupt file by name."""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from mugato_ray.checkpoints import write_acting_files
from mugato_ray.config import config_from_dict, load_config
from mugato_ray.data import task_layouts
from mugato_ray.datasets import generate_episodes, prompt_and_answer
from mugato_ray.evaluate import checkpoint_config, resolve_checkpoint, score_dataset_chunk
from mugato_ray.export import export_model, load_export
from mugato_ray.model import CheckpointError, GatoModel
from mugato_ray.rollout import PolicySpec
from mugato_ray.tokenizer import train_bpe
from tests.test_model import make_batch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["CartPole-v1", "text-arith"]


def make_cfg(tmp_path, **tokenizer):
    return config_from_dict({
        "run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "context": 128},
        "tokenizer": {"max_text_tokens": 32, **tokenizer}, "eval": {"episodes": 3},
        "tasks": [{"name": n, "episodes": 2} for n in TASKS]})


def bpe_checkpoint(tmp_path):
    """A trained-looking checkpoint directory of a BPE run: model.pt, config.yaml, layouts.json, tokenizer.json."""
    corpus = ["".join(prompt_and_answer("text-arith", ep))
              for ep in generate_episodes("text-arith", 100, 0, make_cfg(tmp_path))]
    bpe = tmp_path / "bpe.json"
    train_bpe(corpus, vocab_size=300, path=bpe)
    cfg = make_cfg(tmp_path, text="bpe", bpe_path=str(bpe))
    specs, layouts = task_layouts(cfg)
    torch.manual_seed(0)
    model = GatoModel(cfg.model, specs["CartPole-v1"].vocab, patch_size=cfg.tokenizer.patch_size).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "run" / "checkpoint_00000007"
    write_acting_files(ckpt, model, cfg, specs, layouts)
    return ckpt, model, cfg, layouts


def eval_report(checkpoint: str) -> dict:
    """An eval.json of ``checkpoint`` in the schema evaluate() writes (numbers chosen to be recognizable)."""
    task = {"episodes": 3, "mean_return": 123.456, "ci95": [100.0, 150.0], "success_rate": 0.5,
            "normalized_score": 0.625, "normalized_ci95": [0.5, 0.75], "expert_return": 200.0, "random_return": 20.0}
    return {"checkpoint": checkpoint, "tasks": {"CartPole-v1": task}, "iqm_normalized_score": 0.625,
            "seeds": {"offset": 1000000, "episodes": 3}, "skipped": {}}


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def run_export_job(*argv: str) -> None:
    load_job("export").main(list(argv))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_loads_back_identical_without_pickle_and_acts_through_evaluation(tmp_path, monkeypatch):
    ckpt, model, cfg, layouts = bpe_checkpoint(tmp_path)
    (tmp_path / "run" / "eval").mkdir()
    report = eval_report(str((ckpt / "model.pt").resolve()))
    (tmp_path / "run" / "eval" / "eval.json").write_text(json.dumps(report))
    out = tmp_path / "export"
    run_export_job("--checkpoint", str(ckpt), "--out", str(out))  # the eval.json is found beside the run
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "layouts.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert load_config(out / "config.json") == load_config(ckpt / "config.yaml")  # the run config, as JSON

    def refuse(*args, **kwargs):
        raise AssertionError("loading an export used pickle")

    with monkeypatch.context() as m:
        for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
            m.setattr(target, name, refuse)
        loaded = load_export(out)
    layout = layouts["CartPole-v1"]
    batch = make_batch(layout, [layout.steps, 1], seed=4)
    with torch.no_grad():
        assert torch.equal(model.full_logits(batch, layout), loaded.full_logits(batch, layout))
    assert loaded.cfg == model.cfg and loaded.vocab == model.vocab and not loaded.training

    # The evaluation path takes the export directory: its model file, its run config's tokenizer (reading the
    # export's own BPE copy), and greedy answers equal to the original checkpoint's.
    model_file = resolve_checkpoint(out)
    assert load_job("evaluate").checkpoint_config_file(argparse.Namespace(checkpoint=str(out))) == out / "config.json"
    assert model_file == (out / "model.safetensors").resolve()
    acting_cfg = checkpoint_config(make_cfg(tmp_path), model_file, log=lambda _: None)
    assert acting_cfg.tokenizer.text == "bpe" and acting_cfg.tokenizer.bpe_path == str(out / "tokenizer.json")
    answers = [[o["answer"] for o in score_dataset_chunk(acting_cfg, "text-arith", PolicySpec("model", str(f)),
                                                         [5, 6, 7])] for f in (model_file, ckpt / "model.pt")]
    assert answers[0] == answers[1]

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "mugato-ray" and set(TASKS) <= set(meta["tags"])
    assert "| CartPole-v1 | 3 | 123.456 (100.000-150.000) | 0.50 | 0.625 (0.500-0.750) |" in card
    assert "training steps: 7" in card and "Not evaluated" not in card

    with pytest.raises(SystemExit) as refused:  # an existing, non-empty --out is never overwritten
        run_export_job("--checkpoint", str(ckpt), "--out", str(out))
    assert refused.value.code == 2


def test_an_export_without_its_evaluation_says_so_and_a_corrupt_file_is_named(tmp_path):
    ckpt, model, cfg, _ = bpe_checkpoint(tmp_path)
    (tmp_path / "run" / "eval").mkdir()  # a report of another checkpoint is not this model's
    (tmp_path / "run" / "eval" / "eval.json").write_text(json.dumps(eval_report("/elsewhere/model.pt")))
    out = export_model(ckpt / "model.pt", tmp_path / "export", log=lambda _: None)
    card = (out / "README.md").read_text()
    assert "Not evaluated" in card and "| CartPole-v1 |" not in card
    assert set(TASKS) <= set(front_matter(card)["tags"])
    given = export_model(ckpt, tmp_path / "given", eval_json=tmp_path / "run" / "eval" / "eval.json")
    assert "| CartPole-v1 | 3 |" in (given / "README.md").read_text()  # --eval is used as given

    weights = out / "model.safetensors"
    data = weights.read_bytes()
    for bad in (data[: len(data) // 2], b"not safetensors" * 20):
        weights.write_bytes(bad)
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_export(out)
