"""Online experience, end to end: collect demonstrations, train while rollout actors run the current policy
and feed their episodes back into the store (DAgger or self-imitation), evaluate, write the report.

    python jobs/online.py --config configs/online_cartpole.yaml [key=value ...]

The main job with ``online.enabled=true`` (any config's ``online:`` section applies; see
mugato_ray.online). The report's "online" section lists the rounds, episodes and weight steps.
"""

from __future__ import annotations

import dataclasses
import sys

from mugato_ray.cli import init_ray, parse_job_args
from mugato_ray.pipeline import run_main


def main(argv: list[str]) -> None:
    cfg, _ = parse_job_args(argv, __doc__, store="present")
    cfg = dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, enabled=True))
    init_ray(cfg)
    run_main(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
