"""Episodes in memory, and the Parquet episode store that holds one row per episode.

An ``Episode`` is L timesteps of one task: observation fields (``key -> (L, *shape)`` array, or a
``list[str]`` of length L for text), actions ``(L, *action_shape)`` (or ``list[str]`` for tasks whose
action is text: text-only and vision-language tasks) and rewards ``(L,)`` float32.
``validate`` rejects anything the tokenizer could not encode faithfully, naming the episode and field.

Store schema (one file per task; ``write_episodes`` refuses to mix tasks in one file)::

    task: string   episode_id: string   source: string (expert|policy|dagger|random)   seed: int64
    return: float64 (sum of rewards)     length: int64 (L)   terminated: bool   success: bool, nullable
    obs.<key>         numeric: large_binary, raw little-endian C-order bytes of the (L, *shape) array
                      text:    list<string> of length L
    obs.<key>.dtype   string: a numpy dtype name ("uint8", "float32", ...) or "str" for text
    obs.<key>.shape   list<int64>: full shape including L (text: [L])
    actions, actions.dtype, actions.shape   as an observation field (text for text/VQA tasks, whose
                                            "action" is the text the model must produce)
    executed, executed.dtype, executed.shape   nullable: the actions the env executed where they differ
                                            from ``actions`` (the labels), as ``actions``; null when the
                                            labels were executed
    rewards: list<float32>

Keys may contain "/" (nested Dicts) but may not end in ".dtype" or ".shape", which would make the
column names ambiguous. Files are written atomically (hidden temporary file, fsync, link into place)
and never overwritten, so a reader never sees a partial file.

Identity: an episode's id is a function of what it is (:func:`env_episode_id`: task, source, seed), never
of how the work was split, and a task's folder holds each id once: :func:`write_episodes` refuses an id
that a file of the folder already holds (:func:`stored_ids`), so a rerun or a resume with another pool
size cannot duplicate episodes. (Two writers racing with the same new id are not caught: the collector
gives every writer disjoint seeds.)

References: a task's folder may also hold ``references.json`` (:data:`REFERENCES_FILE`), the reference returns
that came with imported data (a Minari dataset's ``ref_max_score``/``ref_min_score``); readers of episodes
only ever list ``*.parquet``, so it is never taken for episode data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from mugato_ray.config import Config

log = logging.getLogger(__name__)

SOURCES = ("expert", "policy", "dagger", "random")
ONLINE_SOURCES = ("dagger", "policy")
"""Sources of online experience (mugato_ray.online); their store files are named ``<source>-...``."""


def is_online_file(path: str | Path) -> bool:
    """Whether a store file holds online experience: its name starts with an online source (``dagger-``,
    ``policy-``), as every file a rollout or online actor writes is named after its source."""
    return Path(path).name.split("-", 1)[0] in ONLINE_SOURCES
MODALITIES = ("text", "image", "discrete", "continuous")
_NUMERIC_KINDS = "biuf"  # bool, int, uint, float: what the tokenizer can encode
_SPEC_KINDS = {"image": "u", "discrete": "biu", "continuous": "f"}
_META = (".dtype", ".shape")
STORE_COLUMNS = ("task", "episode_id", "source", "seed", "return", "length", "terminated", "success",
                 "actions", "actions.dtype", "actions.shape", "rewards")
"""Columns every store file has (plus ``obs.<key>``, ``.dtype`` and ``.shape`` per observation field)."""
_FIXED = {
    "task": pa.string(),
    "episode_id": pa.string(),
    "source": pa.string(),
    "seed": pa.int64(),
    "return": pa.float64(),
    "length": pa.int64(),
    "terminated": pa.bool_(),
    "success": pa.bool_(),
}


class EpisodeError(ValueError):
    """A malformed episode or store row. The message reads ``where: episode 'id': field: problem``."""

    def __init__(self, problem: str, *, field: str = "", episode_id: Any = None, where: str = ""):
        self.problem, self.field, self.episode_id, self.where = problem, field, episode_id, where
        who = f"episode {episode_id!r}" if episode_id is not None else ""
        super().__init__(": ".join(p for p in (where, who, field, problem) if p))

    def at(self, where: str) -> EpisodeError:
        """The same error, located (e.g. ``"part-0.parquet row 3"``)."""
        return EpisodeError(self.problem, field=self.field, episode_id=self.episode_id, where=where)


class SkippedRow(NamedTuple):
    """A row (or a whole file, row=None) that ``read_episodes(policy="skip")`` left out, and why."""

    file: str
    row: int | None
    error: str


def _describe(value: Any) -> str:
    """A short description for error messages (never the repr of a large payload)."""
    if isinstance(value, np.ndarray):
        return f"ndarray {value.dtype} {value.shape}"
    if isinstance(value, (bytes, bytearray, memoryview, list, tuple, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:50]}..."


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclass(eq=False)  # arrays make field-wise == ambiguous; compare fields explicitly
class Episode:
    """One episode of L timesteps; see the module docstring for field shapes."""

    task: str
    episode_id: str
    source: str
    seed: int
    observations: dict[str, np.ndarray | list[str]]
    actions: np.ndarray | list[str]
    rewards: np.ndarray
    terminated: bool = False
    success: bool | None = None
    policy_step: int | None = None
    """The optimizer step of the weights that acted (online episodes); None for demonstrations."""
    executed: np.ndarray | None = None
    """The actions the env executed, where another policy acted than the one that labels (DAgger: the learner
    acted, ``actions`` are the expert's labels; DART: the expert's actions perturbed). Same shape and dtype as
    ``actions``. None: ``actions`` were executed. Replaying ``executed`` from the episode's seed visits its
    observations (a Minari export writes them as the dataset's actions); training reads ``actions`` only, as
    inputs and targets: embedding ``executed`` in the history measured worse (bench/README.md, "BabyAI-GoToRedBall:
    DAgger with one-step windows and with 5-step ones")."""

    @property
    def length(self) -> int:
        return len(self.rewards)

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))

    def validate(self, spec: Any = None) -> Episode:
        """Return self, or raise EpisodeError naming this episode and the bad field.

        ``spec`` (optional) has ``observation`` and ``action`` tuples of field specs with ``key``,
        ``modality`` (``.value`` in MODALITIES), per-step ``shape`` and ``dtype``.
        """

        def fail(field: str, problem: str):
            raise EpisodeError(problem, field=field, episode_id=self.episode_id)

        for name in ("task", "episode_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, f"expected a non-empty str, got {_describe(getattr(self, name))}")
        if not isinstance(self.source, str) or self.source not in SOURCES:
            fail("source", f"{_describe(self.source)} is not one of {SOURCES}")
        if not _is_int(self.seed) or not -(2**63) <= int(self.seed) < 2**63:
            fail("seed", f"expected an int64 int, got {_describe(self.seed)}")
        if not isinstance(self.terminated, (bool, np.bool_)):
            fail("terminated", f"expected a bool, got {_describe(self.terminated)}")
        if self.success is not None and not isinstance(self.success, (bool, np.bool_)):
            fail("success", f"expected a bool or None, got {_describe(self.success)}")
        r = self.rewards
        if not isinstance(r, np.ndarray) or r.dtype != np.float32 or r.ndim != 1:
            fail("rewards", f"expected a float32 ndarray of shape (L,), got {_describe(r)}")
        if len(r) == 0:
            fail("rewards", "episode is empty (L == 0)")
        if not isinstance(self.observations, dict):
            fail("observations", f"expected a dict, got {_describe(self.observations)}")
        for key in self.observations:
            if not isinstance(key, str) or not key or key.endswith(_META):
                fail(f"observations[{key!r}]", "keys must be non-empty str not ending in '.dtype' or '.shape'")
        fields = [(f"observations[{k!r}]", v) for k, v in self.observations.items()]
        if self.executed is not None:
            fields.append(("executed", self.executed))
        for field, value in [*fields, ("actions", self.actions), ("rewards", r)]:
            if isinstance(value, list) and field != "rewards":
                if not all(isinstance(s, str) for s in value):
                    fail(field, "a list must be text: list[str] (numeric fields are ndarrays)")
                if len(value) != len(r):
                    fail(field, f"has {len(value)} steps, expected L={len(r)} (len(rewards))")
                continue
            if not isinstance(value, np.ndarray) or value.dtype.kind not in _NUMERIC_KINDS:
                fail(field, f"expected a bool/int/uint/float ndarray or list[str], got {_describe(value)}")
            if value.ndim == 0 or len(value) != len(r):
                fail(field, f"shape {value.shape} does not start with L={len(r)} (len(rewards))")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                step = int(np.argwhere(~np.isfinite(value))[0][0])
                fail(field, f"contains NaN or inf (first at step {step})")
        if self.executed is not None:  # checked as a numeric field above; it must also match the actions
            a, x = self.actions, self.executed
            if not isinstance(a, np.ndarray):
                fail("executed", "only numeric actions can have executed actions (text actions are labels only)")
            if x.dtype != a.dtype or x.shape != a.shape:
                fail("executed", f"expected the actions' dtype and shape ({a.dtype} {a.shape}), got {_describe(x)}")
        if spec is not None:
            self._check_spec(spec, fail)
        return self

    def _check_spec(self, spec: Any, fail) -> None:
        by_key = {f.key: f for f in spec.observation}
        unknown, missing = set(self.observations) - set(by_key), set(by_key) - set(self.observations)
        if unknown or missing:
            fail(
                "observations",
                f"keys {sorted(self.observations)} do not match the spec: "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}",
            )
        if len(spec.action) != 1:
            fail("actions", f"the spec has {len(spec.action)} action fields; an Episode holds one array")
        pairs = [(f"observations[{k!r}]", self.observations[k], f) for k, f in by_key.items()]
        for field, value, fs in [*pairs, ("actions", self.actions, spec.action[0])]:
            modality = getattr(fs.modality, "value", fs.modality)
            if modality not in MODALITIES:
                fail(field, f"spec field {fs.key!r} has unknown modality {modality!r}, expected one of {MODALITIES}")
            if modality == "text":
                if not isinstance(value, list):
                    fail(field, f"modality text expects list[str], got {_describe(value)}")
                continue
            if (
                not isinstance(value, np.ndarray)
                or value.dtype.kind not in _SPEC_KINDS[modality]
                or (modality == "image" and value.dtype != np.uint8)
            ):
                want = "uint8" if modality == "image" else f"dtype kind in {_SPEC_KINDS[modality]!r}"
                fail(field, f"modality {modality} expects {want}, got {_describe(value)}")
            if value.shape[1:] != tuple(fs.shape):
                fail(field, f"per-step shape {value.shape[1:]} != spec shape {tuple(fs.shape)}")


