"""What every job shares: its command line and how it joins Ray.

Jobs run as ``python jobs/<name>.py --config configs/<x>.yaml [key=value ...]``: the config file, then
dotted overrides (``train.lr=3e-4 rollout.num_actors=4``) parsed by ``config.load_config``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence

from mugato_ray.config import Config, ConfigError, load_config


def parse_job_args(argv: Sequence[str] | None, description: str | None,
                   add_args: Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> tuple[Config, argparse.Namespace]:
    """``--config PATH [key=value ...]`` (plus a job's own flags from ``add_args``) -> (config, args).

    A bad config file or override exits with the usage line and the error naming the file and key.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML experiment config, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.lr=3e-4 run_dir=/tmp/run")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    return cfg, args


def init_ray(cfg: Config | None = None) -> None:
    """Join the cluster under ``ray job submit`` (RAY_ADDRESS set), else start a quiet local Ray.

    With RAY_ADDRESS set, ``ray.init()`` gets no resource arguments: the cluster owns them. A local Ray
    gets this machine's usable CPUs and no dashboard. ``cfg`` is accepted so every job calls this the same
    way; nothing in it changes how Ray starts today. Does nothing if Ray is already initialized.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # address="local": always a fresh local Ray, even when a `ray start` cluster runs on this machine
    # (plain ray.init() would join it, and with num_cpus set it would refuse to).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True)
