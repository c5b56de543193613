"""What every job shares: its command line and how it joins Ray.

Jobs run as ``python jobs/<name>.py --config configs/<x>.yaml [key=value ...]``: the config file, and
dotted overrides (``train.lr=3e-4 rollout.num_actors=4``, anywhere on the line) parsed by
``config.load_config``; then :func:`preflight` checks what would otherwise fail only after Ray started.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from mugato_ray import tasks
from mugato_ray.config import Config, ConfigError, load_config
from mugato_ray.console import quiet_driver, set_verbose


def parse_job_args(argv: Sequence[str] | None, description: str | None,
                   add_args: Callable[[argparse.ArgumentParser], None] | None = None, *,
                   needs_tasks: bool = True,
                   config_fallback: Callable[[argparse.Namespace], Path | None] | None = None,
                   store: Literal["required", "present"] | None = None,
                   checks: Callable[[Config, argparse.Namespace], list[str]] | None = None,
                   ) -> tuple[Config, argparse.Namespace]:
    """``--config PATH [key=value ...]`` (plus a job's own flags from ``add_args``) -> (config, args).

    Overrides may come anywhere on the command line, before or after the job's flags. A bad config file
    or override, and every problem :func:`preflight` finds, exit with the usage line and the errors
    (exit code 2) before anything starts: no Ray, no file written. ``config_fallback(args)``: the config
    file to use when ``--config`` is not given (e.g. the one a checkpoint carries); without one, or when it
    returns None, ``--config`` is required. ``store``: check every task's episode store too (``required``:
    each task must have one; ``present``: the stores that exist), see :func:`check_store`.
    ``checks(cfg, args)``: the job's own problems (its inputs), reported with the others.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=config_fallback is None,
                        help="YAML experiment config, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.lr=3e-4 run_dir=/tmp/run")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own informational output too (default: the project's lines only)")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_intermixed_args(argv)
    set_verbose(args.verbose)
    if args.config is None:
        args.config = config_fallback(args) if config_fallback is not None else None
        if args.config is None:
            parser.error("the following arguments are required: --config")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    problems = preflight(cfg, args.config, needs_tasks=needs_tasks)
    if store is not None and not problems:
        problems = check_store(cfg, required=store == "required")
    if checks is not None:
        problems += checks(cfg, args)
    if problems:
        parser.error("\n  ".join([f"{len(problems)} problem(s) with {args.config}:", *problems]))
    return cfg, args


def preflight(cfg: Config, where: str, *, needs_tasks: bool = True) -> list[str]:
    """Every problem a job would otherwise meet only after Ray has started: no or unknown tasks, a
    ``run_dir`` that is a file or cannot be created, a task's store path that is a file."""
    problems = []
    if needs_tasks and not cfg.tasks:
        problems.append(f"config key 'tasks' is empty (is {where} empty?): list at least one task")
    known = set(tasks.TASKS)
    for i, entry in enumerate(cfg.tasks):
        if entry.name not in known:
            close = sorted(k for k in known if entry.name.lower()[:6] in k.lower())[:5]
            problems.append(f"tasks[{i}].name: unknown task {entry.name!r}"
                            + (f" (did you mean {close}?)" if close else f"; known tasks: {sorted(known)}"))
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        problems.append(f"run_dir: {run_dir} exists and is not a directory")
    elif not run_dir.exists():
        parent = next((p for p in run_dir.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"run_dir: {run_dir} cannot be created ({parent} is not a writable directory)")
    for entry in cfg.tasks:
        store = cfg.store_root() / entry.name
        if store.exists() and not store.is_dir():
            problems.append(f"tasks '{entry.name}': its store {store} exists and is not a directory")
    return problems


def check_store(cfg: Config, *, required: bool) -> list[str]:
    """The problems of the configured tasks' episode stores (``store_check.check_stores``: files, columns and,
    with ``data.check_rows``, every row), found before Ray starts. ``required``: a task without a store is a
    problem too. With ``data.on_bad_file: skip`` only a store with nothing usable is one."""
    # Lazy: resolving tasks builds their envs and the row check reads Parquet; jobs import this module first.
    from mugato_ray.resolve import resolve_tasks
    from mugato_ray.store_check import check_stores

    try:
        check_stores(cfg, resolve_tasks(cfg), present_only=not required, log_skips=False)
    except (ValueError, FileNotFoundError) as e:
        return str(e).splitlines()
    return []


GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
"""Read by ``ray.init`` when it starts a local head: the port its GCS listens on."""


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket  # lazy: only a job that starts its own Ray needs it

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def init_ray(cfg: Config | None = None) -> None:
    """Join the cluster under ``ray job submit`` (RAY_ADDRESS set), else start a quiet local Ray.

    With RAY_ADDRESS set, ``ray.init()`` gets no resource arguments: the cluster owns them. A local Ray
    gets this machine's usable CPUs, its dashboard (on 127.0.0.1) and a watcher that stops its processes if
    the job is killed (``mugato_ray.reaper``). ``cfg`` is accepted so every job calls this the same way;
    nothing in it changes how Ray starts today. Does nothing if Ray is already initialized.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_driver()  # before Ray starts: its processes inherit the quiet settings (mugato_ray.console)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # address="local": always a fresh local Ray, even when a `ray start` cluster runs on this machine
    # (plain ray.init() would join it, and with num_cpus set it would refuse to).
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls: without it the
    # cleaner cannot do its job and logs "Failed to query Ray Train Controller actor state" at every poll.
    # It listens on 127.0.0.1 only (Ray's default dashboard host).
    # Ray's processes are told their own cluster's address (RAY_ADDRESS, through the job's runtime env; the GCS
    # port is chosen first so that the address is known before Ray starts). Without it, code in Ray's workers
    # that looks the cluster up (the State API the cleaner uses) takes the most recently started Ray on the
    # machine: with two jobs on one machine the first job's cleaner saw its own controller "dead" in the other
    # Ray and removed its training workers.
    address = f"{ray.util.get_node_ip_address()}:{free_port()}"
    saved = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = address.rsplit(":", 1)[1]
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, logging_level=logging.WARNING,
                 configure_logging=True, runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    finally:
        if saved is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = saved
    # Lazy: only a job that starts its own Ray needs the watcher of its processes.
    from mugato_ray.reaper import start_reaper

    start_reaper()  # a SIGKILLed job leaves no Ray processes behind (see mugato_ray.reaper)
