"""bench/babyai_probe.py: the BabyAI bench tools measure only the config's BabyAI tasks."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from mugato_ray.config import config_from_dict

BENCH = Path(__file__).resolve().parents[1] / "bench" / "babyai_probe.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH), run_name="bench")


def test_tasks_default_to_the_configs_babyai_levels_and_others_are_refused_by_name(bench):
    cfg = config_from_dict({"tasks": [{"name": "CartPole-v1", "episodes": 1},
                                      {"name": "BabyAI-GoToRedBall-v0", "episodes": 1},
                                      {"name": "BabyAI-PickupLoc-v0", "episodes": 1}]})
    assert bench["babyai_tasks"](cfg, None, "x.yaml") == ["BabyAI-GoToRedBall-v0", "BabyAI-PickupLoc-v0"]
    assert bench["babyai_tasks"](cfg, ["BabyAI-PickupLoc-v0"], "x.yaml") == ["BabyAI-PickupLoc-v0"]
    with pytest.raises(ValueError, match=r"\['CartPole-v1'\] are not BabyAI tasks of x.yaml"):
        bench["babyai_tasks"](cfg, ["CartPole-v1", "BabyAI-PickupLoc-v0"], "x.yaml")