# ---------------------------------------------------------------------------------------- rows


def _encode(col: str, value: np.ndarray | list[str]) -> dict[str, Any]:
    if isinstance(value, list):
        return {col: list(value), f"{col}.dtype": "str", f"{col}.shape": [len(value)]}
    arr = np.ascontiguousarray(value)
    # Stored little-endian whatever the writer's byte order, so files are portable.
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return {col: data, f"{col}.dtype": arr.dtype.name, f"{col}.shape": list(arr.shape)}


def episode_to_row(ep: Episode) -> dict[str, Any]:
    """The store's column dict for a valid episode (see the module docstring)."""
    row = {
        "task": ep.task,
        "episode_id": ep.episode_id,
        "source": ep.source,
        "seed": int(ep.seed),
        "return": ep.episode_return,
        "length": ep.length,
        "terminated": bool(ep.terminated),
        "success": None if ep.success is None else bool(ep.success),
        "policy_step": None if ep.policy_step is None else int(ep.policy_step),
    }
    for key in sorted(ep.observations):
        row.update(_encode(f"obs.{key}", ep.observations[key]))
    row.update(_encode("actions", ep.actions))
    if ep.executed is None:
        row.update({"executed": None, "executed.dtype": None, "executed.shape": None})
    else:
        row.update(_encode("executed", ep.executed))
    row["rewards"] = ep.rewards.tolist()
    return row


