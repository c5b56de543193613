"""The data pipeline: episode store -> Ray Data tokenize/pad actors -> fixed-shape sequence rows per task.

One ``ray.data.Dataset`` per task (each task has its own fixed row shapes, see ``mugato_ray.sequence``)::

    read_parquet(<run_dir>/data/<task>/*.parquet)          one row per episode
      .with_column("window_seed", random(seed))            fresh windows every epoch, reproducibly
      .map_batches(WindowSampler, ActorPoolStrategy(n))    tokenize + cut windows + pad: (E, T, C) rows

Every episode yields ``windows`` training sequences per pass (random windows of whole timesteps, some
prompted), so one pass is sized to what training will draw (see :func:`windows_per_pass`). If a run
needs more, the trainer iterates the dataset again: Ray Data re-executes it and the ``random``
expression, reseeded per execution, gives new windows.

The task mixture: each optimizer step accumulates gradients over ``M`` micro-batches
(``train.grad_accum``, 0: one per task); a micro-batch holds one task (fixed shapes). The tasks of step
``s`` are drawn from the configured weights by systematic sampling with an RNG seeded by
``(train.seed, s)`` (:func:`step_tasks`): a pure function of the step, so every DDP rank draws the same
tasks in the same order (their collectives line up) and a resumed run continues the same sequence.
Systematic sampling gives every task ``floor`` or ``ceil`` of ``M * weight`` micro-batches per step,
so equal weights with ``M = #tasks`` put every task in every step. A task with ``tasks[i].start_step`` > 0
joins at that step: before it, it has no weight and does not count in ``M``.

Images stay uint8 patches all the way; the model normalizes them on the device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mugato_ray.episodes import Episode, episodes_from_batch, is_online_file, store_dir, write_episodes
from mugato_ray.resolve import ResolvedTask, resolve_task, resolve_tasks
from mugato_ray.sequence import STEP_MASK_KEY, LayoutField, SequenceBuilder, SequenceLayout
from mugato_ray.store_check import StoreCheck, check_stores, parquet_files
from mugato_ray.store_source import REPEAT_KEY, StoreDatasource
from mugato_ray.tokenizer import FieldSpec, Modality, SpaceSpec, VocabLayout

if TYPE_CHECKING:
    import ray.data

    from mugato_ray.config import Config
    from mugato_ray.resources import Plan

log = logging.getLogger(__name__)

WINDOW_SEED_KEY = "window_seed"
"""Column added to store rows: a per-epoch random number that seeds the windows of the rows' batch."""
PATH_KEY = "path"
"""The column Ray Data adds with ``include_paths``: the file a row was read from (when repeats are filtered)."""
ONLINE_KEY = "online"
"""Sequence rows of runs with online experience carry it: True for a window of an online episode (the
training loop counts them, so the report shows online data reaching training)."""
MAX_WINDOWS_PER_PASS = 16
"""Cap on windows per episode in one pass of a store read as several blocks. The windows of one block's
episodes leave the actor back to back, so a huge pass would feed long runs of the same episodes; past
the cap the trainer iterates again (new epoch, new windows). A store read as one block has no cap."""
MIN_BATCHES_PER_PASS = 32
"""...but a pass always holds at least this many batches per rank: with few episodes and big batches (a
Markov task with a 1-step window and 512 rows) 16 windows per episode were 3 batches, and the pass
restarted every 3 steps, each restart stalling training (bench/README.md, "Learning")."""
LAYOUTS_FILE = "layouts.json"


# ---------------------------------------------------------------------------------------------
# The task mixture


def task_weights(cfg: Config, step: int | None = None) -> np.ndarray:
    """(n_tasks,) mixture probabilities from ``tasks[i].weight``; at optimizer step ``step``, only over the
    tasks that have joined by then (``tasks[i].start_step``; None: every task)."""
    if not cfg.tasks:
        raise ValueError("config key 'tasks' is empty: there is nothing to train on")
    w = np.asarray([t.weight for t in cfg.tasks], np.float64)
    if step is not None:
        w = np.where(np.asarray([t.start_step for t in cfg.tasks]) <= step, w, 0.0)
    if w.sum() <= 0:
        when = "" if step is None else f" at step {step} (tasks[].start_step)"
        raise ValueError(f"config key 'tasks': weights {w.tolist()}{when} sum to 0; at least one must be positive")
    return w / w.sum()


