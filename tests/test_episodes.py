"""Episodes and the Parquet episode store: round-trips, atomic writes, validation, bad-row handling."""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mugato_ray import episodes as E
from mugato_ray.episodes import (
    Episode,
    EpisodeError,
    SkippedRow,
    episode_from_row,
    episode_to_row,
    episodes_from_batch,
    read_episodes,
    write_episodes,
)
from mugato_ray.specs import space_spec


# A stand-in for the tokenizer's SpaceSpec/FieldSpec: validate only relies on these attributes.
class Modality(enum.Enum):
    TEXT = "text"
    IMAGE = "image"
    DISCRETE = "discrete"
    CONTINUOUS = "continuous"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    key: str
    modality: Modality
    shape: tuple
    dtype: str


@dataclasses.dataclass(frozen=True)
class SpaceSpec:
    observation: tuple
    action: tuple


def make_episode(i=0, *, L=4, task="grid", continuous_actions=False, success=None, seed=None) -> Episode:
    """An episode with every modality; the image's last pixels are zero (trailing NUL bytes)."""
    rng = np.random.default_rng(i)
    image_LxHxWx3 = rng.integers(0, 256, (L, 8, 8, 3), dtype=np.uint8)
    image_LxHxWx3[:, -1, -1] = 0
    actions = rng.uniform(-1, 1, (L, 2)).astype(np.float32) if continuous_actions else rng.integers(0, 7, L)
    return Episode(
        task=task,
        episode_id=f"{task}-{i}",
        source="expert",
        seed=seed if seed is not None else i,
        observations={
            "image": image_LxHxWx3,
            "mission": [f"gehe zur Tür {t} — ключ ✓" for t in range(L)],
            "direction": rng.integers(0, 4, L).astype(np.int64),
            "nested/pos": rng.normal(size=(L, 3)).astype(np.float32),
            "flags": rng.integers(0, 2, (L, 2)).astype(bool),
        },
        actions=actions,
        rewards=rng.normal(size=L).astype(np.float32),
        terminated=bool(i % 2),
        success=success,
    )


def make_spec(continuous_actions=False) -> SpaceSpec:
    action = (
        FieldSpec("action", Modality.CONTINUOUS, (2,), "float32")
        if continuous_actions
        else FieldSpec("action", Modality.DISCRETE, (), "int64")
    )
    return SpaceSpec(
        observation=(
            FieldSpec("direction", Modality.DISCRETE, (), "int64"),
            FieldSpec("flags", Modality.DISCRETE, (2,), "bool"),
            FieldSpec("image", Modality.IMAGE, (8, 8, 3), "uint8"),
            FieldSpec("mission", Modality.TEXT, (), "str"),
            FieldSpec("nested/pos", Modality.CONTINUOUS, (3,), "float32"),
        ),
        action=(action,),
    )


def assert_same(a: Episode, b: Episode) -> None:
    for name in ("task", "episode_id", "source", "seed", "terminated", "success", "length", "episode_return"):
        assert getattr(a, name) == getattr(b, name), name
    assert type(b.success) is type(a.success) and type(b.terminated) is bool
    assert sorted(a.observations) == sorted(b.observations)
    pairs = [(a.observations[k], b.observations[k]) for k in a.observations]
    for x, y in [*pairs, (a.actions, b.actions), (a.rewards, b.rewards)]:
        if isinstance(x, list):
            assert type(y) is list and x == y and all(type(s) is str for s in y)
        else:
            assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(x, y)


# ------------------------------------------------------------------------------ round-trip


