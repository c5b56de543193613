"""Minari datasets in and out of the episode store (``jobs/import_minari.py``, ``jobs/export_minari.py``).

Import (:func:`plan_import`, then :func:`import_dataset`) reads a dataset that is on local disk and never
downloads: a dataset folder (or its ``data`` folder), or a dataset id under ``MINARI_DATASETS_PATH`` (default
``~/.minari/datasets``), opened with ``minari.MinariDataset`` (never ``minari.load_dataset``, which can fetch).

- Task: the one named, else the registered task whose ``env_id`` is the dataset's env spec id. The dataset's
  observation and action spaces must equal the task's (``resolve.env_spaces``: its wrapped env's), so the
  same space-to-token mapping (``specs.space_spec``) applies to both.
- Steps: a Minari episode holds T + 1 observations, T actions, rewards, terminations and truncations. The
  store keeps the observation each action was taken on, so the extra final observation is dropped; each
  step's observation is flattened by ``envs.flatten_observation``, as rollouts do; rewards become float32,
  ``terminated`` is the last termination flag, ``success`` the task's criterion on the return.
- Actions: the dataset's actions are what its env executed. Where its infos hold :data:`LABEL_INFO` (our
  export's), those are the labels: the episode's ``actions``, with the dataset's as ``executed`` where they
  differ (a DAgger or DART episode); otherwise the dataset's actions are the labels. No other info is read.
- Source: the one given, else the ``mugato_source`` our export writes into each episode's metadata, else
  "expert" (training reads the sources of ``data.sources``).
- Seed: the ``seed`` Minari records in each episode's metadata. Where a dataset has none (or with
  ``seed_from="index"``) the Minari episode index stands in for it, and the import says how many. Minari
  seeds resets itself with 64 random bits; a seed >= 2**63 is stored as ``seed - 2**64`` (int64 two's
  complement: environment seeds are never negative, so this is unambiguous) and exported back unchanged.
- Identity: ids are ``<task>-<source>-<seed>`` (``episodes.env_episode_id``), written by
  ``episodes.write_episodes``. Finding any of them stored stops the import before it writes anything, unless
  ``resume``: then the stored ones are skipped. A stored id whose length differs from the dataset's episode
  is another episode under the same id: an error either way.
- Files: ``<source>-minari-<dataset>-<first>-<last>.parquet`` (Minari episode indices), at most
  :data:`CHUNK_STEPS` steps each, so ``expert-*`` prompts find imported demonstrations. Imported data is offline
  data: online sources are named ``minari-<source>-...`` instead, so that ``episodes.is_online_file`` never
  counts them as online experience, which the retention bound deletes.
- References: the dataset's ``ref_max_score`` and ``ref_min_score`` (expert and random), when it has both,
  are kept with the store (``episodes.write_store_references``) and normalize the task's scores in this run
  (``resolve.task_references``).

Export (:func:`plan_export`, then :func:`export_task`) writes a task's store as a new Minari dataset through
Minari's own writer (``minari.create_dataset_from_buffers``, arrow format, images stored losslessly), under a
folder used as Minari's datasets root: ``minari.MinariDataset(<out>/<dataset_id>/data)`` or, with
``MINARI_DATASETS_PATH=<out>``, ``minari.load_dataset(dataset_id)`` reads it. It carries the task's wrapped
observation and action spaces; its env spec is the registered env *without* the project's wrappers (they
cannot be rebuilt from a spec: their names are in the ``mugato_wrappers`` metadata key). The store keeps no
final observation, so each episode's last observation is repeated as its final one, said in the dataset's
description and in its ``final_observation: "repeated_last"`` metadata key. Each episode's metadata holds
its seed, ``mugato_episode_id``, ``mugato_source`` and ``mugato_policy_step``; the task's references, when it
has both, become ``ref_max_score``/``ref_min_score``. Its actions are what the env executed (``Episode.executed``
where the episode has it, else its actions), so that they replay its observations from its seed; the labels the
model learns from are the :data:`LABEL_INFO` info (the last repeated for the final observation), equal to the
actions except in DAgger and DART episodes.

Minari is an optional dependency (``pip install 'mugato-ray[minari]'``), imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from mugato_ray import envs
from mugato_ray.episodes import (
    ONLINE_SOURCES,
    SOURCES,
    Episode,
    EpisodeError,
    env_episode_id,
    read_episodes,
    read_store_references,
    store_dir,
    stored_ids,
    write_episodes,
    write_store_references,
)
from mugato_ray.resolve import ResolvedTask, env_spaces, resolve_task
from mugato_ray.tasks import TASKS, TaskInfo, get_task

if TYPE_CHECKING:
    from mugato_ray.config import Config

DATASETS_PATH_VAR = "MINARI_DATASETS_PATH"
CHUNK_STEPS = 10_000
"""Steps per imported store file at most (an episode is never split): bounds the memory an import holds."""
SEED_RANGE = 2**64
"""Minari's seeds are unsigned 64-bit; the store's seed column is int64."""
SEED_FROM = ("metadata", "index")
LABEL_INFO = "mugato_label"
"""The Minari info key of an exported episode's labels (the store's ``actions``): its Minari actions are what the
env executed (``Episode.executed`` where the episode has it), so that they replay its observations."""


class MinariIOError(ValueError):
    """A dataset, task or store that cannot be imported or exported; the message names it and what was expected."""


def require_minari() -> Any:
    """The ``minari`` module, or MinariIOError saying how to install it."""
    try:
        import minari  # optional dependency: only importing and exporting need it
    except ImportError as e:
        raise MinariIOError(f"Minari is not installed ({e}); install it with: pip install 'mugato-ray[minari]'") from None
    return minari


def datasets_root() -> Path:
    """Minari's local datasets root: ``MINARI_DATASETS_PATH``, else ``~/.minari/datasets`` (not created here)."""
    root = os.environ.get(DATASETS_PATH_VAR)
    return Path(root) if root else Path.home() / ".minari" / "datasets"