def _decode(col: str, row: dict, fail) -> np.ndarray | list[str]:
    value, dtype, shape = row[col], row.get(f"{col}.dtype"), row.get(f"{col}.shape")
    if not isinstance(dtype, str):
        fail(f"{col}.dtype", f"expected a dtype name, got {_describe(dtype)}")
    if isinstance(shape, np.ndarray):
        shape = shape.tolist() if shape.ndim == 1 else None
    if not isinstance(shape, (list, tuple)) or not all(_is_int(d) and d >= 0 for d in shape):
        fail(f"{col}.shape", f"expected a list of non-negative ints, got {_describe(shape)}")
    shape = tuple(int(d) for d in shape)
    if dtype == "str":
        texts = value.tolist() if isinstance(value, np.ndarray) else value
        if not isinstance(texts, (list, tuple)) or not all(isinstance(s, str) for s in texts):
            fail(col, f"expected a list of str, got {_describe(value)}")
        if shape != (len(texts),):
            fail(f"{col}.shape", f"{list(shape)} != [{len(texts)}] (the number of texts)")
        return [str(s) for s in texts]  # np.str_ -> str
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):  # numpy parses "a,b" as a record spec: "," is a SyntaxError
        dt = np.dtype(object)  # rejected just below
    if dt.kind not in _NUMERIC_KINDS:
        fail(f"{col}.dtype", f"{dtype!r} is not a bool/int/uint/float dtype name")
    nbytes = math.prod(shape) * dt.itemsize
    if isinstance(value, np.bytes_):  # numpy strips trailing NUL bytes from bytes_ scalars
        value = bytes(value).ljust(nbytes, b"\0")
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != nbytes:
        fail(col, f"expected {nbytes} bytes for shape {list(shape)} {dtype}, got {_describe(value)}")
    arr = np.frombuffer(value, dtype=dt.newbyteorder("<")).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=False)  # read-only view when no swap is needed