def test_round_trip_all_modalities(tmp_path):
    grid = [make_episode(i, success=[None, True, False][i]) for i in range(3)]
    arm = [make_episode(i, task="arm", L=2 + i, continuous_actions=True) for i in range(2)]
    assert write_episodes(tmp_path / "grid", grid, name="a.parquet", spec=make_spec()) == [tmp_path / "grid/a.parquet"]
    write_episodes(tmp_path / "arm", arm, spec=make_spec(continuous_actions=True))
    back = {ep.episode_id: ep for ep in read_episodes(tmp_path)}
    assert sorted(back) == sorted(ep.episode_id for ep in grid + arm)
    for ep in grid + arm:
        assert_same(ep, back[ep.episode_id])
        assert back[ep.episode_id].validate(make_spec(ep.task == "arm")) is back[ep.episode_id]


def test_text_actions_round_trip(tmp_path):
    """Text-only and vision-language tasks: the action is the text the model must produce."""
    text = Episode("text-arith", "t0", "expert", 0, {}, ["12+7=19\nhéllo"], np.zeros(1, np.float32))
    vqa = Episode(
        "vqa",
        "v0",
        "expert",
        1,
        {"image": np.zeros((1, 8, 8, 3), np.uint8), "question": ["what color is the ball?"]},
        ["red"],
        np.ones(1, np.float32),
        success=True,
    )
    for ep in (text, vqa):
        (back,) = read_episodes(write_episodes(tmp_path / ep.task, [ep]))
        assert back.actions == ep.actions and isinstance(back.actions, list)
        assert_same(back, ep)


def test_executed_actions_round_trip_beside_episodes_without_them(tmp_path):
    """DAgger and DART episodes keep what the env executed beside the labels; other episodes read back None."""
    labelled = [make_episode(i, continuous_actions=c) for i, c in ((0, False), (1, True))]
    plain = make_episode(2)
    labelled[0].executed = (labelled[0].actions + 1) % 7
    labelled[1].executed = -labelled[1].actions
    for ep in labelled:
        write_episodes(tmp_path / str(ep.seed), [ep])
    write_episodes(tmp_path / "mixed", [dataclasses.replace(labelled[0], episode_id="m0"), plain])
    back = {ep.episode_id: ep for ep in read_episodes(tmp_path)}
    for ep in labelled:
        x = back[ep.episode_id].executed
        assert x.dtype == ep.executed.dtype and np.array_equal(x, ep.executed)
        assert np.array_equal(back[ep.episode_id].actions, ep.actions)  # the labels stay the labels
    assert np.array_equal(back["m0"].executed, labelled[0].executed) and back[plain.episode_id].executed is None


def test_executed_actions_must_match_the_actions():
    ep = make_episode(0)
    for bad in (ep.actions[:-1], ep.actions.astype(np.float32), list(ep.actions)):
        with pytest.raises(EpisodeError, match="executed"):
            dataclasses.replace(ep, executed=bad).validate()
    arm = make_episode(1, continuous_actions=True)
    nan = arm.actions.copy()
    nan[2, 0] = np.nan
    with pytest.raises(EpisodeError, match="executed: contains NaN or inf .first at step 2"):
        dataclasses.replace(arm, executed=nan).validate()
    text = Episode("text-arith", "t0", "expert", 0, {}, ["1+1=2"], np.zeros(1, np.float32), executed=np.zeros(1))
    with pytest.raises(EpisodeError, match="executed: only numeric actions"):
        text.validate()


def test_store_columns_match_documented_schema(tmp_path):
    ep = make_episode(0)
    (path,) = write_episodes(tmp_path, [ep])
    table = pq.read_table(path)
    assert table.schema.field("obs.image").type in (pa.binary(), pa.large_binary())
    assert table.schema.field("obs.mission").type == pa.list_(pa.string())
    assert table.schema.field("rewards").type == pa.list_(pa.float32())
    row = table.to_pylist()[0]
    assert row["obs.image.shape"] == [4, 8, 8, 3] and row["obs.image.dtype"] == "uint8"
    assert len(row["obs.image"]) == 4 * 8 * 8 * 3
    assert row["obs.mission.dtype"] == "str" and row["obs.mission.shape"] == [4]
    assert row["actions.dtype"] == "int64" and row["length"] == 4
    assert row["return"] == pytest.approx(float(ep.rewards.astype(np.float64).sum()))


