"""Export a task's episode store as a Minari dataset, readable by Minari and the tools built on it.

    python jobs/export_minari.py --config configs/smoke.yaml --task NAME --out DIR [--dataset-id ID]
        [--source expert ...] [key=value ...]

DIR is used as Minari's datasets root: the dataset lands in DIR/ID/ and reads back with
minari.MinariDataset("DIR/ID/data"), or minari.load_dataset(ID) with MINARI_DATASETS_PATH=DIR. ID defaults to
mugato/<task>/<sources>-v0; --source (repeatable) restricts the exported sources (default: all). The store
keeps no final observation: each episode's last one is repeated, and the dataset says so (mugato_ray.minari_io).
"""

from __future__ import annotations

import sys

from mugato_ray.cli import parse_job_args
from mugato_ray.episodes import SOURCES
from mugato_ray.minari_io import MinariIOError, export_task, plan_export


def add_args(parser) -> None:
    parser.add_argument("--task", required=True, help="the task whose store is exported")
    parser.add_argument("--out", required=True, help="Minari datasets root to write the dataset under")
    parser.add_argument("--dataset-id", help="Minari dataset id, e.g. mugato/cartpole/expert-v0")
    parser.add_argument("--source", action="append", choices=SOURCES, help="export only this source (repeatable)")


def main(argv: list[str]) -> None:
    plans = []

    def check(cfg, args) -> list[str]:
        try:
            plans.append(plan_export(cfg, args.task, args.out, dataset_id=args.dataset_id, sources=args.source))
        except MinariIOError as e:
            return [str(e)]
        return []

    parse_job_args(argv, __doc__, add_args, needs_tasks=False, checks=check)
    path = export_task(plans[0])
    print(f"{plans[0].task.name}: {plans[0].episodes} episodes -> {path} (Minari dataset {plans[0].dataset_id!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
