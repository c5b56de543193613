"""bench/learning.py's evaluation: ``--eval-episodes`` decides how many held-out episodes score a policy."""

from __future__ import annotations

import runpy
from pathlib import Path

from mugato_ray.config import config_from_dict
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
