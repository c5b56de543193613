"""Measure the expert and random reference returns of env tasks and store them in mugato_ray/references.yaml.

    python jobs/measure_references.py [--episodes 20] [--num-envs 4] [TASK ...]   (default: every env task)

Rows of tasks not measured in this run are kept as they were.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mugato_ray import tasks
from mugato_ray.config import Config
from mugato_ray.rollout import PolicySpec, measure_returns

HEADER = """\
# Reference returns for GATO's normalized score (score - random) / (expert - random).
# Measured with our own code (jobs/measure_references.py: rollout.measure_returns runs the task's expert and
# a uniform RandomPolicy on seeds 0..episodes-1, 4 envs in lockstep). Atari: the RAM-reading experts
# (atari_experts.py), full v5 episodes of up to 27,000 steps. Edit by re-running the job, not by hand.
"""


def measure_references(
    names: Sequence[str], episodes: int = 20, num_envs: int = 4, log: Callable[[str], None] = print
) -> dict[str, dict]:
    """references.yaml rows: expert (where the task has one) and random mean returns over seeds 0..episodes-1."""
    cfg = Config()  # no task entries: the expert acts without DART noise, episodes run to the task's limit
    rows = {}
    for name in names:
        info = tasks.get_task(name)
        if not info.has_env:
            continue
        row: dict[str, Any] = {"episodes": episodes}
        for kind in ("expert", "random"):
            if kind == "expert" and info.expert == "none":
                row["expert_return"] = None
                continue
            stats = measure_returns(info, PolicySpec(kind), cfg, range(episodes), num_envs=num_envs)
            row[f"{kind}_return"] = round(stats.mean_return, 3)
            std = stats.returns.std()
            log(f"{name} {kind}: mean return {stats.mean_return:.3f} (std {std:.3f}) over {episodes} seeds")
        row["measured_with"] = (f"rollout.measure_returns: {info.expert} expert and RandomPolicy, "
                                f"seeds 0..{episodes - 1}")
        rows[name] = row
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", help="task names (default: every env task in the registry)")
    parser.add_argument("--episodes", type=int, default=20, help="seeds per task and policy")
    parser.add_argument("--num-envs", type=int, default=4, help="envs stepped in lockstep")
    parser.add_argument("--out", type=Path, default=tasks.REFERENCES_PATH, help="YAML file to update")
    args = parser.parse_args(argv)
    names = args.tasks or [n for n, t in tasks.TASKS.items() if t.has_env]
    rows = yaml.safe_load(args.out.read_text()) if args.out.is_file() else {}
    rows = rows or {}
    rows.update(measure_references(names, args.episodes, args.num_envs))
    args.out.write_text(HEADER + yaml.safe_dump(rows, sort_keys=True))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