def test_big_endian_and_non_contiguous_arrays_read_back_as_equal_native_values(tmp_path):
    ep = make_episode(0)
    pos = ep.observations["nested/pos"]
    ep.observations["nested/pos"] = pos.astype(">f4")
    ep.observations["direction"] = np.stack([ep.observations["direction"]] * 2, axis=1)[:, 0]
    (back,) = read_episodes(write_episodes(tmp_path, [ep]))
    assert back.observations["nested/pos"].dtype == np.dtype("float32")
    assert np.array_equal(back.observations["nested/pos"], pos)
    assert np.array_equal(back.observations["direction"], ep.observations["direction"])


# ----------------------------------------------------------------------------- atomic writes


def test_write_leaves_only_the_final_file(tmp_path):
    write_episodes(tmp_path / "new/dir", [make_episode(0), make_episode(1)], name="x.parquet")
    assert [p.name for p in (tmp_path / "new/dir").iterdir()] == ["x.parquet"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def half_then_crash(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_episodes(tmp_path, [make_episode(0)])
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_never_overwritten(tmp_path):
    (path,) = write_episodes(tmp_path, [make_episode(0)], name="a.parquet")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="a.parquet"):
        write_episodes(tmp_path, [make_episode(1)], name="a.parquet")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


def test_a_file_that_appears_during_the_write_is_not_clobbered(tmp_path, monkeypatch):
    real_write = pq.write_table

    def racing_write(table, where, **kwargs):
        real_write(table, where, **kwargs)
        (tmp_path / "a.parquet").write_bytes(b"another writer's file")

    monkeypatch.setattr(pq, "write_table", racing_write)
    with pytest.raises(FileExistsError, match="a.parquet"):
        write_episodes(tmp_path, [make_episode(0)], name="a.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == b"another writer's file"
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


def test_write_falls_back_to_rename_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "hard links not supported")

    monkeypatch.setattr(E.os, "link", no_links)
    (path,) = write_episodes(tmp_path, [make_episode(0)], name="a.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]
    assert_same(make_episode(0), read_episodes(path)[0])


def test_one_bad_episode_means_nothing_is_written(tmp_path):
    bad = make_episode(1)
    bad.rewards[2] = np.nan
    with pytest.raises(EpisodeError, match=r"grid-1.*rewards.*NaN"):
        write_episodes(tmp_path / "d", [make_episode(0), bad])
    assert not (tmp_path / "d").exists()


def test_store_refuses_an_id_it_already_holds(tmp_path):
    (first,) = write_episodes(tmp_path, [make_episode(0), make_episode(1)], name="a.parquet")
    with pytest.raises(EpisodeError, match=r"grid-1.*already stored in .*a\.parquet"):
        write_episodes(tmp_path, [make_episode(2), make_episode(1)], name="b.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]  # nothing of the refused write is left
    assert E.stored_ids(tmp_path) == {"grid-0": first, "grid-1": first}
    write_episodes(tmp_path, [make_episode(2)], name="b.parquet")
    assert sorted(E.stored_ids(tmp_path)) == ["grid-0", "grid-1", "grid-2"]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(EpisodeError, match="bad.parquet"):
        E.stored_ids(tmp_path)


def test_write_rejects_mixed_tasks_and_duplicate_ids(tmp_path):
    with pytest.raises(EpisodeError, match=r"arm.*grid|grid.*arm"):
        write_episodes(tmp_path, [make_episode(0), make_episode(1, task="arm")])
    with pytest.raises(EpisodeError, match="grid-0"):
        write_episodes(tmp_path, [make_episode(0), make_episode(0)])
    other_fields = make_episode(1)
    del other_fields.observations["flags"]
    with pytest.raises(EpisodeError, match="grid-1"):
        write_episodes(tmp_path, [make_episode(0), other_fields])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- validation (hypothesis)


def _set_obs(key, value):
    def mutate(ep):
        ep.observations[key] = value(ep) if callable(value) else value

    return mutate


def _non_finite(field, bad):
    def mutate(ep):
        if field == "actions":
            ep.actions = np.zeros((ep.length, 2), np.float32)
        arr = {"rewards": ep.rewards, "actions": ep.actions}.get(field, ep.observations.get(field))
        arr.reshape(-1)[len(arr.reshape(-1)) // 2] = bad

    return mutate


def _spec_with(key, **changes):
    spec = make_spec()
    obs = tuple(dataclasses.replace(f, **changes) if f.key == key else f for f in spec.observation)
    return dataclasses.replace(spec, observation=obs)


BAD_VALUES = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=5))

# Each mutation: (name, strategy of (mutate(ep) or None, spec or None, field named in the message)).
MUTATIONS = {
    "non-finite obs": st.sampled_from([np.nan, np.inf, -np.inf]).map(
        lambda b: (_non_finite("nested/pos", b), None, "nested/pos")
    ),
    "non-finite action": st.sampled_from([np.nan, np.inf]).map(lambda b: (_non_finite("actions", b), None, "actions")),
    "non-finite reward": st.sampled_from([np.nan, -np.inf]).map(lambda b: (_non_finite("rewards", b), None, "rewards")),
    "short obs": st.sampled_from(["image", "mission", "direction", "flags"]).map(
        lambda k: (_set_obs(k, lambda ep, k=k: ep.observations[k][:-1]), None, k)
    ),
    "long actions": st.just((lambda ep: setattr(ep, "actions", np.zeros(9, np.int64)), None, "actions")),
    "empty": st.just((lambda ep: setattr(ep, "rewards", ep.rewards[:0]), None, "empty")),
    "object obs": st.just((_set_obs("direction", np.array([1, "a", None, 2.0], dtype=object)), None, "direction")),
    "complex obs": st.just((_set_obs("direction", np.ones(4, np.complex64)), None, "direction")),
    "str array obs": st.just((_set_obs("direction", np.array(list("abcd"))), None, "direction")),
    "non-str text": BAD_VALUES.filter(lambda v: not isinstance(v, str)).map(
        lambda v: (_set_obs("mission", ["a", v, "b", "c"]), None, "mission")
    ),
    "0-d actions": st.just((lambda ep: setattr(ep, "actions", np.int64(3)), None, "actions")),
    "text actions of the wrong length": st.just((lambda ep: setattr(ep, "actions", ["a"] * 3), None, "actions")),
    "non-str text actions": st.just((lambda ep: setattr(ep, "actions", ["a", 1, "b", "c"]), None, "actions")),
    "float64 rewards": st.just((lambda ep: setattr(ep, "rewards", ep.rewards.astype(np.float64)), None, "rewards")),
    "bad source": st.one_of(BAD_VALUES, st.text())
    .filter(lambda v: v not in E.SOURCES)
    .map(lambda v: (lambda ep: setattr(ep, "source", v), None, "source")),
    "bad task": st.sampled_from(["", None, 3, b"grid"]).map(
        lambda v: (lambda ep: setattr(ep, "task", v), None, "task")
    ),
    "bad seed": st.one_of(st.floats(), st.text(), st.booleans(), st.integers(min_value=2**63)).map(
        lambda v: (lambda ep: setattr(ep, "seed", v), None, "seed")
    ),
    "bad flags": st.sampled_from(["terminated", "success"]).map(lambda f: (lambda ep: setattr(ep, f, "yes"), None, f)),
    "bad key": st.sampled_from(["", "x.dtype", "y.shape", 3]).map(
        lambda k: (_set_obs(k, np.zeros(4)), None, "observations")
    ),
    "spec shape": st.just((None, _spec_with("nested/pos", shape=(4,)), "nested/pos")),
    "spec image dtype": st.sampled_from([np.float32, np.uint16, np.int64]).map(
        lambda dt: (_set_obs("image", lambda ep: ep.observations["image"].astype(dt)), make_spec(), "image")
    ),
    "spec continuous dtype": st.just((_set_obs("nested/pos", np.zeros((4, 3), np.int64)), make_spec(), "nested/pos")),
    "spec discrete dtype": st.just((_set_obs("direction", np.zeros(4, np.float32)), make_spec(), "direction")),
    "spec text dtype": st.just((_set_obs("mission", np.zeros(4, np.int64)), make_spec(), "mission")),
    "spec unknown key": st.just((_set_obs("extra", np.zeros(4)), make_spec(), "extra")),
    "spec missing key": st.just((lambda ep: ep.observations.pop("flags"), make_spec(), "flags")),
    "spec unknown modality": st.sampled_from(["audio", "Image", None]).map(
        lambda m: (None, _spec_with("flags", modality=m), "flags")
    ),
    "spec action": st.just((None, dataclasses.replace(make_spec(), action=make_spec(True).action), "actions")),
}


def test_valid_episode_passes_validation_with_and_without_spec():
    ep = make_episode(0)
    assert ep.validate() is ep and ep.validate(make_spec()) is ep


def test_validate_against_the_tokenizers_space_spec():
    """The duck-typed spec above mirrors the real one: a gymnasium-derived spec accepts and rejects alike."""
    spaces = pytest.importorskip("gymnasium.spaces")
    tokenizer = pytest.importorskip("mugato_ray.tokenizer")
    from mugato_ray.config import TokenizerConfig

    cfg = TokenizerConfig()
    obs_space = spaces.Dict(
        {
            "image": spaces.Box(0, 255, (8, 8, 3), np.uint8),
            "mission": spaces.Text(64),
            "direction": spaces.Discrete(4),
            "flags": spaces.MultiBinary(2),
            "nested": spaces.Dict({"pos": spaces.Box(-np.inf, np.inf, (3,), np.float32)}),
        }
    )
    spec = space_spec(obs_space, spaces.Discrete(7), cfg, tokenizer.make_vocab(cfg))
    ep = make_episode(0)
    ep.observations["action"] = ep.observations.pop("flags")  # wrong key for the spec
    with pytest.raises(EpisodeError, match="unknown.*action.*missing.*flags"):
        ep.validate(spec)
    ep.observations["flags"] = ep.observations.pop("action")
    assert ep.validate(spec) is ep
    ep.observations["image"] = ep.observations["image"][:, :4]
    with pytest.raises(EpisodeError, match=r"observations\['image'\].*per-step shape"):
        ep.validate(spec)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_malformed_episodes_raise_only_episode_error_naming_episode_and_field(data):
    name = data.draw(st.sampled_from(sorted(MUTATIONS)), label="mutation")
    mutate, spec, field = data.draw(MUTATIONS[name])
    ep = make_episode(7)
    if mutate is not None:
        mutate(ep)
    with pytest.raises(EpisodeError) as info:  # any other exception type fails the test
        ep.validate(spec)
    assert "grid-7" in str(info.value) and field in str(info.value), (name, str(info.value))


def _garbage():
    arrays = st.sampled_from([np.zeros(3, np.float32), np.array(["a"]), np.array([None]), np.zeros((2, 2))])
    scalars = st.one_of(
        BAD_VALUES,
        st.booleans(),
        st.integers(-(2**70), 2**70),
        arrays,
        st.sampled_from([np.int64(4), np.bytes_(b"ab\0"), np.str_("str"), np.float64("nan")]),
    )
    return st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=3), scalars, max_size=2))


