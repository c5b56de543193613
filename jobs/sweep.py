"""Sweep hyperparameters with Ray Tune: each trial trains (TorchTrainer) and evaluates one point of sweep.space.

    python jobs/sweep.py --config configs/smoke.yaml [key=value ...]

The trials read the episode store of run_dir (collect it first: jobs/collect.py) and write under
run_dir/sweep/<trial_id>/. Prints the trials best first and writes run_dir/sweep/results.csv and
run_dir/sweep/best.yaml (the best trial's config). Locally it starts a Ray sized to this machine; under
`ray job submit` it joins the cluster.
"""

from __future__ import annotations

import sys

from mugato_ray.cli import init_ray, parse_job_args
from mugato_ray.sweep import run_sweep, sweep_problems, table_lines


def main(argv: list[str]) -> None:
    cfg, _ = parse_job_args(argv, __doc__, store="required", checks=lambda cfg, _: sweep_problems(cfg))
    init_ray(cfg)
    result = run_sweep(cfg)
    for line in table_lines(result.rows, cfg):
        print(line)
    print(f"wrote {result.results_file}")
    if result.best_file is not None:
        print(f"wrote {result.best_file} (the best trial's config)")


if __name__ == "__main__":
    main(sys.argv[1:])
