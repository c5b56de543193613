"""bench/text_overlap.py: evaluated problems split by whether the training store holds them, answered."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from mugato_ray.config import config_from_dict
from mugato_ray.datasets import generate_episodes
from mugato_ray.episodes import write_episodes

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "text_overlap.py"), run_name="bench")


def _store(tmp_path) -> tuple[Path, list[str]]:
    cfg = config_from_dict({"model": {"context": 128}, "tasks": [{"name": "text-arith", "episodes": 3}]})
    episodes = generate_episodes("text-arith", 3, 0, cfg)
    write_episodes(tmp_path / "store", episodes)
    return tmp_path / "store", episodes[0].actions[0].splitlines()


def test_a_problem_is_seen_only_when_the_store_holds_it_with_its_answer(tmp_path):
    store, lines = _store(tmp_path)
    lines_set = BENCH["stored_lines"](store)
    assert set(lines) <= lines_set
    addition = next(line for line in lines if "+" in line)
    problem, answer = addition.split("=")
    new = next(f"{a}+{b}=" for a in range(100) for b in range(100) if f"{a}+{b}={a + b}" not in lines_set)
    outcomes = [
        {"prompt": f"1+1=2\n{problem}=", "expected": answer, "success": True, "type": "addition"},
        {"prompt": f"{problem}=", "expected": answer, "success": False, "type": "addition"},
        # The same problem with another expected answer is not the stored line.
        {"prompt": f"{problem}=", "expected": answer + "0", "success": False, "type": "addition"},
        {"prompt": new, "expected": "x", "success": True, "type": "addition"},
        {"prompt": "reverse: qqqqqq -> ", "expected": "qqqqqq", "success": True},
    ]
    assert BENCH["overlap"](outcomes, lines_set) == {
        ("addition", "new"): (1, 2), ("addition", "seen"): (1, 2), ("all", "new"): (1, 1)}


def test_an_evaluation_without_the_tasks_answers_is_refused_by_name(tmp_path):
    store, _ = _store(tmp_path)
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"tasks": {"CartPole-v1": {"per_episode": [{"seed": 1, "success": True}]}}}))
    with pytest.raises(SystemExit, match="no answered prompts of task 'text-arith'"):
        BENCH["main"](["--store", str(store), "--eval", str(report)])