DELETE = object()
COLUMNS = sorted(episode_to_row(make_episode(0)))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=8)), _garbage(), max_size=12))
def test_garbage_rows_raise_only_episode_error(row):
    with pytest.raises(EpisodeError):
        episode_from_row(row, where="x.parquet row 0")


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(COLUMNS), st.one_of(_garbage(), st.just(DELETE)), st.integers(0, 1))
@example("actions.dtype", ",", 0)  # numpy reads "," as a record spec and raised SyntaxError
def test_one_garbage_column_in_a_valid_row_yields_an_episode_or_episode_error(column, value, continuous):
    row = episode_to_row(make_episode(3, continuous_actions=bool(continuous)))
    if value is DELETE:
        del row[column]
    else:
        row[column] = value
    try:
        episode_from_row(row, where="x.parquet row 0")
    except EpisodeError as e:
        assert str(e).startswith("x.parquet row 0")


def test_garbage_dtype_names_and_lying_shapes_are_episode_errors():
    row = episode_to_row(make_episode(0))
    for dtype in ("object", "complex64", "S3", "float32,int8", "no such type", "(2,)i4"):
        with pytest.raises(EpisodeError, match=r"obs\.image\.dtype"):
            episode_from_row({**row, "obs.image.dtype": dtype})
    for shape in ([4, 8, 8, 4], [-4, 8, 8, 3], [2**62, 2**62], [4.0, 8, 8, 3], None):
        with pytest.raises(EpisodeError, match=r"obs\.image"):
            episode_from_row({**row, "obs.image.shape": shape})


