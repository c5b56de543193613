"""The data pipeline: store -> Ray Data tokenize/pad actors -> fixed-shape rows, and the task mixture."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray

from mugato_ray.config import TaskEntry, load_config
from mugato_ray.data import (
    MAX_WINDOWS_PER_PASS,
    WINDOW_SEED_KEY,
    EpisodeFilter,
    WindowSampler,
    build_datasets,
    count_kept,
    load_layouts,
    micro_batches_per_step,
    save_layouts,
    step_tasks,
    task_counts,
    task_dataset,
    task_layouts,
    task_weights,
    windows_per_pass,
    write_synthetic_store,
)
from mugato_ray.episodes import read_episodes
from mugato_ray.sequence import PROMPT_MASK_KEY, STEP_MASK_KEY, tokenize_episode
from mugato_ray.store_check import store_files
from mugato_ray.tokenizer import make_text_tokenizer

TASKS = ["text-arith", "BabyAI-GoToRedBall-v0", "Pendulum-v1"]
EPISODES = 6
FILES = 3  # blocks: two actors get work


def make_cfg(run_dir, tasks=TASKS, *overrides):
    names = ", ".join(f"{{name: {t}}}" for t in tasks)
    return load_config("configs/smoke.yaml", [f"run_dir={run_dir}", f"tasks=[{names}]", *overrides])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("run"))
    write_synthetic_store(cfg, EPISODES, files=FILES, length=(20, 60))
    specs, layouts = task_layouts(cfg)
    return cfg, specs, layouts


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of the values (np.asarray would stack equal-length lists into 2-D)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def row_digest(row: dict) -> str:
    h = hashlib.sha1()
    for key in sorted(row):
        h.update(key.encode())
        h.update(np.ascontiguousarray(row[key]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Ray Data


def test_rows_have_the_fixed_layout_shapes(local_ray, store):
    cfg, specs, layouts = store
    for task in TASKS:
        layout = layouts[task]
        rows = task_dataset(task, store_files(cfg, task), specs[task], cfg, windows=2).take_all()
        assert len(rows) == 2 * EPISODES  # every episode gives `windows` sequences
        for row in rows:
            assert set(row) == {f.key for f in layout.fields} | {STEP_MASK_KEY, PROMPT_MASK_KEY}
            for f in layout.fields:
                assert row[f.key].shape == (layout.steps, f.tokens, f.channels), (task, f.key)
                assert row[f.key].dtype == (np.uint8 if f.is_image else np.int32), (task, f.key)
            assert row[STEP_MASK_KEY].shape == row[PROMPT_MASK_KEY].shape == (layout.steps,)
            real = row[STEP_MASK_KEY]
            assert real.sum() >= 1
            assert not real[np.argmin(real):].any() or real.all()  # padding only at the end
            if "sep" in row:
                assert (row["sep"][real] == specs[task].vocab.separator).all()


@pytest.mark.parametrize("one_block_mib", [64, 0])  # the whole store in one block, or a block per file
def test_training_reads_an_id_once_even_if_a_copy_got_in_by_hand(local_ray, tmp_path, one_block_mib):
    cfg = make_cfg(tmp_path / "run", ["Pendulum-v1"], f"data.one_block_mib={one_block_mib}")
    write_synthetic_store(cfg, EPISODES, files=FILES, length=(20, 60))
    specs, _ = task_layouts(cfg)
    files = store_files(cfg, "Pendulum-v1")
    copy = files[0].parent / "zz-copy.parquet"  # sorts last: the original file keeps its episodes
    shutil.copyfile(files[0], copy)
    files = store_files(cfg, "Pendulum-v1")
    f = EpisodeFilter.from_config(cfg, "Pendulum-v1", files)
    assert len(f.repeats) == EPISODES // FILES and all(path.endswith("zz-copy.parquet") for path, _ in f.repeats)
    assert count_kept(files, f)[0] == EPISODES
    rows = task_dataset("Pendulum-v1", files, specs["Pendulum-v1"], cfg, windows=1, episode_filter=f).take_all()
    assert len(rows) == EPISODES  # one window per distinct episode, none from the copy
    if not one_block_mib:  # a block per file: without the repeats the copy's episodes come through
        unfiltered = EpisodeFilter(f.sources, f.min_return)
        assert len(task_dataset("Pendulum-v1", files, specs["Pendulum-v1"], cfg, windows=1,
                                episode_filter=unfiltered).take_all()) == EPISODES + EPISODES // FILES
    # In one block each row is judged by its own file: an id is kept from its original file and left out
    # from the copy (one path for the whole batch would keep or drop both).
    a, b = sorted(i for _, i in f.repeats)
    keep = f.mask(["expert"] * 2, [0.0] * 2, [a, b], [str(files[0]), str(copy)])
    assert keep.tolist() == [True, False]
    eps = read_episodes(files[0])
    assert [e.episode_id for e in f.apply(eps + eps)] == [e.episode_id for e in eps]  # a list: first copy only


def _bad_store_files(cfg, task):
    """A truncated copy of a real file, a garbage file and a Parquet file of another schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = store_files(cfg, task)[0].parent
    good = store_files(cfg, task)[0].read_bytes()
    (folder / "truncated.parquet").write_bytes(good[: len(good) // 2])
    (folder / "bad.parquet").write_bytes(b"this is not parquet")
    pq.write_table(pa.table({"x": [1, 2]}), folder / "foreign.parquet")
    return {"truncated.parquet", "bad.parquet", "foreign.parquet"}


def test_bad_store_files_are_named_before_training_or_skipped_when_asked(local_ray, tmp_path):
    cfg = make_cfg(tmp_path / "run", ["Pendulum-v1"])
    write_synthetic_store(cfg, EPISODES, files=FILES, length=(20, 60))
    bad_names = _bad_store_files(cfg, "Pendulum-v1")
    with pytest.raises(ValueError) as e:
        build_datasets(cfg)  # fails on the check, before any Ray Data work
    message = str(e.value)
    assert all(name in message for name in bad_names) and "data.on_bad_file=skip" in message
    assert "unreadable Parquet" in message and "missing columns" in message
    skip = make_cfg(tmp_path / "run", ["Pendulum-v1"], "data.on_bad_file=skip")
    data = build_datasets(skip)
    assert {Path(f).name for f, _ in data.skipped_files["Pendulum-v1"]} == bad_names
    assert data.episodes["Pendulum-v1"] == EPISODES
    assert len(data.datasets["Pendulum-v1"].take_all()) >= EPISODES


def test_two_actors_give_the_same_rows_as_one(local_ray, store):
    """The windows depend on the seed, the batch and the epoch only, not on which actor ran them."""
    cfg, specs, _ = store
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, one_block_mib=0))  # a block per file
    task = "BabyAI-GoToRedBall-v0"
    digests = [
        Counter(row_digest(r) for r in task_dataset(task, store_files(cfg, task), specs[task], cfg,
                                                     windows=3, actors=n, actor_cpus=0.25).take_all())
        for n in (1, 2)
    ]
    assert sum(digests[0].values()) == 3 * EPISODES
    assert digests[0] == digests[1]


