"""Measure the expert and random reference returns of env tasks and store them in mugato_ray/references.yaml.

    python jobs/measure_references.py [--episodes 20] [--num-envs 4] [TASK ...]   (default: every env task)

Rows of tasks not measured in this run are kept as they were.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from mugato_ray import experts, tasks

HEADER = """\
# Reference returns for GATO's normalized score (score - random) / (expert - random).
# Measured with our own code (jobs/measure_references.py: experts.measure runs the task's expert and a
# uniform RandomPolicy on seeds 0..episodes-1, 4 envs in lockstep). Atari: random only (expert: RLlib PPO, not
# trained here). Edit by re-running the job, not by hand.
"""


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
    rows.update(experts.measure_references(names, args.episodes, args.num_envs))
    args.out.write_text(HEADER + yaml.safe_dump(rows, sort_keys=True))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
