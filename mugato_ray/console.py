"""What a job prints: the project's own lines by default, Ray's chatter in the log files Ray keeps.

By default (every job's ``--verbose`` off) Ray's informational output is silenced where it is produced:

- Ray Train's own logs (resource requests, worker group start, "Reporting training result ..." for every
  report, checkpoint registration) log at WARNING and above only (``ray.train.LoggingConfig``);
- Ray Data's console handler shows errors only (execution plans and start/finish lines per pass, the
  "Progress bars disabled" note); ``ray-data.log`` keeps everything (``ray_data_logging.yaml``);
- DeprecationWarnings that Ray's own internals raise in its workers are not shown;
- the driver does not repeat the note that Ray's token authentication is on at every start.

Ray's processes write everything to ``/tmp/ray/session_latest/logs`` as always. ``--verbose`` leaves Ray's
defaults alone. The setting travels to the processes a local Ray starts through the environment
(:data:`VERBOSE_ENV`, read by :func:`verbose`), set before Ray starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

VERBOSE_ENV = "MUGATO_VERBOSE"
RAY_DATA_LOGGING_FILE = Path(__file__).with_name("ray_data_logging.yaml")
QUIET_DRIVER_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,  # "token authentication is on"
}


def set_verbose(on: bool) -> None:
    """Record the job's choice for this process and every process it starts afterwards."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def verbose() -> bool:
    """Whether the job runs with ``--verbose`` (default: quiet)."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def quiet_ray_environment() -> dict[str, str]:
    """Environment variables that make the Ray processes started after them quiet (empty when verbose)."""
    if verbose():
        return {}
    return {"RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING_FILE), "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def quiet_driver() -> None:
    """Apply the quiet settings to this process (the driver) and to the Ray it is about to start."""
    if verbose():
        return
    os.environ.update(quiet_ray_environment())
    for name, level in QUIET_DRIVER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def quiet_train_worker() -> None:
    """In a Ray Train worker: Ray Train logs "Reporting training result ..." at every report through a logger
    named after its source file rather than under ``ray.train``, so Train's log level misses it; this sets
    that logger to WARNING (nothing, when verbose). Ray's log files keep the line either way."""
    import importlib.util  # lazy: only Ray Train workers call this

    if verbose():
        return
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def train_log_level() -> str:
    """Ray Train's console log level: WARNING, or INFO (Ray's default) when verbose."""
    return "INFO" if verbose() else "WARNING"


def eta(done: float, total: float, seconds: float) -> str:
    """'about 3 min left' from the work done in ``seconds`` so far ('' until there is a rate)."""
    if done <= 0 or seconds <= 0 or total <= done:
        return ""
    left = seconds * (total - done) / done
    if left < 90:
        return f"about {left:.0f} s left"
    if left < 5400:
        return f"about {left / 60:.0f} min left"
    return f"about {left / 3600:.1f} h left"