def _row_to_episode(row: Any) -> Episode:
    if not isinstance(row, dict):
        raise EpisodeError(f"expected a dict row, got {_describe(row)}")
    eid = row.get("episode_id")

    def fail(field: str, problem: str):
        raise EpisodeError(problem, field=field, episode_id=eid if isinstance(eid, str) else None)

    missing = [c for c in (*_FIXED, "actions", "rewards") if c not in row]
    if missing:
        fail("columns", f"missing {missing}")
    for col in ("task", "episode_id", "source"):
        if not isinstance(row[col], str):
            fail(col, f"expected a str, got {_describe(row[col])}")
    for col in ("seed", "length"):
        if not _is_int(row[col]):
            fail(col, f"expected an int, got {_describe(row[col])}")
    for col in ("terminated", "success"):
        if not isinstance(row[col], (bool, np.bool_)) and not (col == "success" and row[col] is None):
            fail(col, f"expected a bool, got {_describe(row[col])}")
    if not isinstance(row["return"], (float, np.floating)):
        fail("return", f"expected a float, got {_describe(row['return'])}")
    cols = [c for c in row if isinstance(c, str) and c.startswith("obs.")]
    bases = {c for c in cols if not c.endswith(_META)}
    for c in cols:
        if c.endswith(_META) and c[:-6] not in bases:
            fail(c, f"metadata column without its data column {c[:-6]!r}")
    observations = {}
    for col in sorted(bases):
        if all(row.get(c) is None for c in (col, f"{col}.dtype", f"{col}.shape")):
            continue  # a field of another task, null-filled where Ray Data unified file schemas
        observations[col[4:]] = _decode(col, row, fail)
    actions = _decode("actions", row, fail)
    # Absent in files written before the column existed; null where the labels were executed.
    # (A numpy batch may hold b"" for a null binary: the dtype column is what tells.)
    executed = None if row.get("executed.dtype") is None else _decode("executed", row, fail)
    try:
        rewards = np.asarray(row["rewards"])
    except (TypeError, ValueError, OverflowError) as e:
        fail("rewards", f"not a list of floats: {e}")
    if rewards.ndim != 1 or rewards.dtype.kind not in "iuf":
        fail("rewards", f"expected a list of floats, got {_describe(row['rewards'])}")
    ep = Episode(
        task=str(row["task"]),
        episode_id=str(eid),
        source=str(row["source"]),
        seed=int(row["seed"]),
        observations=observations,
        actions=actions,
        rewards=_as_float32(rewards),
        terminated=bool(row["terminated"]),
        success=None if row["success"] is None else bool(row["success"]),
        policy_step=_optional_int(row.get("policy_step"), fail),
        executed=executed,
    ).validate()
    if int(row["length"]) != ep.length:
        fail("length", f"{row['length']} != {ep.length} (len(rewards))")
    if not np.isclose(float(row["return"]), ep.episode_return, rtol=1e-6, atol=1e-6):
        fail("return", f"{row['return']} != {ep.episode_return} (sum of rewards)")
    return ep