def active_tasks(cfg: Config, step: int) -> int:
    """How many tasks have joined the mixture by optimizer step ``step`` (``tasks[i].start_step``)."""
    return sum(t.start_step <= step for t in cfg.tasks)


def task_batch_size(cfg: Config, task: str) -> int:
    """Rows per micro-batch of ``task``: its ``tasks[i].batch_size``, else ``data.batch_size``."""
    entry = cfg.task(task)
    if entry is None:
        raise KeyError(f"task '{task}' is not in config key 'tasks'")
    return entry.batch_size if entry.batch_size is not None else cfg.data.batch_size


def micro_batches_per_step(cfg: Config, step: int) -> int:
    """M: micro-batches accumulated into optimizer step ``step`` (``train.grad_accum``, 0: one per task that
    has joined by then)."""
    return cfg.train.grad_accum if cfg.train.grad_accum > 0 else active_tasks(cfg, step)


def step_tasks(cfg: Config, step: int) -> np.ndarray:
    """(M,) task indices of the micro-batches of optimizer step ``step``; identical on every rank.

    Systematic sampling: M evenly spaced points ``(u + i) / M`` with one uniform offset ``u`` from an RNG
    seeded by ``(train.seed, step)``, mapped through the cumulative weights of the tasks that have joined.
    """
    cdf = np.cumsum(task_weights(cfg, step))
    m = micro_batches_per_step(cfg, step)
    u = np.random.default_rng([cfg.train.seed, step]).random()
    points = (u + np.arange(m)) / m
    return np.minimum(np.searchsorted(cdf, points, side="right"), len(cdf) - 1)


def task_counts(cfg: Config, start: int, stop: int) -> np.ndarray:
    """(n_tasks,) micro-batches each task gets over steps ``[start, stop)``."""
    counts = np.zeros(len(cfg.tasks), np.int64)
    for step in range(start, stop):
        np.add.at(counts, step_tasks(cfg, step), 1)
    return counts


def windows_per_pass(micro_batches: int, batch_size: int, world_size: int, episodes: int,
                     one_block: bool = False) -> int:
    """Windows per episode in one pass so that every rank can draw ``micro_batches`` full batches.

    ``streaming_split(equal=True)`` gives each rank ``floor(rows / world)`` rows and batches drop the
    remainder, hence one spare batch per rank. A store read as several blocks is capped at
    :data:`MAX_WINDOWS_PER_PASS`, or at the windows that make :data:`MIN_BATCHES_PER_PASS` batches per
    rank if that is more; one read as ``one_block`` (:func:`reads_as_one_block`) is not.
    """
    episodes = max(episodes, 1)
    need = max(1, math.ceil((micro_batches + 1) * batch_size * world_size / episodes))
    if one_block:
        return int(need)
    cap = max(MAX_WINDOWS_PER_PASS, math.ceil(MIN_BATCHES_PER_PASS * batch_size * world_size / episodes))
    return int(min(cap, need))


def reads_as_one_block(cfg: Config, files: Sequence[Path]) -> bool:
    """Whether a store of these files is read as one block (at most ``data.one_block_mib`` on disk).

    Then every actor call sees all its episodes, so back-to-back windows cover the whole store and one
    pass can last the whole run: each pass restart costs the trainer seconds (a new actor pool), and a
    Markov task with few episodes and big batches restarted every 32 batches (bench/README.md, "Training").
    """
    return sum(Path(f).stat().st_size for f in files) <= cfg.data.one_block_mib * 2**20


# ---------------------------------------------------------------------------------------------
# Which episodes training reads (GATO's data filter)

RETURN_FILTERED_SOURCES = ("expert", "policy")
"""Sources whose episodes must reach the return threshold. A dagger episode's labels are the expert's
whatever the policy's return was (its failures are where those labels matter most)."""