def test_a_small_store_is_one_block_so_every_draw_covers_all_its_episodes(local_ray, store):
    """Below data.one_block_mib the actor gets the whole store at once: each draw it yields holds one
    window of every episode, not of one file's episodes (so one long pass does not dwell on one file)."""
    cfg, specs, _ = store
    task = "Pendulum-v1"
    files = store_files(cfg, task)
    assert len(files) == FILES > 1
    # Which episode a row's first own (non-prompt) step comes from: its observation tokens are unique.
    owner = {}
    for f in files:
        for ep in read_episodes(f):
            obs = tokenize_episode(ep, specs[task], make_text_tokenizer(cfg.tokenizer))["obs/observation"]
            owner |= {obs[t].tobytes(): ep.episode_id for t in range(ep.length)}
    for mib, distinct in ((64, EPISODES), (0, EPISODES // FILES)):
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, one_block_mib=mib))
        rows = task_dataset(task, files, specs[task], c, windows=3).take_all()  # a block's rows stay in order
        first = [r["obs/observation"][np.argmin(r[PROMPT_MASK_KEY])].tobytes() for r in rows[:EPISODES]]
        assert len({owner[x] for x in first}) == distinct, mib


def test_each_pass_draws_new_windows(local_ray, store):
    cfg, specs, _ = store
    task = "Pendulum-v1"  # long episodes (20-60 steps) in a shorter window: many possible windows
    ds = task_dataset(task, store_files(cfg, task), specs[task], cfg, windows=1)
    first, second = (Counter(row_digest(r) for r in ds.take_all()) for _ in range(2))
    assert sum(first.values()) == sum(second.values()) == EPISODES
    assert first != second