def _optional_int(value: Any, fail) -> int | None:
    """An optional int column (absent in files written before it existed): None, or an int."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not _is_int(value):
        fail("policy_step", f"expected an int or null, got {_describe(value)}")
    return int(value)


def _as_float32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # out-of-range values become inf, which validate reports
        return x.astype(np.float32)


def episode_from_row(row: dict, *, where: str = "") -> Episode:
    """Inverse of ``episode_to_row``; also accepts Ray Data numpy-batch rows. Raises only EpisodeError."""
    try:
        return _row_to_episode(row)
    except EpisodeError as e:
        if where:
            raise e.at(where) from None
        raise


def episodes_from_batch(batch: dict[str, np.ndarray]) -> list[Episode]:
    """Episodes from a Ray Data numpy batch (column -> array with one entry per row)."""
    lengths = {col: len(v) for col, v in batch.items()}
    if len(set(lengths.values())) > 1:
        raise EpisodeError(f"batch columns have different lengths: {lengths}")
    n = next(iter(lengths.values()), 0)
    return [episode_from_row({c: v[i] for c, v in batch.items()}, where=f"batch row {i}") for i in range(n)]


# --------------------------------------------------------------------------------------- store


def _schema(row: dict) -> pa.Schema:
    types = dict(_FIXED) | {"policy_step": pa.int64(), "executed": pa.large_binary(), "executed.dtype": pa.string(),
                            "executed.shape": pa.list_(pa.int64())}
    for col, value in row.items():
        if col.endswith(".dtype") and col != "executed.dtype":
            base = col[:-6]
            types[base] = pa.list_(pa.string()) if value == "str" else pa.large_binary()
            types[col], types[f"{base}.shape"] = pa.string(), pa.list_(pa.int64())
    types["rewards"] = pa.list_(pa.float32())
    return pa.schema(list(types.items()))


def env_episode_id(task: str, source: str, seed: int, policy_step: int | None = None) -> str:
    """The id of the episode that ``source`` produced in ``task``'s env reset with ``seed`` (online episodes:
    with the weights of optimizer step ``policy_step``): what it is, never how the work was split."""
    if policy_step is None:
        return f"{task}-{source}-{int(seed)}"
    return f"{task}-{source}-w{int(policy_step)}-{int(seed)}"


def store_dir(cfg: Config, task: str) -> Path:
    """Where a task's episodes live: ``<run_dir>/data/<task>/`` (``data.store_root``/<task> when set)."""
    return cfg.store_root() / task