@dataclass(frozen=True)
class EpisodeFilter:
    """Keep an episode when its source is in ``sources`` and, for expert and policy episodes, its return is
    at least ``min_return`` (None: no threshold), and read each episode id once: ``repeats`` lists the
    later copies of ids stored in more than one file (see :func:`repeated_ids`), and a second copy within
    one file is dropped too."""

    sources: tuple[str, ...]
    min_return: float | None = None
    repeats: frozenset[tuple[str, str]] = frozenset()
    """``(real path of a file, episode_id)`` of copies to skip: the id was stored in an earlier file."""
    bad_rows: frozenset[tuple[str, str]] = frozenset()
    """``(real path of a file, episode_id)`` of rows the store check found bad (``data.on_bad_file: skip``)."""

    @classmethod
    def from_config(cls, cfg: Config, task: str | ResolvedTask, files: Sequence[Path] = (),
                    check: StoreCheck | None = None) -> EpisodeFilter:
        threshold = resolve_task(task, cfg).min_return(cfg.data.min_return_fraction)
        bad = check.bad_ids if check is not None else frozenset()
        return cls(tuple(cfg.data.sources), threshold, repeated_ids(files), bad)

    @property
    def by_file(self) -> bool:
        """Whether the filter needs each row's file (it leaves out copies or bad rows of given files)."""
        return bool(self.repeats or self.bad_rows)

    def mask(self, sources: Sequence[str], returns: Sequence[float], ids: Sequence[str] | None = None,
             path: str | Sequence[str] | None = None) -> np.ndarray:
        """(N,) bool: which of N episodes (their ``source``, ``return`` and ``episode_id`` columns, from the file
        ``path``, or each from its own file of a sequence of N paths) training reads."""
        src = np.asarray(sources, dtype=object)
        keep = np.isin(src, self.sources)
        if self.min_return is not None:
            low = np.asarray(returns, np.float64) < self.min_return
            keep &= ~(low & np.isin(src, RETURN_FILTERED_SOURCES))
        if ids is not None:
            paths = [path] * len(ids) if path is None or isinstance(path, str) else [str(p) for p in path]
            real = {p: os.path.realpath(p) for p in set(paths) if p is not None}
            seen: set[str] = set()
            for j, (i, p) in enumerate(zip(ids, paths)):
                if i in seen or (p is not None and ((real[p], i) in self.repeats or (real[p], i) in self.bad_rows)):
                    keep[j] = False
                seen.add(i)
        return keep

    def apply(self, episodes: Sequence[Any]) -> list[Any]:
        """The kept ones of a list of Episodes (an id that appears again is read once, the first time)."""
        keep = self.mask([ep.source for ep in episodes], [ep.episode_return for ep in episodes],
                         [ep.episode_id for ep in episodes])
        return [ep for ep, k in zip(episodes, keep) if k]


def repeated_ids(files: Sequence[Path]) -> frozenset[tuple[str, str]]:
    """``(real path, episode_id)`` for every copy of an id that an earlier file of ``files`` already holds.

    The store refuses a second copy at write time (``episodes.write_episodes``); this catches a file put in
    by hand. Each such copy is logged once, naming both files."""
    import pyarrow.parquet as pq

    first: dict[str, Path] = {}
    repeats = set()
    for f in files:
        for i in set(pq.read_table(f, columns=["episode_id"]).column("episode_id").to_pylist()):
            if i in first:
                repeats.add((os.path.realpath(f), i))
                log.warning("episode %r is stored in %s and again in %s; training reads it once", i, first[i], f)
            else:
                first[i] = f
    return frozenset(repeats)


def count_kept(files: Sequence[Path], episode_filter: EpisodeFilter) -> tuple[int, dict[str, int]]:
    """Episodes of ``files`` the filter keeps, and all episodes by source (reads three columns only)."""
    import pyarrow.parquet as pq

    kept, by_source = 0, Counter()
    for f in files:
        table = pq.read_table(f, columns=["source", "return", "episode_id"])
        sources, returns = table.column("source").to_pylist(), table.column("return").to_pylist()
        ids = table.column("episode_id").to_pylist()
        kept += int(episode_filter.mask(sources, returns, ids, str(f)).sum())
        by_source.update(sources)
    return kept, dict(by_source)