def test_window_sampler_is_deterministic_and_never_mutates_its_batch(store):
    cfg, specs, _ = store
    import pyarrow as pa
    import pyarrow.parquet as pq

    task = "BabyAI-GoToRedBall-v0"
    table = pa.concat_tables([pq.read_table(f) for f in store_files(cfg, task)])
    batch = {c: object_array(table.column(c).to_pylist()) for c in table.column_names}
    batch[WINDOW_SEED_KEY] = np.full(len(table), 0.25)
    for v in batch.values():
        v.setflags(write=False)
    before = {k: v.copy() for k, v in batch.items()}
    runs = [list(WindowSampler(task, specs[task], cfg, seed=5, windows=2)(batch)) for _ in range(2)]
    assert len(runs[0]) == 2  # one yielded batch per draw
    for a, b in zip(*runs):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(runs[0][0][k], runs[0][1][k]) for k in runs[0][0])  # draws differ
    assert all(np.array_equal(batch[k], before[k]) for k in batch)


def test_missing_store_names_the_task_and_directory(tmp_path):
    cfg = make_cfg(tmp_path, ["Pendulum-v1"])
    with pytest.raises(FileNotFoundError, match=r"Pendulum-v1.*data/Pendulum-v1"):
        store_files(cfg, "Pendulum-v1")


# ---------------------------------------------------------------------------------------------
# The mixture (pure functions)


def test_mixture_follows_the_weights(tmp_path):
    cfg = make_cfg(tmp_path, TASKS, "train.grad_accum=5")
    cfg.tasks = [TaskEntry("text-arith", 5.0), TaskEntry("BabyAI-GoToRedBall-v0", 3.0),
                 TaskEntry("Pendulum-v1", 2.0), TaskEntry("CartPole-v1", 0.0)]
    steps = 2000
    counts = task_counts(cfg, 0, steps)
    share = counts / counts.sum()
    # Systematic sampling: every step holds floor or ceil of M * w micro-batches of each task, so the
    # shares are exact up to the rounding of each step, far tighter than multinomial noise.
    assert np.allclose(share, [0.5, 0.3, 0.2, 0.0], atol=0.01)
    for step in range(200):
        per_step = np.bincount(step_tasks(cfg, step), minlength=4)
        assert per_step.sum() == 5
        assert (np.abs(per_step - 5 * np.array([0.5, 0.3, 0.2, 0.0])) < 1).all()


def test_mixture_is_a_pure_function_of_seed_and_step(tmp_path):
    cfg = make_cfg(tmp_path)
    a = [step_tasks(cfg, s).tolist() for s in range(50)]
    assert a == [step_tasks(cfg, s).tolist() for s in range(50)]  # every rank, every restart
    # Equal weights and grad_accum=0 (one micro-batch per task): every task in every step.
    assert all(sorted(t) == [0, 1, 2] for t in a)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1, grad_accum=2))
    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=2))
    assert [step_tasks(other, s).tolist() for s in range(50)] != [step_tasks(cfg2, s).tolist() for s in range(50)]