def dataset_dir(dataset: str | Path) -> Path:
    """The ``data`` folder (holding ``metadata.json``) of a Minari dataset on local disk, given the dataset's
    folder, its ``data`` folder, or a dataset id under :func:`datasets_root`. Never downloads."""
    given = Path(dataset).expanduser()
    candidates = [given / "data", given]
    if not given.is_absolute():
        candidates.append(datasets_root() / str(dataset) / "data")
    for folder in candidates:
        if (folder / "metadata.json").is_file():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise MinariIOError(f"--dataset {str(dataset)!r}: no Minari dataset (a data/metadata.json) at {tried}; "
                        "only local datasets are read, nothing is downloaded")


def _task_of(dataset: Any, task: str | None, where: str) -> TaskInfo:
    """The named task, else the registered task whose env_id is the dataset's env spec id."""
    if task is not None:
        if task not in TASKS:
            raise MinariIOError(f"--task {task!r}: unknown task; known tasks: {sorted(TASKS)}")
        info = get_task(task)
    else:
        env_id = dataset.env_spec.id if dataset.env_spec is not None else None
        if env_id is None:
            raise MinariIOError(f"{where}: the dataset has no env spec to find its task by; name it with --task")
        matches = sorted(t.name for t in TASKS.values() if t.env_id == env_id)
        if len(matches) != 1:
            found = f"the env of tasks {matches}" if matches else "the env of no registered task"
            raise MinariIOError(f"{where}: the dataset's env id {env_id!r} is {found}; name the task with --task")
        info = get_task(matches[0])
    if not info.has_env:
        raise MinariIOError(f"task {info.name!r} has no environment (dataset {info.dataset!r}); "
                            "Minari datasets hold environment episodes")
    return info


def _check_spaces(dataset: Any, info: TaskInfo, where: str) -> None:
    obs_space, act_space = env_spaces(info)
    for what, theirs, ours in (("observation", dataset.observation_space, obs_space),
                               ("action", dataset.action_space, act_space)):
        if theirs != ours:
            raise MinariIOError(f"{where}: the dataset's {what} space {theirs} differs from task {info.name!r}'s "
                                f"{what} space {ours} (its wrapped env's)")