# ---------------------------------------------------------------------------------------------
# The Ray Data actor


class WindowSampler:
    """Store rows -> ``windows`` training sequences per episode (a ``map_batches`` generator class).

    Wraps :class:`~mugato_ray.sequence.SequenceBuilder`: draw ``d`` of a batch uses the seed
    ``(seed, d, the batch's window_seed)``, so the output depends only on the seed, the batch and the
    epoch (through ``window_seed``), never on which actor ran it. Yields one batch per draw, so an
    actor holds a single batch of sequences at a time.
    """

    def __init__(self, task: str, spec: SpaceSpec, cfg: Config, seed: int = 0, windows: int = 1,
                 episode_filter: EpisodeFilter | None = None):
        self.builder = SequenceBuilder(task, spec, cfg, seed=seed)
        self.seed, self.windows = int(seed), int(windows)
        self.filter = episode_filter or EpisodeFilter.from_config(cfg, task)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        paths = batch.get(PATH_KEY)  # each row's file (a block is one file, or a whole small store)
        path = str(paths[0]) if paths is not None and len(paths) else None  # an online store's block: one file
        keep = self.filter.mask(batch["source"], batch["return"], batch["episode_id"], paths)
        rows = {k: v[keep] for k, v in batch.items() if k not in (WINDOW_SEED_KEY, PATH_KEY, REPEAT_KEY)}
        seeds = batch.get(WINDOW_SEED_KEY)
        # float in [0, 1) -> 53 bits, the whole entropy of the value.
        epoch_key = int(seeds[0] * 2**53) if seeds is not None and len(seeds) else 0
        repeat = batch.get(REPEAT_KEY)
        draws = self.windows
        if repeat is not None and len(repeat):  # a store read by StoreDatasource (online experience)
            rng = np.random.default_rng([self.seed, epoch_key, 0x0411E])
            exact = self.windows * float(repeat[0])
            draws = int(exact) + int(rng.random() < exact - int(exact))  # stochastic rounding: the mean is exact
        online = repeat is not None and path is not None and is_online_file(path)
        # The draws share the decoded, checked and tokenized episodes; only the windows differ.
        episodes, tokens = episodes_from_batch(rows), {}
        self.builder.check(episodes)
        for draw in range(draws):
            self.builder.seed = int(np.random.SeedSequence([self.seed, draw, epoch_key]).generate_state(1)[0])
            out = self.builder.build(episodes, checked=True, tokens=tokens)
            if repeat is not None:
                out[ONLINE_KEY] = np.full(len(out[STEP_MASK_KEY]), online)
            yield out


# ---------------------------------------------------------------------------------------------
# Datasets


