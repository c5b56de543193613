"""Metric logs a researcher can watch: every report of training and evaluation, as files plotting tools read.

(Ray Train V2 keeps no metrics reported without a checkpoint: rank 0 writes its own.) A *stream* is one
source of reports indexed by step: ``train`` (rank 0's ``ray.train.report`` metrics) and ``eval`` (the
evaluations during training, ``validation/...``, and the final evaluation, ``eval/...``). Each stream goes to
the writers that ``train.loggers`` names, under ``<run_dir>/metrics/``:

- ``csv``: ``<stream>.csv``, wide: ``step`` then one column per key, one row per step. A report with a key
  not seen before widens the header: the file is rewritten (atomically) with the new column, earlier rows
  left empty there. A report at a step that has a row merges into it (the final evaluation into the row of
  the snapshot it chose). A last line cut short by a killed process is dropped when the file is reopened.
- ``tensorboard``: event files under ``tb/<stream>/`` written by tensorboardX
  (``tensorboard --logdir <run_dir>/metrics/tb`` shows the streams side by side).
- ``wandb``: an offline Weights & Biases run per stream and attempt under ``wandb/`` (``wandb sync`` uploads
  it later), where the package is installed.

Restarts: a stream opened with ``start_step=S`` (a training attempt that resumes after the checkpoint of
step S - 1), and a write at a step at or before the last one the same writer wrote (a worker restarted from
an older checkpoint while the evaluator lives on), restart the stream at that step: the CSV drops its rows
at steps >= S and TensorBoard gets a ``SessionLog.START`` at S, on which its reader drops the older events at
steps >= S. So a resumed run logs each step once, with the values of the attempt that went on. W&B keeps
every attempt as its own run (grouped by the run's name).
"""

from __future__ import annotations

import csv
import io
import numbers
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, get_args

from mugato_ray.config import Config, LoggerName

LOGGERS: tuple[str, ...] = get_args(LoggerName)
"""The writers ``train.loggers`` may name."""
METRICS_DIR = "metrics"
TB_DIR = "tb"
SCORE_KEYS = ("episodes", "mean_return", "normalized_score", "success_rate", "env_steps_per_s")
"""The per-task numbers of an evaluation that go into the ``eval`` stream."""


class MetricLogError(RuntimeError):
    """A metric writer cannot be used as configured; the message names ``train.loggers`` or the file."""


class MetricWriter(Protocol):
    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def metrics_dir(cfg: Config) -> Path:
    """``<run_dir>/metrics``."""
    return Path(cfg.run_dir) / METRICS_DIR