def _store_seed(seed: Any, where: str) -> int:
    """A Minari seed (unsigned 64-bit) as the store's int64 seed (see the module doc)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_RANGE:
        raise MinariIOError(f"{where}: seed {seed!r} is not an unsigned 64-bit integer")
    seed = int(seed)
    return seed - SEED_RANGE if seed >= SEED_RANGE // 2 else seed


def _minari_seed(seed: int) -> int:
    """The inverse of :func:`_store_seed`."""
    return int(seed) + SEED_RANGE if seed < 0 else int(seed)


# ------------------------------------------------------------------------------------------- import


@dataclass
class ImportPlan:
    """What an import will write, checked before anything is: see :func:`plan_import`."""

    dataset: Any
    """The ``minari.MinariDataset``."""
    path: Path
    """Its data folder."""
    task: ResolvedTask
    folder: Path
    """The task's store folder."""
    ids: dict[int, str]
    """Minari episode index -> the store's episode id, for every episode of the dataset."""
    seeds: dict[int, int]
    sources: dict[int, str]
    policy_steps: dict[int, int | None]
    todo: list[int]
    """Minari episode indices to write (those not stored yet)."""
    seeds_from_index: list[int] = field(default_factory=list)
    """Indices whose seed is their index (the dataset has none for them, or ``seed_from="index"``)."""
    references: tuple[float, float] | None = None
    """The dataset's (ref_max_score, ref_min_score), when it has both."""
    reference_note: str = ""
    """What happens to the dataset's references, for the log."""

    @property
    def where(self) -> str:
        return f"Minari dataset {self.dataset.id!r} ({self.path})"


def plan_import(cfg: Config, dataset: str | Path, *, task: str | None = None, source: str | None = None,
                seed_from: str = "metadata", resume: bool = False) -> ImportPlan:
    """Open a local Minari dataset and check everything an import needs before any file is written: the
    dataset, its task and spaces, the store folder, the episode ids (stored ones refused without ``resume``,
    skipped with it) and the references. Raises MinariIOError naming the path, key or field at fault."""
    minari = require_minari()
    if source is not None and source not in SOURCES:
        raise MinariIOError(f"--source {source!r}: expected one of {SOURCES}")
    if seed_from not in SEED_FROM:
        raise MinariIOError(f"--seed-from {seed_from!r}: expected one of {SEED_FROM}")
    path = dataset_dir(dataset)
    try:
        data = minari.MinariDataset(path)
    except (ValueError, KeyError, OSError, AssertionError) as e:
        raise MinariIOError(f"{path}: not a Minari dataset this Minari can read: {e}") from None
    where = f"Minari dataset {data.id!r} ({path})"
    if data.total_episodes == 0:
        raise MinariIOError(f"{where}: holds no episodes")
    info = _task_of(data, task, where)
    _check_spaces(data, info, where)
    folder = store_dir(cfg, info.name)
    if folder.exists() and not folder.is_dir():
        raise MinariIOError(f"task {info.name!r}: its store {folder} exists and is not a directory")
    try:
        resolved = resolve_task(info, cfg)  # reads the references the store may keep
    except EpisodeError as e:
        raise MinariIOError(str(e)) from None
    plan = ImportPlan(dataset=data, path=path, task=resolved, folder=folder, ids={}, seeds={}, sources={},
                      policy_steps={}, todo=[])
    lengths = _identities(plan, source, seed_from)
    stored = _stored_episodes(plan, lengths, resume)
    plan.todo = [i for i in plan.ids if i not in stored]
    _plan_references(plan)
    return plan


def _identities(plan: ImportPlan, source: str | None, seed_from: str) -> dict[int, int]:
    """Fill the plan's seeds, sources, policy steps and ids from the episodes' metadata; returns their lengths.
    Two episodes with one id are an error naming both."""
    data, name = plan.dataset, plan.task.name
    indices = [int(i) for i in data.episode_indices]
    lengths, owner = {}, {}
    for i, meta in zip(indices, data.storage.get_episode_metadata(indices)):
        seed = meta.get("seed") if seed_from == "metadata" else None
        if seed is None:
            seed = i
            plan.seeds_from_index.append(i)
        plan.seeds[i] = _store_seed(seed, f"{plan.where}: episode {i}")
        stored_source = meta.get("mugato_source")
        plan.sources[i] = source or (stored_source if stored_source in SOURCES else "expert")
        step = meta.get("mugato_policy_step")
        plan.policy_steps[i] = int(step) if isinstance(step, int) and not isinstance(step, bool) else None
        plan.ids[i] = env_episode_id(name, plan.sources[i], plan.seeds[i], plan.policy_steps[i])
        lengths[i] = int(meta.get("total_steps", -1))
        if plan.ids[i] in owner:
            raise MinariIOError(f"{plan.where}: episodes {owner[plan.ids[i]]} and {i} would both be stored as "
                                f"{plan.ids[i]!r} (same source and seed); import with --seed-from index")
        owner[plan.ids[i]] = i
    return lengths


