"""Train the GATO model on every task's episodes in <run_dir>/data/ with Ray Data + Ray Train.

    python jobs/train.py --config configs/smoke.yaml [key=value ...]

Run again with the same run_dir to resume from the latest checkpoint. Locally it starts a Ray sized to
this machine; under `ray job submit` it joins the cluster.
"""

from __future__ import annotations

import sys

from mugato_ray.cli import init_ray, parse_job_args
from mugato_ray.config import save_config
from mugato_ray.train import train


def main(argv: list[str]) -> None:
    cfg, _ = parse_job_args(argv, __doc__, store="required")
    init_ray(cfg)
    save_config(cfg)
    result = train(cfg)
    loss = result.metrics.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, float) else ""
    print(f"trained {result.final_step} steps ({len(cfg.tasks)} tasks{loss_text}); checkpoint: {result.checkpoint_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