def task_dataset(
    task: str,
    store_dir: str | Path | Sequence[Path],
    spec: SpaceSpec,
    cfg: Config,
    *,
    windows: int = 1,
    actors: int | None = None,
    actor_cpus: float | None = None,
    seed: int | None = None,
    episode_filter: EpisodeFilter | None = None,
    exclude: Sequence[Path] = (),
) -> ray.data.Dataset:
    """A task's sequence rows: ``{layout key: (E, T, C), step_mask: (E,), prompt_mask: (E,)}`` per row.

    ``store_dir`` is the task's store directory or its list of Parquet files. ``actors`` /
    ``actor_cpus`` default to ``data.num_tokenize_actors`` (at least 1) / ``data.tokenize_actor_cpus``.
    Each file is one block, read and tokenized inside an actor (Ray fuses the read into the actor
    pool), so one actor call sees a whole file of episodes; a store of at most ``data.one_block_mib`` is
    one block (:func:`reads_as_one_block`), so a call sees all of it. With ``online.enabled`` and a directory, the
    store is listed again at every pass (``store_source.StoreDatasource``; ``exclude``: files left out),
    so the episodes online actors add reach training, and rows carry ``ONLINE_KEY``.
    """
    import ray.data

    actors = max(1, cfg.data.num_tokenize_actors if actors is None else actors)
    actor_cpus = cfg.data.tokenize_actor_cpus if actor_cpus is None else actor_cpus
    seed = cfg.train.seed if seed is None else seed
    files = list(store_dir) if isinstance(store_dir, (list, tuple)) else parquet_files(store_dir)
    if not files:
        raise FileNotFoundError(f"task '{task}': no *.parquet files in {store_dir}")
    if cfg.online.enabled and not isinstance(store_dir, (list, tuple)):
        source = StoreDatasource(store_dir, cfg.online.fraction, PATH_KEY, exclude)
        ds = ray.data.read_datasource(source, num_cpus=actor_cpus)
        return _tokenized(ds, task, spec, cfg, seed, windows, episode_filter, actors, actor_cpus)
    paths = [str(p) for p in files]
    # Ray Data's default Parquet reader (DataSourceV2) lists files in tasks that reserve a whole CPU,
    # and that cannot be configured: with train workers and tokenize actors holding fractions of
    # every node's CPUs, no node has a whole CPU left and the read waits forever. The V1 reader has no
    # listing task and its read tasks reserve `num_cpus`.
    ctx = ray.data.DataContext.get_current()
    use_v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        # One block per file (Ray Data would split files into many tiny blocks), or one for a small store:
        # an actor call then sees a whole file of episodes, the donors of its prompts, and pays its
        # overheads once.
        blocks = 1 if reads_as_one_block(cfg, files) else len(paths)
        ds = ray.data.read_parquet(paths, num_cpus=actor_cpus, override_num_blocks=blocks,
                                   include_paths=bool(episode_filter and episode_filter.by_file))
    finally:
        ctx.use_datasource_v2 = use_v2
    return _tokenized(ds, task, spec, cfg, seed, windows, episode_filter, actors, actor_cpus)


def _tokenized(ds: ray.data.Dataset, task: str, spec: SpaceSpec, cfg: Config, seed: int, windows: int,
               episode_filter: EpisodeFilter | None, actors: int, actor_cpus: float) -> ray.data.Dataset:
    """Store rows -> sequence rows, in the tokenize actor pool."""
    import ray.data
    from ray.data.expressions import random

    # The same CPUs as the read and the actors, so that Ray Data fuses read, column and tokenizing into
    # the actors: the windows then depend on the file, not on the order in which reads finish.
    ds = ds.with_column(WINDOW_SEED_KEY, random(seed=seed), num_cpus=actor_cpus)
    return ds.map_batches(
        WindowSampler,
        fn_constructor_kwargs={"task": task, "spec": spec, "cfg": cfg, "seed": seed, "windows": windows,
                               "episode_filter": episode_filter},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        batch_size=None,  # whole blocks: more episodes per call means more prompt donors and better mixing
        batch_format="numpy",
    )


@dataclass
class TaskData:
    """Everything training needs per task."""

    datasets: dict[str, Any]
    """task -> ray.data.Dataset of sequence rows."""
    specs: dict[str, SpaceSpec]
    layouts: dict[str, SequenceLayout]
    episodes: dict[str, int]
    """task -> episodes training reads (those the data filter keeps)."""
    windows: dict[str, int]
    """task -> windows per episode in one pass."""
    skipped_files: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    """task -> (file, or "file row i (episode id)", reason) of what the store check left out
    (``data.on_bad_file: skip``)."""


def left_out(check: StoreCheck) -> list[tuple[str, str]]:
    """The report's entries for what a store check left out: bad files, then bad rows."""
    return ([(str(f), why) for f, why in check.bad_files]
            + [(f"{r.file} row {r.row} (episode {r.episode_id})", r.reason) for r in check.bad_rows])


def task_layouts(cfg: Config, resolved: Mapping[str, ResolvedTask] | None = None
                 ) -> tuple[dict[str, SpaceSpec], dict[str, SequenceLayout]]:
    """task -> SpaceSpec and task -> SequenceLayout for every configured task (``resolved``: resolve_tasks(cfg))."""
    resolved = resolved if resolved is not None else resolve_tasks(cfg)
    return {n: t.spec for n, t in resolved.items()}, {n: t.layout for n, t in resolved.items()}