def _stored_episodes(plan: ImportPlan, lengths: dict[int, int], resume: bool) -> set[int]:
    """Indices whose id the store already holds: an error without ``resume`` (as collect), and always an error
    when the stored episode has another length (another episode under the same id)."""
    stored = stored_ids(plan.folder)
    found = {i for i, eid in plan.ids.items() if eid in stored}
    if not found:
        return found
    files = sorted({stored[plan.ids[i]] for i in found})
    stored_length = {}
    for file in files:
        table = pq.read_table(file, columns=["episode_id", "length"])
        stored_length.update(zip(table.column("episode_id").to_pylist(), table.column("length").to_pylist()))
    for i in sorted(found):
        if lengths[i] not in (-1, stored_length[plan.ids[i]]):
            raise MinariIOError(f"{plan.where}: episode {i} ({lengths[i]} steps) and the stored episode "
                                f"{plan.ids[i]!r} ({stored_length[plan.ids[i]]} steps, in {stored[plan.ids[i]]}) "
                                "share an id but differ; import with another --source or into another run_dir")
    if not resume:
        shown = [str(f) for f in files[:3]]
        raise MinariIOError(f"{plan.where}: the store already holds {len(found)} of its {len(plan.ids)} episodes "
                            f"(in {shown}{' ...' if len(files) > 3 else ''}); pass --resume to import only the "
                            "others, or use another run_dir")
    return found


def _plan_references(plan: ImportPlan) -> None:
    """The dataset's references, checked against those the store already keeps (one pair per store)."""
    meta = plan.dataset.storage.metadata
    hi, lo = meta.get("ref_max_score"), meta.get("ref_min_score")
    if hi is None or lo is None:
        have = [k for k, v in (("ref_max_score", hi), ("ref_min_score", lo)) if v is not None]
        plan.reference_note = (f"the dataset has only {have[0]}: no references carried" if have
                               else "the dataset has no reference scores")
        return
    plan.references = (float(hi), float(lo))
    try:
        kept = read_store_references(plan.folder)
    except EpisodeError as e:
        raise MinariIOError(str(e)) from None
    if kept is not None and (kept["expert_return"], kept["random_return"]) != plan.references:
        raise MinariIOError(f"{plan.where}: its ref_max_score {hi} and ref_min_score {lo} differ from the "
                            f"references the store keeps in {plan.folder} (expert {kept['expert_return']}, random "
                            f"{kept['random_return']}, {kept['origin']}); one store has one pair of references")
    yaml_refs = plan.task.references if plan.task.reference_origin == "references.yaml" else None
    plan.reference_note = (f"ref_max_score {hi} and ref_min_score {lo} normalize {plan.task.name!r} in this run"
                           + (f" (in place of references.yaml's expert {yaml_refs[0]}, random {yaml_refs[1]})"
                              if yaml_refs else ""))


@dataclass
class ImportSummary:
    """What an import wrote."""

    task: str
    dataset_id: str
    written: int
    skipped: int
    """Episodes already stored (resume)."""
    files: list[str]
    seeds_from_index: int
    references: tuple[float, float] | None
    reference_note: str


