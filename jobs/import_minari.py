"""Import a Minari dataset from local disk into <run_dir>/data/<task>/ (nothing is downloaded).

    python jobs/import_minari.py --config configs/smoke.yaml --dataset PATH_OR_ID [--task NAME] [--source expert]
        [--seed-from metadata|index] [--resume] [key=value ...]

PATH_OR_ID is a dataset folder (or its data/ folder), or a dataset id under MINARI_DATASETS_PATH (default
~/.minari/datasets). The task defaults to the registered task whose env id is the dataset's; its spaces must
equal the dataset's. The dataset's ref_max_score/ref_min_score, when present, normalize the task's scores in
this run (mugato_ray.minari_io). A bad dataset, task, store or a repeated import is reported with exit code 2
before anything is written; --resume imports only the episodes not stored yet.
"""

from __future__ import annotations

import sys

from mugato_ray.cli import parse_job_args
from mugato_ray.config import save_config
from mugato_ray.episodes import SOURCES
from mugato_ray.minari_io import SEED_FROM, MinariIOError, import_dataset, plan_import


def add_args(parser) -> None:
    parser.add_argument("--dataset", required=True, help="Minari dataset folder, or a dataset id under "
                        "MINARI_DATASETS_PATH")
    parser.add_argument("--task", help="registered task to import into (default: the one with the dataset's env id)")
    parser.add_argument("--source", choices=SOURCES, help="the episodes' source column (default: what our "
                        "export recorded, else expert)")
    parser.add_argument("--seed-from", choices=SEED_FROM, default="metadata",
                        help="episode seeds from Minari's episode metadata (default), or the episode index")
    parser.add_argument("--resume", action="store_true", help="skip the dataset's episodes already stored")


def main(argv: list[str]) -> None:
    plans = []

    def check(cfg, args) -> list[str]:
        try:
            plans.append(plan_import(cfg, args.dataset, task=args.task, source=args.source,
                                     seed_from=args.seed_from, resume=args.resume))
        except MinariIOError as e:
            return [str(e)]
        return []

    cfg, _ = parse_job_args(argv, __doc__, add_args, needs_tasks=False, checks=check)
    save_config(cfg)
    s = import_dataset(plans[0])
    print(f"{s.task}: {s.written} episodes imported from Minari dataset {s.dataset_id!r}, {s.skipped} already "
          f"stored, {len(s.files)} files")


if __name__ == "__main__":
    main(sys.argv[1:])