# ------------------------------------------------------------------------------- bad rows on read


def _write_file_with_bad_row(path):
    """row 0 valid, row 1 with image bytes that do not match its shape."""
    rows = [episode_to_row(make_episode(10)), episode_to_row(make_episode(11))]
    rows[1]["obs.image"] = rows[1]["obs.image"][:-5]
    table = pq.read_table(write_episodes(path.parent.parent / "schema", [make_episode(12)])[0])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_strict_reader_names_file_row_and_field(tmp_path):
    write_episodes(tmp_path / "store", [make_episode(0), make_episode(1)], name="a.parquet")
    _write_file_with_bad_row(tmp_path / "store" / "b.parquet")
    with pytest.raises(EpisodeError) as info:
        read_episodes(tmp_path / "store")
    msg = str(info.value)
    assert "b.parquet row 1" in msg and "obs.image" in msg and "grid-11" in msg
    assert info.value.field == "obs.image" and info.value.episode_id == "grid-11"


def test_skip_reader_keeps_good_rows_and_reports_bad_ones(tmp_path, caplog):
    write_episodes(tmp_path / "store", [make_episode(0), make_episode(1)], name="a.parquet")
    _write_file_with_bad_row(tmp_path / "store" / "b.parquet")
    skipped: list[SkippedRow] = []
    with caplog.at_level(logging.WARNING, logger="mugato_ray.episodes"):
        eps = read_episodes(tmp_path / "store", policy="skip", skipped=skipped)
    assert [ep.episode_id for ep in eps] == ["grid-0", "grid-1", "grid-10"]
    assert len(skipped) == 1 and skipped[0].file.endswith("b.parquet") and skipped[0].row == 1
    assert "obs.image" in skipped[0].error
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("b.parquet row 1" in m and "obs.image" in m for m in logged)
    assert any("skipped 1" in m for m in logged)