def import_dataset(plan: ImportPlan, *, log: Callable[[str], None] = print) -> ImportSummary:
    """Write the plan's episodes into the task's store (see the module doc), then the dataset's references.
    Each file is written atomically; an import stopped half-way is finished by a re-run with ``resume``."""
    files = []
    for source in sorted({plan.sources[i] for i in plan.todo}):
        todo = [i for i in plan.todo if plan.sources[i] == source]
        for first, last, chunk in _chunks(plan, todo):
            name = _file_name(plan, source, first, last)
            files += [str(p) for p in write_episodes(plan.folder, chunk, name=name, spec=plan.task.spec)]
            log(f"import {plan.task.name}: {len(chunk)} episodes -> {plan.folder / name}")
    if plan.references is not None:
        origin = f"Minari dataset {plan.dataset.id!r} (ref_max_score, ref_min_score)"
        write_store_references(plan.folder, *plan.references, origin)
    if plan.seeds_from_index:
        log(f"import {plan.task.name}: {len(plan.seeds_from_index)} episodes carry no seed in the dataset; "
            "their seed column (and id) is their Minari episode index, not an environment seed")
    log(f"import {plan.task.name}: references: {plan.reference_note}")
    return ImportSummary(task=plan.task.name, dataset_id=plan.dataset.id, written=len(plan.todo),
                         skipped=len(plan.ids) - len(plan.todo), files=files,
                         seeds_from_index=len(plan.seeds_from_index), references=plan.references,
                         reference_note=plan.reference_note)


def _chunks(plan: ImportPlan, indices: Sequence[int]) -> Iterator[tuple[int, int, list[Episode]]]:
    """(first index, last index, episodes) of ``indices`` in runs of at most CHUNK_STEPS steps (at least one
    episode each)."""
    chunk, first, steps = [], None, 0
    for i, data in zip(indices, plan.dataset.iterate_episodes(indices) if indices else []):
        first = i if not chunk else first
        chunk.append(minari_episode(plan, i, data))
        steps += chunk[-1].length
        if steps >= CHUNK_STEPS:
            yield first, i, chunk
            chunk, steps = [], 0
    if chunk:
        yield first, indices[-1], chunk


def _file_name(plan: ImportPlan, source: str, first: int, last: int) -> str:
    prefix = f"minari-{source}" if source in ONLINE_SOURCES else f"{source}-minari"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.dataset.id)
    return f"{prefix}-{slug}-{first}-{last}.parquet"


def _at(obs: Any, t: int) -> Any:
    """Step ``t`` of a Minari episode's observations (a dict of per-key sequences for Dict spaces)."""
    return {k: _at(v, t) for k, v in obs.items()} if isinstance(obs, dict) else obs[t]


def _steps(obs: Any) -> int:
    return _steps(next(iter(obs.values()))) if isinstance(obs, dict) else len(obs)


def minari_episode(plan: ImportPlan, index: int, data: Any) -> Episode:
    """Minari episode ``index`` (an ``EpisodeData``) as the store's Episode (see the module doc)."""
    where, info = f"{plan.where}: episode {index}", plan.task.info
    obs_space, act_space = env_spaces(info)
    steps = len(data.rewards)
    if steps == 0:
        raise MinariIOError(f"{where}: an empty episode (0 steps)")
    if _steps(data.observations) != steps + 1:
        raise MinariIOError(f"{where}: {_steps(data.observations)} observations for {steps} steps; a Minari "
                            "episode holds one more (the observation after its last step)")
    ends = np.asarray(data.terminations, bool) | np.asarray(data.truncations, bool)
    if ends[:-1].any():
        raise MinariIOError(f"{where}: ends at step {int(np.argmax(ends))} before its last step {steps - 1}")
    # The final observation (after the last action) is dropped: the store keeps what each action saw.
    flats = [envs.flatten_observation(_at(data.observations, t), obs_space) for t in range(steps)]
    rewards = np.asarray(data.rewards, dtype=np.float64).astype(np.float32)
    terminated = bool(np.asarray(data.terminations, bool)[-1])
    episode_return = float(np.sum(rewards, dtype=np.float64))
    executed = np.asarray(data.actions, dtype=act_space.dtype)
    labels = _labels(data, executed, where)
    return Episode(task=info.name, episode_id=plan.ids[index], source=plan.sources[index], seed=plan.seeds[index],
                   observations=envs.stack_observations(flats), actions=labels, rewards=rewards,
                   terminated=terminated, success=envs.is_success(info, episode_return, terminated, {}),
                   policy_step=plan.policy_steps[index],
                   executed=None if np.array_equal(labels, executed) else executed)