def stored_ids(directory: str | Path) -> dict[str, Path]:
    """``episode_id -> file`` for every episode of the non-hidden ``*.parquet`` files of ``directory``
    (sorted; an id stored twice maps to its first file). Reads the id column only; an unreadable file
    raises EpisodeError naming it."""
    out: dict[str, Path] = {}
    for file in _parquet_files(directory) if Path(directory).is_dir() else []:
        try:
            ids = pq.read_table(file, columns=["episode_id"]).column("episode_id").to_pylist()
        except (pa.ArrowException, OSError, KeyError) as e:
            raise EpisodeError(f"cannot read the episode ids: {e}", where=str(file)) from None
        for i in ids:
            out.setdefault(i, file)
    return out


REFERENCES_FILE = "references.json"
"""Reference returns kept with a task's store (see :func:`read_store_references`)."""


def read_store_references(directory: str | Path) -> dict | None:
    """``{"expert_return", "random_return", "origin"}`` from the task folder's :data:`REFERENCES_FILE`, or None
    when it has none. They came with imported data and, for a run whose store holds them, take the place of
    references.yaml (``resolve.resolve_task``). A malformed file raises EpisodeError naming it and the field."""
    path = Path(directory) / REFERENCES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EpisodeError(f"unreadable reference returns: {e}", where=str(path)) from None
    if not isinstance(data, dict):
        raise EpisodeError(f"expected a JSON object, got {_describe(data)}", where=str(path))
    for key in ("expert_return", "random_return"):
        value = data.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise EpisodeError(f"expected a finite number, got {_describe(value)}", field=key, where=str(path))
    if not isinstance(data.get("origin"), str):
        raise EpisodeError(f"expected a str, got {_describe(data.get('origin'))}", field="origin", where=str(path))
    return {"expert_return": float(data["expert_return"]), "random_return": float(data["random_return"]),
            "origin": data["origin"]}