def test_corrupt_file_is_named_and_hidden_files_are_ignored(tmp_path):
    write_episodes(tmp_path, [make_episode(0)], name="a.parquet")
    (tmp_path / ".partial.parquet").write_bytes(b"not parquet")  # e.g. another writer's temp file
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.parquet").write_bytes(b"nope")
    assert [ep.episode_id for ep in read_episodes(tmp_path)] == ["grid-0"]
    (tmp_path / "c.parquet").write_bytes(b"PAR1 garbage bytes \x00\x01")
    with pytest.raises(EpisodeError, match="c.parquet"):
        read_episodes(tmp_path)
    skipped = []
    assert len(read_episodes(tmp_path, policy="skip", skipped=skipped)) == 1
    assert skipped[0].row is None and skipped[0].file.endswith("c.parquet")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_episodes(tmp_path / "missing")


# ------------------------------------------------------------------------------ Ray Data batches


def _numpy_batch(table: pa.Table, *, bytes_as_fixed_width=False) -> dict[str, np.ndarray]:
    """Ray Data's numpy batch format: object arrays of bytes / per-row ndarrays, native arrays otherwise."""
    batch = {}
    for name, values in table.to_pydict().items():
        kind = table.schema.field(name).type
        if pa.types.is_list(kind):
            col = np.empty(len(values), dtype=object)
            col[:] = [
                None
                if v is None
                else np.array(
                    v, dtype=kind.value_type.to_pandas_dtype() if not pa.types.is_string(kind.value_type) else object
                )
                for v in values
            ]
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            col = np.array(values, dtype="S") if bytes_as_fixed_width else np.array(values, dtype=object)
        elif any(v is None for v in values) or pa.types.is_string(kind):
            col = np.array(values, dtype=object)
        else:
            col = np.array(values)
        batch[name] = col
    return batch