def _labels(data: Any, executed: np.ndarray, where: str) -> np.ndarray:
    """The episode's labels: its ``LABEL_INFO`` info where it has one (our export's DAgger and DART episodes,
    whose Minari actions are what the env executed), else the actions themselves."""
    infos = getattr(data, "infos", None) or {}
    if LABEL_INFO not in infos:
        return executed
    labels = np.asarray(infos[LABEL_INFO])
    steps = len(executed)
    if labels.shape[0] != steps + 1 or labels.shape[1:] != executed.shape[1:]:
        raise MinariIOError(f"{where}: infos[{LABEL_INFO!r}] has shape {labels.shape}, expected "
                            f"{(steps + 1, *executed.shape[1:])} (one label per observation, as the actions)")
    if labels.dtype.kind not in "biuf" or (labels.dtype.kind == "f" and not np.isfinite(labels).all()):
        raise MinariIOError(f"{where}: infos[{LABEL_INFO!r}] holds {labels.dtype} values, not finite numbers")
    if executed.dtype.kind in "biu" and labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise MinariIOError(f"{where}: infos[{LABEL_INFO!r}] holds fractions; the actions are {executed.dtype}")
    return labels[:steps].astype(executed.dtype)


# ------------------------------------------------------------------------------------------- export


@dataclass
class ExportPlan:
    """What an export will write, checked before anything is: see :func:`plan_export`."""

    task: ResolvedTask
    files: list[Path]
    """The store files holding exported episodes."""
    sources: tuple[str, ...]
    """The sources exported (those asked for that the store holds)."""
    episodes: int
    dataset_id: str
    out: Path
    """Minari's datasets root for the export."""

    @property
    def target(self) -> Path:
        return self.out / self.dataset_id


def default_dataset_id(task: str, sources: Sequence[str]) -> str:
    """``mugato/<task>/<sources>-v0`` (a task's "/" becomes "-": Minari ids are ``namespace/name-vN``)."""
    return f"mugato/{task.replace('/', '-')}/{'-'.join(sources)}-v0"


def plan_export(cfg: Config, task: str, out: str | Path, *, dataset_id: str | None = None,
                sources: Sequence[str] | None = None) -> ExportPlan:
    """Check everything an export needs before anything is written: the task, its store's episodes of
    ``sources`` (default: every source), the dataset id and a new target folder. MinariIOError otherwise."""
    minari = require_minari()
    if task not in TASKS:
        raise MinariIOError(f"--task {task!r}: unknown task; known tasks: {sorted(TASKS)}")
    info = get_task(task)
    if not info.has_env:
        raise MinariIOError(f"--task {task!r}: a dataset task (no environment) cannot be a Minari dataset")
    bad = [s for s in sources or () if s not in SOURCES]
    if bad:
        raise MinariIOError(f"--source {bad}: expected sources among {SOURCES}")
    sources = tuple(sources) if sources else SOURCES
    folder = store_dir(cfg, task)
    files = sorted(f for f in folder.glob("*.parquet") if f.is_file()) if folder.is_dir() else []
    kept = {f: [s for s in pq.read_table(f, columns=["source"]).column("source").to_pylist() if s in sources]
            for f in files}
    if not any(kept.values()):
        raise MinariIOError(f"task {task!r}: its store {folder} holds no episodes of sources {list(sources)}")
    present = tuple(s for s in sources if any(s in kept[f] for f in files))
    dataset_id = dataset_id or default_dataset_id(task, present)
    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except ValueError as e:
        raise MinariIOError(f"--dataset-id {dataset_id!r}: {e}") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MinariIOError(f"--out {out}: exists and is not a directory")
    if (out / dataset_id).exists():
        raise MinariIOError(f"--out {out}: {out / dataset_id} already exists; an export never overwrites a dataset")
    return ExportPlan(task=resolve_task(info, cfg), files=[f for f in files if kept[f]], sources=present,
                      episodes=sum(map(len, kept.values())), dataset_id=dataset_id, out=out)


@contextlib.contextmanager
def _datasets_root_set(root: Path) -> Iterator[None]:
    """``MINARI_DATASETS_PATH=root`` while Minari's writer runs: it places a dataset under that root (read at
    call time) and takes no argument for it. Restored afterwards."""
    old = os.environ.get(DATASETS_PATH_VAR)
    os.environ[DATASETS_PATH_VAR] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DATASETS_PATH_VAR, None)
        else:
            os.environ[DATASETS_PATH_VAR] = old