def test_a_task_joins_the_mixture_at_its_start_step(tmp_path):
    """``tasks[i].start_step``: before it the task takes no micro-batch and M counts only the tasks already
    in (one micro-batch each); from it on, every task in every step. The pass sizes follow (task_counts)."""
    cfg = make_cfg(tmp_path, TASKS, "train.steps=100")
    cfg.tasks = [TaskEntry("text-arith"), TaskEntry("BabyAI-GoToRedBall-v0", start_step=30),
                 TaskEntry("Pendulum-v1", start_step=60)]
    assert [sorted(step_tasks(cfg, s).tolist()) for s in (0, 29, 30, 59, 60, 99)] == [
        [0], [0], [0, 1], [0, 1], [0, 1, 2], [0, 1, 2]]
    assert [micro_batches_per_step(cfg, s) for s in (0, 30, 60)] == [1, 2, 3]
    assert task_counts(cfg, 0, 100).tolist() == [100, 70, 40]
    assert task_weights(cfg, 29).tolist() == [1.0, 0.0, 0.0]
    assert task_weights(cfg).tolist() == pytest.approx([1 / 3] * 3)  # the streams: every task


def test_windows_per_pass_covers_every_rank():
    # 10 micro-batches of 4 on 2 ranks need 2 * 4 * (10 + 1) = 88 rows: 8 windows of 11 episodes.
    assert windows_per_pass(10, 4, 2, 11) == 8
    assert windows_per_pass(0, 4, 1, 100) == 1
    assert windows_per_pass(10**6, 4, 1, 100) == MAX_WINDOWS_PER_PASS
    # Big batches of few episodes: the cap grows so that a pass still holds 32 batches per rank.
    assert windows_per_pass(10**6, 512, 1, 100) == math.ceil(32 * 512 / 100)
    assert windows_per_pass(10**6, 32, 8, 10) == 32 * 32 * 8 // 10 + 1
    # A store read as one block has no cap: one pass lasts the run.
    assert windows_per_pass(10**6, 512, 1, 100, one_block=True) == math.ceil((10**6 + 1) * 512 / 100)
    assert windows_per_pass(10, 4, 2, 11, one_block=True) == 8


# ---------------------------------------------------------------------------------------------
# Layouts on disk


def test_layouts_round_trip_through_json(tmp_path, store):
    _, specs, layouts = store
    path = save_layouts(tmp_path / "layouts.json", specs, layouts)
    specs2, layouts2 = load_layouts(path)
    assert specs2 == specs
    assert layouts2 == layouts
    path.write_text('{"format": 1, "tasks": {"x": {"spec": {}}}}')
    with pytest.raises(ValueError, match="layouts.json"):
        load_layouts(path)


def test_executed_actions_read_through_ray_data_beside_files_without_the_column(local_ray, tmp_path):
    """A DART or DAgger episode's executed actions survive Ray Data's read, beside episodes without them in the same
    file and beside a file written before the column existed (its schema lacks the three columns)."""
    import pyarrow.parquet as pq

    from mugato_ray.episodes import Episode, episodes_from_batch, write_episodes

    def episode(seed: int, executed: bool) -> Episode:
        rng = np.random.default_rng(seed)
        actions = rng.integers(0, 3, 5)
        return Episode(task="CartPole-v1", episode_id=f"CartPole-v1-expert-{seed}", source="expert", seed=seed,
                       observations={"observation": rng.normal(size=(5, 4)).astype(np.float32)}, actions=actions,
                       rewards=np.ones(5, np.float32), terminated=True,
                       executed=(actions + 1) % 3 if executed else None)

    (new,) = write_episodes(tmp_path / "new", [episode(0, True), episode(1, False)])
    (old,) = write_episodes(tmp_path / "old", [episode(2, False)])
    table = pq.read_table(old)
    pq.write_table(table.drop_columns(["executed", "executed.dtype", "executed.shape"]), old)
    assert "executed" not in pq.read_schema(old).names
    read = [ep for batch in ray.data.read_parquet([str(new), str(old)]).iter_batches(batch_format="numpy")
            for ep in episodes_from_batch(batch)]
    got = {ep.seed: ep for ep in read}
    assert sorted(got) == [0, 1, 2]
    np.testing.assert_array_equal(got[0].executed, (got[0].actions + 1) % 3)
    assert got[0].executed.dtype == got[0].actions.dtype
    assert got[1].executed is None and got[2].executed is None