def numbers_only(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The numeric entries of ``metrics`` except ``step`` (bools, strings, None and the like left out)."""
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        out[k] = int(v) if isinstance(v, numbers.Integral) else float(v)
    return out


def score_metrics(prefix: str, tasks: Mapping[str, Mapping[str, Any]], iqm: float | None) -> dict[str, float]:
    """An evaluation as flat metrics: ``<prefix>/iqm`` and ``<prefix>/<task>/<key>`` for the numbers of
    ``SCORE_KEYS`` each task has (a None, e.g. a task without references, is left out), and
    ``<prefix>/<task>/exact/<type>`` per problem type of a dataset task that has them (its ``by_type``)."""
    out = {f"{prefix}/{task}/{k}": t[k] for task, t in tasks.items() for k in SCORE_KEYS if t.get(k) is not None}
    out |= {f"{prefix}/{task}/exact/{kind}": v["exact"] for task, t in tasks.items()
            for kind, v in (t.get("by_type") or {}).items()}
    if iqm is not None:
        out[f"{prefix}/iqm"] = iqm
    return numbers_only(out)


# ---------------------------------------------------------------------------------------------
# CSV


def _cell(v: float | int) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))  # repr: a float reads back exactly


class CsvWriter:
    """``path``: one row per step, one column per key (see the module doc). The table is kept in memory;
    appending a row at a new, later step with known keys writes one line, anything else rewrites the file."""

    def __init__(self, path: str | Path, start_step: int | None = None):
        self.path = Path(path)
        self.columns, self.rows, dirty = read_table(self.path)
        self.last: int | None = None
        if start_step is not None and any(s >= start_step for s in self.rows):
            self.rows = {s: r for s, r in self.rows.items() if s < start_step}
            dirty = True
        if dirty:
            self._rewrite()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        step = int(step)
        restart = self.last is not None and step <= self.last  # restarted from an older step
        if restart:
            self.rows = {s: r for s, r in self.rows.items() if s < step}
        new_keys = [k for k in metrics if k not in self.columns]
        self.columns += new_keys
        append = not (restart or new_keys) and self.path.exists() and (not self.rows or step > max(self.rows))
        row = self.rows.setdefault(step, {})
        row.update({k: _cell(v) for k, v in metrics.items()})
        self.last = step
        if append:
            with open(self.path, "a", newline="") as fh:
                csv.writer(fh).writerow([str(step)] + [row.get(c, "") for c in self.columns])
        else:
            self._rewrite()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", *self.columns])
        for step in sorted(self.rows):
            w.writerow([str(step)] + [self.rows[step].get(c, "") for c in self.columns])
        _atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        pass  # every write is on disk when it returns


def read_table(path: Path) -> tuple[list[str], dict[int, dict[str, str]], bool]:
    """``(columns, {step: {column: cell}}, dirty)`` of a metrics CSV (empty when there is none); ``dirty``:
    a last line cut short by a killed writer was dropped. A file that is not one of ours is an error naming it."""
    if not path.is_file():
        return [], {}, False
    text = path.read_text()
    dirty = bool(text) and not text.endswith("\n")
    if dirty:
        text = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(io.StringIO(text)))
    if not lines:
        return [], {}, dirty
    header = lines[0]
    if not header or header[0] != "step":
        raise MetricLogError(f"metrics file {path} does not start with a 'step' column; move it away")
    rows = {}
    for i, line in enumerate(lines[1:], start=2):
        try:
            rows[int(line[0])] = {c: v for c, v in zip(header[1:], line[1:]) if v != ""}
        except (ValueError, IndexError) as e:
            raise MetricLogError(f"metrics file {path}, line {i}: no integer step ({e}); move the file away") from e
    return header[1:], rows, dirty


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of a metrics CSV in step order, each ``{"step": int, key: float}`` with its non-empty cells."""
    _, rows, _ = read_table(Path(path))
    return [{"step": s, **{k: float(v) for k, v in rows[s].items()}} for s in sorted(rows)]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# TensorBoard and W&B


class TensorBoardWriter:
    """Scalars into a new event file under ``logdir`` (one per writer: tensorboardX's own format and writer)."""

    def __init__(self, logdir: str | Path, start_step: int | None = None):
        # Lazy: tensorboardX imports torch when it is installed; the evaluation driver needs neither until it logs.
        from tensorboardX import SummaryWriter

        # A nanosecond suffix orders two files opened in the same second (their names hold the second only):
        # TensorBoard reads a folder's files in name order, and a restart must come after what it discards.
        self.writer = SummaryWriter(str(logdir), purge_step=start_step, flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}")
        self.last: int | None = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        step = int(step)
        if self.last is not None and step <= self.last:
            from tensorboardX.proto.event_pb2 import Event, SessionLog  # lazy: as in __init__

            self.writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)
        self.writer.flush()  # a reader (or a crash) sees every report
        self.last = step

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """An offline W&B run (``wandb sync`` uploads it later) named ``<run>-<stream>``, grouped by ``run``."""

    def __init__(self, directory: str | Path, run: str, stream: str):
        wandb = import_wandb()
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(directory), project="mugato-ray", group=run,
                              name=f"{run}-{stream}", job_type=stream, reinit="create_new")
        # Steps are ours (a restarted attempt goes back in steps), not W&B's own monotone counter.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({**metrics, "step": int(step)})

    def close(self) -> None:
        self.run.finish()


def import_wandb() -> Any:
    """The wandb package; MetricLogError naming ``train.loggers`` when it is not installed."""
    try:
        import wandb
    except ImportError as e:
        raise MetricLogError("train.loggers lists 'wandb' but the wandb package is not installed: "
                             "pip install wandb (or the 'wandb' extra), or drop 'wandb' from train.loggers") from e
    return wandb


def check_loggers(loggers: Sequence[str]) -> None:
    """Raise MetricLogError naming ``train.loggers`` when a writer it lists cannot be made here."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise MetricLogError(f"train.loggers: unknown logger(s) {unknown}; known: {list(LOGGERS)}")
    if "wandb" in loggers:
        import_wandb()


# ---------------------------------------------------------------------------------------------
# A stream


class MetricLog:
    """One stream (``train``, ``eval``) to every writer of ``loggers``; a context manager that closes them."""

    def __init__(self, directory: str | Path, stream: str, loggers: Sequence[str], start_step: int | None = None,
                 run: str = "run"):
        check_loggers(loggers)
        directory = Path(directory)
        self.writers: list[MetricWriter] = []
        for name in dict.fromkeys(loggers):
            if name == "csv":
                self.writers.append(CsvWriter(directory / f"{stream}.csv", start_step))
            elif name == "tensorboard":
                self.writers.append(TensorBoardWriter(directory / TB_DIR / stream, start_step))
            else:
                self.writers.append(WandbWriter(directory, run, stream))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """The numbers of ``metrics`` (``numbers_only``) at ``step``; NaN and inf are written as they are."""
        values = numbers_only(metrics)
        for w in self.writers:
            w.write(step, values)

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def __enter__(self) -> MetricLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_metric_log(cfg: Config, stream: str, start_step: int | None = None) -> MetricLog:
    """Stream ``stream`` of the run ``cfg.run_dir`` (an absolute one in Ray workers) with ``cfg.train.loggers``."""
    return MetricLog(metrics_dir(cfg), stream, cfg.train.loggers, start_step,
                     run=Path(cfg.run_dir).resolve().name or "run")