def _buffer(ep: Episode, obs_space: Any) -> Any:
    """An episode as a Minari ``EpisodeBuffer``: its last observation repeated as the final one (the store has
    none), terminated or truncated at its last step."""
    from minari.data_collector import EpisodeBuffer  # optional dependency (module doc)

    final = {k: v + [v[-1]] if isinstance(v, list) else np.concatenate([v, v[-1:]])
             for k, v in ep.observations.items()}
    ends = np.zeros((2, ep.length), dtype=bool)
    ends[0 if ep.terminated else 1, -1] = True
    executed = np.asarray(ep.actions if ep.executed is None else ep.executed)
    return EpisodeBuffer(seed=_minari_seed(ep.seed), observations=envs.unflatten_observations(final, obs_space),
                         actions=executed, rewards=ep.rewards.astype(np.float64),
                         terminations=ends[0], truncations=ends[1], infos={LABEL_INFO: _label_info(ep)})


def _label_info(ep: Episode) -> Any:
    """The episode's labels as a Minari info (one per observation: the last label repeated for the final one).
    A label per step is a list of ints or floats (Minari's arrow storage cannot read back a 0-d array field);
    a vector per step stays an array."""
    labels = np.asarray(ep.actions)
    labels = np.concatenate([labels, labels[-1:]])
    return labels.tolist() if labels.ndim == 1 else labels


def _description(plan: ExportPlan) -> str:
    info = plan.task.info
    return (f"Episodes of the mugato-ray task {info.name!r} (sources {list(plan.sources)}), exported from its "
            "episode store. The store keeps no observation after an episode's last step: each episode's last "
            "observation is repeated as its final one (metadata final_observation: repeated_last). Observations "
            f"pass through the project's wrappers {list(info.wrappers)}; env_spec is the registered env without them.")


def export_task(plan: ExportPlan, *, log: Callable[[str], None] = print) -> Path:
    """Write the plan's episodes as a new Minari dataset (module doc); returns its folder. A failed export
    removes the folder it started (it did not exist before: ``plan_export`` checked)."""
    minari = require_minari()
    info, (expert, random) = plan.task.info, plan.task.references
    obs_space, act_space = env_spaces(info)
    env = envs.make_env(info)
    spec = dataclasses.replace(env.spec, additional_wrappers=())  # the project's wrappers cannot be rebuilt
    env.close()
    refs = {} if expert is None or random is None else {"ref_max_score": expert, "ref_min_score": random}
    dataset, metadata = None, []
    try:
        with _datasets_root_set(plan.out), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is set to None", category=UserWarning)
            for file in plan.files:
                eps = [ep for ep in read_episodes(file) if ep.source in plan.sources]
                buffers = [_buffer(ep, obs_space) for ep in eps]
                if dataset is None:
                    dataset = minari.create_dataset_from_buffers(
                        plan.dataset_id, buffers, env=spec, observation_space=obs_space, action_space=act_space,
                        algorithm_name=f"mugato-ray {'+'.join(plan.sources)}", author="mugato-ray",
                        description=_description(plan), data_format="arrow", jpeg_encoding=False, **refs)
                else:
                    dataset.update_dataset_from_buffer(buffers)
                metadata += [{"mugato_episode_id": ep.episode_id, "mugato_source": ep.source,
                              "mugato_policy_step": ep.policy_step} for ep in eps]
                log(f"export {info.name}: {len(eps)} episodes from {file.name}")
            dataset.storage.update_episode_metadata(metadata, range(len(metadata)))
            # Minari records its default episode count for references it did not measure: unknown here.
            extra = {"num_episodes_average_score": None, "mugato_reference_origin": plan.task.reference_origin}
            dataset.storage.update_metadata({"final_observation": "repeated_last", "mugato_task": info.name,
                                             "mugato_wrappers": list(info.wrappers), **(extra if refs else {})})
    except BaseException:
        shutil.rmtree(plan.target, ignore_errors=True)
        raise
    log(f"export {info.name}: {len(metadata)} episodes -> {plan.target} (Minari dataset {plan.dataset_id!r}; "
        f"references: {refs or 'none'})")
    return plan.target