@pytest.mark.parametrize("bytes_as_fixed_width", [False, True])
def test_episodes_from_numpy_batch_round_trip(tmp_path, bytes_as_fixed_width):
    eps = [make_episode(i, success=[None, True, False][i]) for i in range(3)]
    table = pq.read_table(write_episodes(tmp_path, eps)[0])
    batch = _numpy_batch(table, bytes_as_fixed_width=bytes_as_fixed_width)
    assert batch["obs.image"].dtype.kind == ("S" if bytes_as_fixed_width else "O")
    back = episodes_from_batch(batch)
    assert len(back) == 3
    for a, b in zip(eps, back):
        assert_same(a, b)


def test_batch_with_unified_schema_of_two_tasks_skips_null_fields(tmp_path):
    grid, arm = make_episode(0), make_episode(1, task="arm", continuous_actions=True)
    del arm.observations["image"], arm.observations["mission"]
    write_episodes(tmp_path, [grid])
    write_episodes(tmp_path, [arm])
    table = pa.concat_tables([pq.read_table(p) for p in sorted(tmp_path.glob("*.parquet"))], promote_options="default")
    assert table.column("obs.image").null_count == 1
    back = {ep.task: ep for ep in episodes_from_batch(_numpy_batch(table))}
    assert_same(grid, back["grid"])
    assert_same(arm, back["arm"])
    assert "image" not in back["arm"].observations


def test_batch_error_names_the_row():
    rows = [episode_to_row(make_episode(0)), episode_to_row(make_episode(1))]
    rows[1]["length"] = 99
    batch = {c: np.empty(2, dtype=object) for c in rows[0]}
    for c, col in batch.items():
        col[:] = [rows[0][c], rows[1][c]]
    with pytest.raises(EpisodeError, match=r"batch row 1.*grid-1.*length"):
        episodes_from_batch(batch)


def test_store_references_are_kept_once_and_checked(tmp_path):
    folder = tmp_path / "data" / "grid"
    assert E.read_store_references(folder) is None
    path = E.write_store_references(folder, 500.0, 10.0, "dataset d")
    assert E.read_store_references(folder) == {"expert_return": 500.0, "random_return": 10.0, "origin": "dataset d"}
    assert E.write_store_references(folder, 500, 10, "dataset d again") == path  # the same pair: a no-op
    with pytest.raises(EpisodeError, match=r"expert 500.0, random 10.0 .*dataset e has expert 400.0"):
        E.write_store_references(folder, 400.0, 10.0, "dataset e")
    assert E.read_store_references(folder)["expert_return"] == 500.0  # never replaced
    path.write_text('{"expert_return": "high", "random_return": 1, "origin": "x"}')
    with pytest.raises(EpisodeError, match=f"{path}: expert_return: expected a finite number"):
        E.read_store_references(folder)
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
