"""What training checks of a task's episode store before any work starts.

Every file under ``<run_dir>/data/<task>/`` is checked for its footer, its columns and its task; with
``data.check_rows`` (the default) every row is also read and validated against the task's spec (the
checks ``Episode.validate`` makes: dtypes, shapes, lengths, NaN/inf, sources). A bad file or row is
named with its reason. ``data.on_bad_file: error`` (the default) makes any of them an error listing all
of them, before Ray starts (``cli.preflight``) and again before Ray Data starts (the store may have
changed in between, e.g. by collection); ``skip`` leaves them out of training, counted in the log and
in the report.

A full row check reads the whole store once (a fraction of a second per thousand episodes here, see
README "Reliability"); ``data.check_rows: false`` skips it for very large stores, and a bad row then
stops training when a tokenize actor reads it, named.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mugato_ray.episodes import STORE_COLUMNS, EpisodeError, episode_from_row, store_dir

if TYPE_CHECKING:
    from mugato_ray.config import Config
    from mugato_ray.resolve import ResolvedTask
    from mugato_ray.tokenizer import SpaceSpec

log = logging.getLogger(__name__)


class BadRow(NamedTuple):
    """A row of an otherwise readable store file that does not validate."""

    file: Path
    row: int
    episode_id: str
    reason: str


@dataclass
class StoreCheck:
    """The outcome of checking one task's store."""

    task: str
    files: list[Path]
    """Every store file found (sorted)."""
    bad_files: list[tuple[Path, str]] = field(default_factory=list)
    """``(file, reason)``: files training cannot read at all."""
    bad_rows: list[BadRow] = field(default_factory=list)
    """Rows of readable files that do not validate."""

    @property
    def usable(self) -> list[Path]:
        """The files training reads (bad files left out; their bad rows are left out by :attr:`bad_ids`)."""
        skip = {f for f, _ in self.bad_files}
        return [f for f in self.files if f not in skip]

    @property
    def bad_ids(self) -> frozenset[tuple[str, str]]:
        """``(real path of a file, episode_id)`` of every bad row: the episode filter leaves them out."""
        return frozenset((os.path.realpath(r.file), r.episode_id) for r in self.bad_rows)

    def problems(self) -> list[str]:
        """One line per bad file or row."""
        return ([f"{f}: {why}" for f, why in self.bad_files]
                + [f"{r.file} row {r.row} (episode {r.episode_id!r}): {r.reason}" for r in self.bad_rows])


def parquet_files(root: str | Path) -> list[Path]:
    """Every ``*.parquet`` under ``root``, sorted; hidden files and directories (temporaries) skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (f for f in root.rglob("*.parquet") if f.is_file())
    return sorted(f for f in found if not any(p.startswith(".") for p in f.relative_to(root).parts))


def store_files(cfg: Config, task: str) -> list[Path]:
    """The task's Parquet files under ``<run_dir>/data/<task>/``; FileNotFoundError naming both if none."""
    files = parquet_files(store_dir(cfg, task))
    if not files:
        raise FileNotFoundError(
            f"task '{task}': no episodes under {store_dir(cfg, task)} (expected *.parquet files); collect them "
            "first (python jobs/collect.py --config ...) or remove the task from config key 'tasks'"
        )
    return files


def check_store_files(files: Sequence[Path], task: str, spec: SpaceSpec) -> list[tuple[Path, str]]:
    """``(file, reason)`` for every file of ``task``'s store that training could not read: not Parquet (or
    truncated: the footer is read), missing a column of the store's schema for this task's spec, or
    holding rows of another task. Reads footers and the ``task`` column only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    needed = [*STORE_COLUMNS, *(f"obs.{f.key}" for f in spec.observation)]
    bad = []
    for f in files:
        try:
            names = set(pq.ParquetFile(f).schema_arrow.names)
            missing = [c for c in needed if c not in names]
            if missing:
                bad.append((f, f"not an episode file of this task: missing columns {missing[:6]}"))
                continue
            other = set(pq.read_table(f, columns=["task"]).column("task").to_pylist()) - {task}
            if other:
                bad.append((f, f"holds episodes of task(s) {sorted(other)}, not '{task}'"))
        except (pa.ArrowException, OSError) as e:
            bad.append((f, f"unreadable Parquet: {e}"))
    return bad


def check_rows(file: Path, spec: SpaceSpec) -> tuple[list[BadRow], str | None]:
    """Every row of a readable store file that does not validate against ``spec``; and a reason to leave
    the whole file out instead (a bad row whose episode id is unusable cannot be left out alone)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(file).to_pylist()
    except (pa.ArrowException, OSError) as e:  # the footer was fine, a data page is not
        return [], f"unreadable Parquet data: {e}"
    bad = []
    for i, row in enumerate(rows):
        try:
            episode_from_row(row, where=f"{file} row {i}").validate(spec)
        except EpisodeError as e:
            episode_id = row.get("episode_id")
            if not isinstance(episode_id, str) or not episode_id:
                return [], f"row {i} is bad and has no usable episode id: {e.problem}"
            bad.append(BadRow(file, i, episode_id, f"{e.field}: {e.problem}" if e.field else e.problem))
    return bad, None


def check_store(cfg: Config, task: str, spec: SpaceSpec, *, rows: bool | None = None) -> StoreCheck:
    """Check ``task``'s store (FileNotFoundError if it has no files). ``rows``: validate every row too
    (default ``data.check_rows``)."""
    files = store_files(cfg, task)
    check = StoreCheck(task, files, check_store_files(files, task, spec))
    if cfg.data.check_rows if rows is None else rows:
        for f in check.usable:
            bad, whole_file = check_rows(f, spec)
            if whole_file is not None:
                check.bad_files.append((f, whole_file))
            check.bad_rows.extend(bad)
    return check


def check_stores(cfg: Config, resolved: Mapping[str, ResolvedTask], *, present_only: bool = False,
                 log_skips: bool = True) -> dict[str, StoreCheck]:
    """Check the store of every configured task; with ``data.on_bad_file: error`` any bad file or row is a
    ValueError listing all of them, for every task at once. A task without store files is a
    FileNotFoundError naming every such task, unless ``present_only`` (a job that collects them first). ``log_skips``: with ``skip``, log each one left out."""
    checks, missing = {}, []
    for entry in cfg.tasks:
        try:
            checks[entry.name] = check_store(cfg, entry.name, resolved[entry.name].spec)
        except FileNotFoundError as e:
            missing.append(str(e))
    if missing and not present_only:
        raise FileNotFoundError("\n".join(missing))
    problems = [f"task '{t}': {p}" for t, c in checks.items() for p in c.problems()]
    if problems and cfg.data.on_bad_file == "error":
        lines = "\n".join(f"  {p}" for p in problems)
        raise ValueError(f"{len(problems)} bad store file(s) or row(s):\n{lines}\nremove or repair them, or set "
                         "data.on_bad_file=skip to train without them")
    for task, check in checks.items():
        if log_skips:
            for p in check.problems():
                log.warning("task '%s': leaving out %s (data.on_bad_file=skip)", task, p)
        if not check.usable:
            raise ValueError(f"task '{task}': every store file is bad ({len(check.bad_files)} left out); "
                             "nothing to train on")
    return checks
