"""The store check: bad files and bad rows of a task's store are named before work starts, or left out."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mugato_ray.cli import parse_job_args
from mugato_ray.config import load_config
from mugato_ray.data import EpisodeFilter, WindowSampler, count_kept, left_out, task_layouts, write_synthetic_store
from mugato_ray.episodes import episode_to_row, read_episodes
from mugato_ray.resolve import resolve_tasks
from mugato_ray.store_check import check_store, check_stores, store_files

EPISODES = 8
TASKS = ["Pendulum-v1", "CartPole-v1"]


def make_cfg(run_dir, *overrides):
    names = ", ".join(f"{{name: {t}}}" for t in TASKS)
    return load_config("configs/smoke.yaml", [f"run_dir={run_dir}", f"tasks=[{names}]", *overrides])


def spoil_one_row(file: Path, row: int = 2) -> str:
    """Rewrite ``file`` in place with a NaN reward in one row (a readable file with one bad row); its id."""
    table = pq.read_table(file)
    rows = [episode_to_row(ep) for ep in read_episodes(file)]
    rows[row]["rewards"] = [math.nan, *rows[row]["rewards"][1:]]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), file)
    return rows[row]["episode_id"]


@pytest.fixture
def store(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    write_synthetic_store(cfg, EPISODES, files=2, length=(5, 20))
    return cfg


def test_a_bad_row_is_named_with_file_row_episode_and_field(store):
    file = store_files(store, "Pendulum-v1")[1]
    bad_id = spoil_one_row(file)
    spec = resolve_tasks(store)["Pendulum-v1"].spec
    check = check_store(store, "Pendulum-v1", spec)
    assert check.bad_files == [] and len(check.bad_rows) == 1
    row = check.bad_rows[0]
    assert (row.file, row.row, row.episode_id) == (file, 2, bad_id)
    assert "rewards" in row.reason and "NaN" in row.reason
    assert check.usable == store_files(store, "Pendulum-v1")  # the file stays: its other rows are fine
    assert check_store(store, "Pendulum-v1", spec, rows=False).bad_rows == []  # footers only: not seen


def test_every_bad_file_and_row_of_every_task_is_reported_at_once(store):
    spoil_one_row(store_files(store, "Pendulum-v1")[0], row=0)
    folder = store_files(store, "CartPole-v1")[0].parent
    (folder / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError) as e:
        check_stores(store, resolve_tasks(store))
    message = str(e.value)
    assert "2 bad store file(s) or row(s)" in message and "data.on_bad_file=skip" in message
    assert "task 'Pendulum-v1'" in message and "row 0" in message
    assert "task 'CartPole-v1'" in message and "bad.parquet" in message


def test_skip_leaves_the_bad_row_out_of_training_and_keeps_the_rest(store):
    skip = load_config("configs/smoke.yaml", [f"run_dir={store.run_dir}", "tasks=[{name: Pendulum-v1}]",
                                              "data.on_bad_file=skip"])
    file = store_files(skip, "Pendulum-v1")[0]
    bad_id = spoil_one_row(file)
    checks = check_stores(skip, resolve_tasks(skip))
    assert [what for what, _ in left_out(checks["Pendulum-v1"])] == [f"{file} row 2 (episode {bad_id})"]
    files = checks["Pendulum-v1"].usable
    f = EpisodeFilter.from_config(skip, "Pendulum-v1", files, checks["Pendulum-v1"])
    assert f.by_file and count_kept(files, f)[0] == EPISODES - 1
    # The tokenize actor's function on the spoiled file's block: the bad row never reaches the tokenizer.
    batch = {k: np.asarray(v.to_pylist(), dtype=object) for k, v in zip(*_columns(file))}
    batch["path"] = np.asarray([str(file)] * len(batch["episode_id"]), dtype=object)
    specs, _ = task_layouts(skip)
    out = list(WindowSampler("Pendulum-v1", specs["Pendulum-v1"], skip, windows=1, episode_filter=f)(batch))
    kept = sum(len(o[next(iter(o))]) for o in out)
    assert kept == len(batch["episode_id"]) - 1
    unfiltered = EpisodeFilter(f.sources, f.min_return)
    with pytest.raises(Exception, match="NaN"):  # without the check, the row stops the tokenizer
        list(WindowSampler("Pendulum-v1", specs["Pendulum-v1"], skip, windows=1, episode_filter=unfiltered)(batch))


def _columns(file):
    table = pq.read_table(file)
    return table.column_names, table.columns


def test_jobs_report_bad_store_contents_before_ray_starts(store, capsys):
    """The train job needs every store; the main job checks the stores that exist. Exit code 2, nothing
    written, every problem listed."""
    spoil_one_row(store_files(store, "Pendulum-v1")[0])
    argv = ["--config", "configs/smoke.yaml", f"run_dir={store.run_dir}",
            "tasks=[{name: Pendulum-v1}, {name: CartPole-v1}, {name: Acrobot-v1}]"]
    with pytest.raises(SystemExit) as e:
        parse_job_args(argv, "d", store="required")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Acrobot-v1" in err and "no episodes under" in err  # missing store named
    with pytest.raises(SystemExit) as e:
        parse_job_args(argv, "d", store="present")  # Acrobot's store will be collected: not a problem
    err = capsys.readouterr().err
    assert e.value.code == 2 and "row 2" in err and "rewards" in err and "Acrobot" not in err
    assert not (Path(store.run_dir) / "config.yaml").exists()
    cfg, _ = parse_job_args([*argv, "data.on_bad_file=skip"], "d", store="present")  # skip: it goes on
    assert cfg.data.on_bad_file == "skip"