def build_datasets(cfg: Config, plan: Plan | None = None, world_size: int = 1,
                   resolved: Mapping[str, ResolvedTask] | None = None) -> TaskData:
    """One sequence dataset per configured task, each pass sized to the run (``train.steps``).
    ``resolved``: the run's tasks (default: ``resolve_tasks(cfg)``)."""
    import ray.data

    from mugato_ray import ray_data_idle  # lazy: it imports Ray Data internals, needed only here

    # One progress bar per operator and task floods the console; training prints its own progress lines.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    ray_data_idle.install(context)  # idle executors must not spin on the CPUs training needs
    resolved = resolved if resolved is not None else resolve_tasks(cfg)
    specs, layouts = task_layouts(cfg, resolved)
    counts = task_counts(cfg, 0, cfg.train.steps)
    datasets, episodes, windows = {}, {}, {}
    checks = check_stores(cfg, resolved)  # every store checked before any dataset starts
    skipped = {t: left_out(c) for t, c in checks.items() if c.problems()}
    for i, entry in enumerate(cfg.tasks):
        files = checks[entry.name].usable
        episode_filter = EpisodeFilter.from_config(cfg, resolved[entry.name], files, checks[entry.name])
        episodes[entry.name], by_source = count_kept(files, episode_filter)
        if episodes[entry.name] == 0:
            raise ValueError(
                f"task '{entry.name}': none of the {sum(by_source.values())} episodes in {files[0].parent} "
                f"(by source: {by_source}) passes the data filter: data.sources={list(episode_filter.sources)}, "
                f"data.min_return_fraction={cfg.data.min_return_fraction} (return >= {episode_filter.min_return})"
            )
        one_block = not cfg.online.enabled and reads_as_one_block(cfg, files)  # as task_dataset reads it
        windows[entry.name] = windows_per_pass(int(counts[i]), task_batch_size(cfg, entry.name), world_size,
                                              episodes[entry.name], one_block)
        datasets[entry.name] = task_dataset(
            entry.name,
            store_dir(cfg, entry.name) if cfg.online.enabled else files,
            specs[entry.name],
            cfg,
            windows=windows[entry.name],
            actors=plan.tokenize_actors if plan else None,
            actor_cpus=plan.tokenize_cpus if plan else None,
            # Tasks get different seeds so that equal stores do not give equal windows.
            seed=int(np.random.SeedSequence([cfg.train.seed, i]).generate_state(1)[0]),
            episode_filter=episode_filter,
            exclude=[f for f, _ in checks[entry.name].bad_files],
        )
    return TaskData(datasets, specs, layouts, episodes, windows, skipped)


# ---------------------------------------------------------------------------------------------
# Layouts on disk (JSON; loading never executes code)


def _spec_from_dict(d: Mapping[str, Any]) -> SpaceSpec:
    def field(f: Mapping[str, Any]) -> FieldSpec:
        tuples = {k: tuple(v) for k, v in f.items() if isinstance(v, list)}
        return FieldSpec(**{**f, **tuples, "modality": Modality(f["modality"])})

    return SpaceSpec(
        observation=tuple(field(f) for f in d["observation"]),
        action=tuple(field(f) for f in d["action"]),
        vocab=VocabLayout(**d["vocab"]),
        mu=float(d["mu"]),
        M=float(d["M"]),
    )


def _layout_from_dict(d: Mapping[str, Any]) -> SequenceLayout:
    fields = tuple(
        LayoutField(**{**f, "modality": Modality(f["modality"]), "grid": tuple(f["grid"]) if f["grid"] else None})
        for f in d["fields"]
    )
    vocab = VocabLayout(**d["vocab"]) if d.get("vocab") else None
    return SequenceLayout(task=d["task"], fields=fields, steps=int(d["steps"]), vocab=vocab)