def write_store_references(directory: str | Path, expert_return: float, random_return: float, origin: str) -> Path:
    """Keep ``(expert_return, random_return)`` with the task's store, atomically. The file is never replaced:
    the same values again are a no-op (a re-run), other values raise EpisodeError naming both."""
    directory = Path(directory)
    path = directory / REFERENCES_FILE
    new = {"expert_return": float(expert_return), "random_return": float(random_return), "origin": origin}
    old = read_store_references(directory)
    if old is not None:
        if (old["expert_return"], old["random_return"]) != (new["expert_return"], new["random_return"]):
            raise EpisodeError(f"holds expert {old['expert_return']}, random {old['random_return']} ({old['origin']}); "
                               f"{origin} has expert {new['expert_return']}, random {new['random_return']}: "
                               "one store has one pair of references", field="references", where=str(path))
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{REFERENCES_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(json.dumps(new, indent=2) + "\n")
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists; the episode store never overwrites a file")


def _publish(tmp: Path, path: Path) -> None:
    """Give a complete temporary file its name ``path``: atomic and, unlike os.replace, never clobbering a file
    that appeared meanwhile (FileExistsError naming it)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            raise _exists(path) from None
        os.replace(tmp, path)


def write_episodes(directory, episodes, *, name: str | None = None, spec: Any = None,
                   stored: Mapping[str, Path] | None = None) -> list[Path]:
    """Validate all episodes of ONE task, then write them atomically to one new Parquet file.

    Nothing is written if any episode is bad, or if a file of ``directory`` already holds one of their
    ids (EpisodeError naming the id and that file). ``stored``: the folder's :func:`stored_ids` when the
    caller has just read them (read here otherwise). Raises FileExistsError rather than overwrite a file.
    """
    episodes = list(episodes)
    if not episodes:
        return []
    table = _checked_table(episodes, spec, directory, stored)
    name = name or f"part-{uuid.uuid4().hex}.parquet"
    if "/" in name or name.startswith(".") or not name.endswith(".parquet"):
        raise ValueError(f"file name {name!r} must be a plain, non-hidden '*.parquet' name")
    return [_write_table_atomically(table, Path(directory), name)]


def _checked_table(episodes: list[Episode], spec: Any, directory, stored: Mapping[str, Path] | None) -> pa.Table:
    """The Arrow table of ``episodes`` once each is valid, they share one task and one schema, and none
    of their ids repeats or is already stored in ``directory`` (EpisodeError otherwise)."""
    for ep in episodes:
        ep.validate(spec)
    tasks = sorted({ep.task for ep in episodes})
    if len(tasks) > 1:
        raise EpisodeError(f"one file holds one task, got {tasks}; call write_episodes once per task", field="task")
    ids = [ep.episode_id for ep in episodes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EpisodeError("appears more than once in one write", field="episode_id", episode_id=dup)
    stored = stored_ids(directory) if stored is None else stored
    for i in ids:
        if i in stored:
            raise EpisodeError(f"is already stored in {stored[i]}; an episode is written once (resume skips "
                               "stored ids)", field="episode_id", episode_id=i)
    rows = [episode_to_row(ep) for ep in episodes]
    schema = _schema(rows[0])
    for ep, row in zip(episodes, rows):
        if _schema(row) != schema:
            raise EpisodeError(
                f"columns {sorted(row)} differ from episode {ids[0]!r}'s {sorted(rows[0])} "
                "(same fields and text/numeric kinds expected within a task)",
                field="observations",
                episode_id=ep.episode_id,
            )
    return pa.Table.from_pylist(rows, schema=schema)


def _write_table_atomically(table: pa.Table, directory: Path, name: str) -> Path:
    """Write ``table`` to ``directory/name`` through a hidden temporary file and a hard link, so a reader
    never sees a partial file and an existing file is never replaced (FileExistsError); fsync the file
    and the directory entry."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if path.exists():
        raise _exists(path)
    tmp = directory / f".{name}.{uuid.uuid4().hex}.tmp"  # leading dot: readers and globs skip it
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the new directory entry durable
    finally:
        os.close(fd)
    return path


def _parquet_files(src) -> list[Path]:
    roots = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(p) for p in src]
    files = []
    for root in roots:
        if root.is_dir():
            found = (f for f in root.rglob("*.parquet") if f.is_file())
            files += sorted(f for f in found if not any(p.startswith(".") for p in f.relative_to(root).parts))
        elif root.is_file():
            files.append(root)
        else:
            raise FileNotFoundError(f"episode store path {root} does not exist")
    return files


def read_episodes(src, *, policy: str = "strict", skipped: list[SkippedRow] | None = None) -> list[Episode]:
    """Read episodes from a directory (every non-hidden *.parquet, recursively, sorted), a file, or files.

    policy="strict" raises EpisodeError at the first bad row or unreadable file, naming file, row and
    field; policy="skip" logs each one, appends it to ``skipped`` and warns with the total.
    """
    if policy not in ("strict", "skip"):
        raise ValueError(f"policy must be 'strict' or 'skip', got {policy!r}")
    skipped = [] if skipped is None else skipped
    before, episodes = len(skipped), []

    def bad(err: EpisodeError, file: Path, row: int | None) -> None:
        if policy == "strict":
            raise err
        log.warning("skipping bad episode data: %s", err)
        skipped.append(SkippedRow(str(file), row, str(err)))

    for file in _parquet_files(src):
        try:
            rows = pq.ParquetFile(file).read().to_pylist()
        except (pa.ArrowException, OSError) as e:
            bad(EpisodeError(f"unreadable Parquet file: {e}", where=str(file)), file, None)
            continue
        for i, row in enumerate(rows):
            try:
                episodes.append(episode_from_row(row, where=f"{file} row {i}"))
            except EpisodeError as e:
                bad(e, file, i)
    if len(skipped) > before:
        log.warning(
            "read_episodes(%s): skipped %d bad rows/files, kept %d episodes", src, len(skipped) - before, len(episodes)
        )
    return episodes
