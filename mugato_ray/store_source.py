"""A task's episode store as a Ray Data source that is listed again at every pass (online experience).

``ray.data.read_parquet`` fixes its file list when the dataset is built. With ``online.enabled``, online
actors keep adding files to ``<run_dir>/data/<task>/`` while training runs, so the task's dataset reads
through :class:`StoreDatasource` instead: Ray Data asks it for read tasks each time the dataset executes
(every pass of the training stream), and it lists the store then. One read task per file (one block: an
actor call sees a whole file of episodes, as with ``read_parquet``); each row carries its file's path
(``data.PATH_KEY``) and a window multiplicity (``REPEAT_KEY``):

- demonstration files: 1;
- online files (``dagger-*`` / ``policy-*``): ``r = f * D / ((1 - f) * O)`` for ``D`` demonstration and
  ``O`` online episodes in the listing, so that online episodes make up ``online.fraction = f`` of the
  windows of a pass (``data.WindowSampler`` draws ``windows * r`` windows of them, rounded stochastically);
  1 when the store holds no demonstrations.

A file deleted between listing and reading (the online retention bound) is read as no rows, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from mugato_ray.episodes import is_online_file

REPEAT_KEY = "window_repeat"
"""Per row: how many times a pass draws this episode's windows, relative to a demonstration."""


def listed_files(folder: Path) -> list[Path]:
    """Every ``*.parquet`` directly under ``folder``, sorted; hidden files (temporaries) skipped."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.glob("*.parquet") if f.is_file() and not f.name.startswith("."))


def online_repeat(demo_rows: int, online_rows: int, fraction: float) -> float:
    """The multiplicity ``r`` that makes online episodes ``fraction`` of a pass's windows (module doc)."""
    if online_rows == 0 or demo_rows == 0 or fraction <= 0:
        return 1.0
    return fraction * demo_rows / ((1.0 - fraction) * online_rows)


class StoreDatasource(Datasource):
    """The Parquet files of one task's store, listed when the dataset executes (see the module doc)."""

    def __init__(self, folder: str | Path, fraction: float, path_key: str, exclude: Sequence[str] = ()):
        self.folder = Path(folder)
        self.fraction, self.path_key, self.exclude = float(fraction), path_key, {str(p) for p in exclude}

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        files = [f for f in listed_files(self.folder) if str(f) not in self.exclude]
        rows = {}
        for f in files:
            try:
                rows[f] = pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowException):  # deleted since the listing, or unreadable: left out
                continue
        online = sum(n for f, n in rows.items() if is_online_file(f))
        repeat = online_repeat(sum(rows.values()) - online, online, self.fraction)
        return [ReadTask(_reader(f, repeat if is_online_file(f) else 1.0, self.path_key),
                         BlockMetadata(num_rows=n, size_bytes=None, exec_stats=None, input_files=[str(f)]))
                for f, n in rows.items()]


def _reader(path: Path, repeat: float, path_key: str):
    def read() -> list[pa.Table]:
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            return []  # removed by the retention bound after the listing
        n = table.num_rows
        table = table.append_column(path_key, pa.array([str(path)] * n, pa.string()))
        return [table.append_column(REPEAT_KEY, pa.array(np.full(n, repeat), pa.float64()))]

    return read