def save_layouts(path: str | Path, specs: Mapping[str, SpaceSpec], layouts: Mapping[str, SequenceLayout]) -> Path:
    """Write ``{task: {"spec": ..., "layout": ...}}`` as JSON (what evaluation needs to rebuild a policy)."""
    path = Path(path)
    data = {task: {"spec": dataclasses.asdict(specs[task]), "layout": dataclasses.asdict(layouts[task])} for task in specs}
    path.write_text(json.dumps({"format": 1, "tasks": data}, indent=1))
    return path


def load_layouts(path: str | Path) -> tuple[dict[str, SpaceSpec], dict[str, SequenceLayout]]:
    """Inverse of :func:`save_layouts`; a missing or malformed file raises ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        tasks = data["tasks"]
        specs = {task: _spec_from_dict(d["spec"]) for task, d in tasks.items()}
        layouts = {task: _layout_from_dict(d["layout"]) for task, d in tasks.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"layouts file {path} is missing or malformed: {e}") from e
    return specs, layouts


# ---------------------------------------------------------------------------------------------
# Synthetic stores (tests and benchmarks: no environment needed)

_WORDS = ("go", "to", "the", "red", "blue", "ball", "key", "box", "open", "door", "pick", "up", "a")


def _random_values(f: FieldSpec, n: int, rng: np.random.Generator) -> np.ndarray | list[str]:
    """``n`` random per-step values of field ``f``: ``(n, *f.shape)`` in ``f.dtype``, or n strings."""
    if f.modality is Modality.TEXT:
        return [" ".join(rng.choice(_WORDS, size=rng.integers(2, 6))) for _ in range(n)]
    if f.modality is Modality.IMAGE:
        return rng.integers(0, 256, size=(n, *f.shape), dtype=np.uint8)
    if f.modality is Modality.DISCRETE:
        v = np.asarray(f.start) + rng.integers(0, np.asarray(f.nvec), size=(n, len(f.nvec)))
        return v.reshape(n, *f.shape).astype(f.dtype)
    low, high = np.asarray(f.low, np.float64), np.asarray(f.high, np.float64)
    finite = np.isfinite(low) & np.isfinite(high)
    x = np.where(finite, rng.uniform(np.where(finite, low, 0), np.where(finite, high, 1), size=(n, f.tokens)),
                 rng.normal(size=(n, f.tokens)))
    return x.reshape(n, *f.shape).astype(f.dtype)


def synthetic_episodes(task: str, spec: SpaceSpec, n: int, *, seed: int = 0, length: tuple[int, int] = (4, 40),
                       source: str = "expert") -> list:
    """``n`` valid episodes of random content for ``spec`` (episode lengths uniform in ``length``), labelled
    ``source`` (default "expert": they stand in for demonstrations, which training reads by default).

    Tasks whose action is text (text-only, vision-language) get one step, as their datasets do.
    """
    rng = np.random.default_rng(seed)
    (act,) = spec.action
    text_action = act.modality is Modality.TEXT
    out = []
    for i in range(n):
        steps = 1 if text_action else int(rng.integers(length[0], length[1] + 1))
        out.append(Episode(
            task=task,
            episode_id=f"{task}-synthetic-{seed}-{i}",
            source=source,
            seed=seed * 1_000_003 + i,
            observations={f.key: _random_values(f, steps, rng) for f in spec.observation},
            actions=_random_values(act, steps, rng),
            rewards=rng.normal(size=steps).astype(np.float32),
        ).validate(spec))
    return out


def write_synthetic_store(cfg: Config, episodes: int = 8, *, files: int = 1, seed: int = 0,
                          length: tuple[int, int] = (4, 40)) -> dict[str, Path]:
    """Write ``episodes`` synthetic episodes of every configured task to its store, split over ``files``
    Parquet files (one Ray Data block each); task -> directory."""
    specs, _ = task_layouts(cfg)
    out = {}
    for i, (task, spec) in enumerate(specs.items()):
        out[task] = store_dir(cfg, task)
        eps = synthetic_episodes(task, spec, episodes, seed=seed * 1000 + i, length=length)
        for f, part in enumerate(np.array_split(np.arange(episodes), files)):
            write_episodes(out[task], [eps[j] for j in part], name=f"synthetic-{seed}-{f}.parquet", spec=spec)
    return out
