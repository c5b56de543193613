"""The main job, end to end: collect expert episodes, train the GATO model, evaluate it, write the report.

    python jobs/main.py --config configs/demo.yaml [key=value ...]

Outputs go under run_dir: config.yaml, data/<task>/, checkpoints/, eval/ (eval.json, eval.md, a PNG).
Locally it starts a Ray sized to this machine; under `ray job submit` it joins the cluster.
"""

from __future__ import annotations

import sys

from mugato_ray.cli import init_ray, parse_job_args
from mugato_ray.pipeline import run_main


def main(argv: list[str]) -> None:
    cfg, _ = parse_job_args(argv, __doc__, store="present")
    init_ray(cfg)
    run_main(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
