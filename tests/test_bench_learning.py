"""bench/learning.py: ``--eval-episodes`` decides how many held-out episodes score a policy; ``--keep-models``
leaves each seed's last model for the evaluation job."""

from __future__ import annotations

import runpy
from pathlib import Path

import yaml

from mugato_ray.checkpoints import find_model_file
from mugato_ray.config import config_from_dict, load_config
from mugato_ray.datasets import generate_episodes
from mugato_ray.episodes import store_dir, write_episodes
from mugato_ray.rollout import PolicySpec

BENCH = Path(__file__).resolve().parents[1] / "bench" / "learning.py"


def test_eval_episodes_is_not_capped_by_the_configs_eval_episodes():
    # The config evaluates 2 episodes; the benchmark asks for 5 and must get 5, on the held-out seeds.
    bench = runpy.run_path(str(BENCH), run_name="bench")
    cfg = config_from_dict({"eval": {"episodes": 2, "seed_offset": 1000},
                            "tasks": [{"name": "CartPole-v1", "episodes": 3}]})
    result = bench["evaluate_policy"](cfg, "CartPole-v1", PolicySpec("random"), 5)
    assert result["episodes"] == 5
    assert bench["evaluate_policy"](cfg, "CartPole-v1", PolicySpec("random"), 1)["episodes"] == 1


def _text_config(tmp_path):
    """A one-task text config with its store written: a few steps of the tiny model train in seconds."""
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"context": 64},
        "train": {"steps": 2, "warmup_steps": 1}, "eval": {"seed_offset": 1000},
        "tasks": [{"name": "text-arith", "episodes": 4}]}))
    cfg = load_config(str(path), [])
    write_episodes(store_dir(cfg, "text-arith"), generate_episodes("text-arith", 4, 0, cfg))
    return path


def test_keep_models_leaves_each_seeds_last_model_for_the_evaluation_job(tmp_path):
    bench = runpy.run_path(str(BENCH), run_name="bench")
    config = _text_config(tmp_path)
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    args = ["--config", str(config), "--no-baseline", "--eval-every", "2", "--eval-episodes", "2"]
    bench["main"]([*args, "--seeds", "0", "1", "--keep-models", "--out", str(kept)])
    bench["main"]([*args, "--out", str(dropped)])
    for seed in (0, 1):
        assert find_model_file(kept / f"model-seed{seed}") == kept / f"model-seed{seed}" / "model.pt"
        assert (kept / f"model-seed{seed}" / "layouts.json").is_file()
    assert sorted(p.name for p in dropped.iterdir()) == ["learning.csv", "learning.png"]
