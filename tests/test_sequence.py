"""Sequencing: layouts, whole-step windows, prompts, padding and the flat id/mask view."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from gymnasium import spaces

from mugato_ray.config import Config
from mugato_ray.episodes import Episode, episode_to_row
from mugato_ray.sequence import (
    PROMPT_MASK_KEY,
    SEPARATOR_KEY,
    STEP_MASK_KEY,
    SequenceBuilder,
    flatten_ids,
    make_layout,
    tokenize_episode,
)
from mugato_ray.specs import space_spec
from mugato_ray.tokenizer import (
    ByteTokenizer,
    FieldSpec,
    Modality,
    SpaceSpec,
    make_vocab,
)

TEXT = ByteTokenizer()


def make_cfg(context=64, prompt_prob=0.0, end_fraction=0.5, max_text_tokens=8) -> Config:
    cfg = Config()
    cfg.model.context = context
    cfg.data.prompt_prob = prompt_prob
    cfg.data.prompt_end_fraction = end_fraction
    cfg.tokenizer.max_text_tokens = max_text_tokens
    return cfg


def make_spec(obs_space, act_space, cfg) -> SpaceSpec:
    return space_spec(obs_space, act_space, cfg.tokenizer, make_vocab(cfg.tokenizer))


def text_spec(cfg, tokens) -> SpaceSpec:
    """A text-only task: no observation, the text is the action."""
    act = FieldSpec(key="text", modality=Modality.TEXT, shape=(), dtype="str", tokens=tokens, channels=1)
    return SpaceSpec(observation=(), action=(act,), vocab=make_vocab(cfg.tokenizer))


def counting_episode(L, *, first=0, task="count", eid="ep-0") -> Episode:
    """Discrete(1000) observation equal to first + step index: every step is identifiable by its token."""
    return Episode(
        task=task, episode_id=eid, source="expert", seed=0,
        observations={"observation": np.arange(first, first + L, dtype=np.int64)},
        actions=(np.arange(L) % 2).astype(np.int64), rewards=np.ones(L, np.float32),
    )


COUNT_SPACES = (spaces.Discrete(1000), spaces.Discrete(2))


def step_index(row_or_batch_obs, vocab):
    """The counting observation back from its ids: (..., E, 1, 1) -> (..., E)."""
    return row_or_batch_obs[..., 0, 0].astype(np.int64) - vocab.value_offset


def to_batch(episodes) -> dict[str, np.ndarray]:
    """Ray Data's numpy batch of store rows: object arrays of bytes / per-row arrays, read-only."""
    table = pa.Table.from_pylist([episode_to_row(ep) for ep in episodes])
    batch = {}
    for name, values in table.to_pydict().items():
        kind = table.schema.field(name).type
        if pa.types.is_list(kind):
            col = np.empty(len(values), dtype=object)
            col[:] = [np.array(v) for v in values]
            for v in col:
                v.setflags(write=False)
        elif pa.types.is_binary(kind) or pa.types.is_string(kind) or any(v is None for v in values):
            col = np.array(values, dtype=object)
        else:
            col = np.array(values)
        col.setflags(write=False)
        batch[name] = col
    return batch


# ------------------------------------------------------------------------------------ shapes


def _grid_task(cfg):
    obs = spaces.Dict({
        "image": spaces.Box(0, 255, (32, 16, 3), np.uint8),
        "mission": spaces.Text(max_length=20),
        "direction": spaces.Discrete(4),
    })
    spec = make_spec(obs, spaces.Discrete(7), cfg)

    def episode(i, L):
        rng = np.random.default_rng(i)
        return Episode(
            task="grid", episode_id=f"grid-{i}", source="expert", seed=i,
            observations={
                "image": rng.integers(0, 256, (L, 32, 16, 3), dtype=np.uint8),
                "mission": [f"go to the door {i}"] * L,
                "direction": rng.integers(0, 4, L).astype(np.int64),
            },
            actions=rng.integers(0, 7, L).astype(np.int64), rewards=np.zeros(L, np.float32),
        )
    return spec, episode


def _cartpole_task(cfg):
    spec = make_spec(spaces.Box(-np.inf, np.inf, (4,), np.float32), spaces.Discrete(2), cfg)

    def episode(i, L):
        rng = np.random.default_rng(i)
        return Episode(
            task="cartpole", episode_id=f"cp-{i}", source="expert", seed=i,
            observations={"observation": rng.normal(size=(L, 4)).astype(np.float32)},
            actions=rng.integers(0, 2, L).astype(np.int64), rewards=np.ones(L, np.float32),
        )
    return spec, episode


def _reacher_task(cfg):
    spec = make_spec(spaces.Box(-np.inf, np.inf, (3,), np.float32), spaces.Box(-1, 1, (2,), np.float32), cfg)

    def episode(i, L):
        rng = np.random.default_rng(i)
        return Episode(
            task="reacher", episode_id=f"re-{i}", source="expert", seed=i,
            observations={"observation": rng.normal(size=(L, 3)).astype(np.float32)},
            actions=rng.uniform(-1, 1, (L, 2)).astype(np.float32), rewards=np.zeros(L, np.float32),
        )
    return spec, episode


AGENT_TASKS = {"cartpole": _cartpole_task, "grid": _grid_task, "reacher": _reacher_task}


def assert_row_format(batch, layout, B):
    assert set(batch) == {f.key for f in layout.fields} | {STEP_MASK_KEY, PROMPT_MASK_KEY}
    for f in layout.fields:
        assert batch[f.key].shape == (B, layout.steps, f.tokens, f.channels), f.key
        assert batch[f.key].dtype == (np.uint8 if f.is_image else np.int32), f.key
    for key in (STEP_MASK_KEY, PROMPT_MASK_KEY):
        assert batch[key].shape == (B, layout.steps) and batch[key].dtype == bool


@pytest.mark.parametrize("name", sorted(AGENT_TASKS))
def test_builder_rows_have_exactly_the_layout_shapes_and_dtypes(name):
    cfg = make_cfg(context=256, prompt_prob=0.5)
    spec, episode = AGENT_TASKS[name](cfg)
    builder = SequenceBuilder(name, spec, cfg, seed=1)
    layout = builder.layout
    assert layout.seq_len <= cfg.model.context < layout.seq_len + layout.step_tokens
    assert [f.key for f in layout.fields] == [*(f"obs/{f.key}" for f in spec.observation), "sep", "act/action"]
    batch = builder(to_batch([episode(i, L) for i, L in enumerate([3, 40, 7])]))
    assert_row_format(batch, layout, B=3)


def test_text_only_task_is_one_step_of_context_tokens():
    cfg = make_cfg(context=32)
    spec = text_spec(cfg, tokens=8)
    layout = make_layout("text", spec, cfg.model.context)
    assert layout.steps == 1 and [(f.key, f.tokens, f.channels) for f in layout.fields] == [("act/text", 32, 1)]
    vocab = spec.vocab
    for text, n_loss in [("héllo wörld", len("héllo wörld".encode()) + 1), ("x" * 50, 32)]:
        ep = Episode("text", "t-0", "expert", 0, {}, [text], np.zeros(1, np.float32))
        batch = SequenceBuilder("text", spec, cfg).build([ep])
        assert_row_format(batch, layout, B=1)
        ids = batch["act/text"][0, 0, :, 0]
        n_text = min(len(text.encode()), 32)
        assert bytes(ids[:n_text].astype(np.uint8)).decode(errors="replace").startswith(text[:5])
        # eos after the text when it fits, then padding; a truncated text has no room for eos.
        if n_text < 32:
            assert ids[n_text] == vocab.eos and (ids[n_text + 1 :] == vocab.pad).all()
        _, valid, loss = flatten_ids(batch, layout)
        assert loss.sum() == n_loss == valid.sum()


# ----------------------------------------------------------------------- order and flat view


def test_flatten_ids_matches_a_hand_built_gato_sequence():
    cfg = make_cfg(context=30, max_text_tokens=3)
    obs = spaces.Dict({
        "b": spaces.Discrete(3),
        "mission": spaces.Text(max_length=3),
        "a": spaces.Box(-np.inf, np.inf, (2,), np.float32),
        "image": spaces.Box(0, 255, (16, 32, 1), np.uint8),
    })
    spec = make_spec(obs, spaces.Discrete(4), cfg)
    layout = make_layout("order", spec, cfg.model.context)
    # GATO order: text, image, then the rest sorted by key; separator; action.
    assert [f.key for f in layout.fields] == ["obs/mission", "obs/image", "obs/a", "obs/b", "sep", "act/action"]
    assert layout.step_tokens == 3 + 2 + 2 + 1 + 1 + 1 and layout.steps == 3
    ep = Episode(
        task="order", episode_id="o", source="expert", seed=0,
        observations={
            "mission": ["hi", "ok"],
            "image": np.full((2, 16, 32, 1), 7, np.uint8),
            "a": np.array([[0.0, 256.0], [-256.0, 0.0]], np.float32),  # mu-law(0)=0 -> bin 512; +-M -> +-1
            "b": np.array([2, 0]),
        },
        actions=np.array([3, 1]), rewards=np.zeros(2, np.float32),
    )
    batch = SequenceBuilder("order", spec, cfg).build([ep])  # the whole 2-step episode, no prompt
    row = {k: v[0] for k, v in batch.items()}
    v = spec.vocab
    o, P, S = v.value_offset, v.pad, v.separator
    expected = [
        ord("h"), ord("i"), P, P, P, o + 512, o + 1023, o + 2, S, o + 3,
        ord("o"), ord("k"), P, P, P, o + 0, o + 512, o + 0, S, o + 1,
        *[P] * 10,
    ]
    ids, valid, loss = flatten_ids(batch, layout)
    assert ids.dtype == np.int64 and ids.tolist() == [expected]
    real_pos = [p for p in range(20) if p % 10 != 2]  # the text pad is invalid; image positions are valid
    assert np.flatnonzero(valid[0]).tolist() == real_pos
    assert np.flatnonzero(loss[0]).tolist() == [9, 19]
    assert (row["obs/image"][:2] == 7).all() and (row["obs/image"][2] == 0).all()


def test_flatten_ids_on_torch_tensors_equals_numpy():
    torch = pytest.importorskip("torch")
    cfg = make_cfg(context=256, prompt_prob=1.0)
    spec, episode = _grid_task(cfg)
    builder = SequenceBuilder("grid", spec, cfg, seed=3)
    batch = builder(to_batch([episode(0, 5), episode(1, 30)]))
    want = flatten_ids(batch, builder.layout)
    got = flatten_ids({k: torch.from_numpy(v) for k, v in batch.items()}, builder.layout)
    for w, g in zip(want, got):
        assert g.dtype in (torch.int64, torch.bool)
        np.testing.assert_array_equal(g.numpy(), w)


# --------------------------------------------------------------------------------- windows


def test_training_windows_are_contiguous_whole_steps_of_the_episode():
    cfg = make_cfg(context=24)  # 1 obs + sep + 1 action = 3 tokens per step: E = 8
    spec = make_spec(*COUNT_SPACES, cfg)
    layout = make_layout("count", spec, cfg.model.context)
    assert layout.steps == 8
    ep = counting_episode(50)
    full = tokenize_episode(ep, spec, TEXT)
    for seed in range(50):
        row = {k: v[0] for k, v in SequenceBuilder("count", spec, cfg, seed=seed).build([ep]).items()}
        n = int(row[STEP_MASK_KEY].sum())
        assert n == layout.steps  # the episode is longer than the context: cut to E whole steps
        start = int(step_index(row["obs/observation"], spec.vocab)[0])
        for f in layout.fields:
            np.testing.assert_array_equal(row[f.key][:n], full[f.key][start : start + n])


def test_training_windows_cover_every_start():
    cfg = make_cfg(context=24)  # E = 8 steps of a 12-step episode: starts 0..4
    spec = make_spec(*COUNT_SPACES, cfg)
    ep = counting_episode(12)
    starts = {int(step_index(SequenceBuilder("count", spec, cfg, seed=s).build([ep])["obs/observation"][0],
                             spec.vocab)[0]) for s in range(200)}
    assert starts == set(range(0, 12 - 8 + 1))


def test_short_episode_is_padded_at_the_end():
    cfg = make_cfg(context=256)
    spec, episode = _grid_task(cfg)
    layout = make_layout("grid", spec, cfg.model.context)
    ep = episode(0, 2)
    row = {k: v[0] for k, v in SequenceBuilder("grid", spec, cfg).build([ep]).items()}
    assert row[STEP_MASK_KEY].tolist() == [True] * 2 + [False] * (layout.steps - 2)
    assert not row[PROMPT_MASK_KEY].any()
    for f in layout.fields:
        pad = 0 if f.is_image else spec.vocab.pad
        assert (row[f.key][2:] == pad).all(), f.key
    assert (row[SEPARATOR_KEY][:2] == spec.vocab.separator).all()


# ------------------------------------------------------------------------------- loss mask


def _expected_loss(batch, layout):
    """Loss positions built independently: action fields of real, non-prompt steps, id != pad."""
    per_step = []
    for f in layout.fields:
        is_act = np.full(f.tokens, f.loss)
        not_pad = batch[f.key][..., 0] != layout.pad if not f.is_image else np.zeros(batch[f.key].shape[:3], bool)
        per_step.append(is_act & not_pad)
    flags = np.concatenate(per_step, axis=2)
    real = batch[STEP_MASK_KEY] & ~batch[PROMPT_MASK_KEY]
    return (flags & real[..., None]).reshape(len(flags), -1)


@pytest.mark.parametrize("name", sorted(AGENT_TASKS))
def test_loss_is_on_action_tokens_of_real_non_prompt_steps_only(name):
    cfg = make_cfg(context=256, prompt_prob=0.5)
    spec, episode = AGENT_TASKS[name](cfg)
    builder = SequenceBuilder(name, spec, cfg, seed=0)
    batch = builder(to_batch([episode(i, L) for i, L in enumerate([2, 30, 9, 60])]))
    assert batch[PROMPT_MASK_KEY].any()  # the property is tested with prompts present
    _, valid, loss = flatten_ids(batch, builder.layout)
    n_steps = (batch[STEP_MASK_KEY] & ~batch[PROMPT_MASK_KEY]).sum()
    assert loss.sum() == n_steps * spec.action_tokens
    np.testing.assert_array_equal(loss, _expected_loss(batch, builder.layout))
    assert not (loss & ~valid).any()


# ---------------------------------------------------------------------------------- prompts


def test_prompt_comes_first_from_another_episode_and_is_masked():
    cfg = make_cfg(context=60, prompt_prob=1.0)  # E = 20: a prompt has at most 10 steps
    spec = make_spec(*COUNT_SPACES, cfg)
    builder = SequenceBuilder("count", spec, cfg, seed=0)
    episodes = [counting_episode(30, first=0, eid="a"), counting_episode(25, first=500, eid="b")]
    full = {ep.episode_id: tokenize_episode(ep, spec, TEXT) for ep in episodes}
    for seed in range(20):
        builder.seed = seed
        batch = builder(to_batch(episodes))
        for b, (own, other) in enumerate([("a", "b"), ("b", "a")]):
            n_p = int(batch[PROMPT_MASK_KEY][b].sum())
            n = int(batch[STEP_MASK_KEY][b].sum())
            assert 1 <= n_p <= 10 and n == 20
            assert batch[PROMPT_MASK_KEY][b].tolist() == [True] * n_p + [False] * (20 - n_p)
            idx = step_index(batch["obs/observation"][b], spec.vocab)
            for lo, hi, src in ((0, n_p, other), (n_p, n, own)):  # contiguous whole steps of that episode
                start = int(idx[lo]) - (500 if src == "b" else 0)
                for f in builder.layout.fields:
                    np.testing.assert_array_equal(batch[f.key][b, lo:hi], full[src][f.key][start : start + hi - lo])


def test_about_a_quarter_of_sequences_get_a_prompt():
    cfg = make_cfg(context=60, prompt_prob=0.25)
    spec = make_spec(*COUNT_SPACES, cfg)
    builder = SequenceBuilder("count", spec, cfg, seed=0)
    batch = to_batch([counting_episode(15, first=100 * i, eid=f"e{i}") for i in range(8)])
    prompted = []
    for seed in range(250):
        builder.seed = seed
        prompted.append(builder(batch)[PROMPT_MASK_KEY].any(axis=1))
    rate = np.concatenate(prompted).mean()
    # 2000 Bernoulli(0.25) draws: standard deviation sqrt(0.25 * 0.75 / 2000) = 0.0097; 5 sigma = 0.048.
    assert abs(rate - 0.25) < 0.048


def test_a_single_episode_batch_gets_no_prompt():
    cfg = make_cfg(context=60, prompt_prob=1.0)
    spec = make_spec(*COUNT_SPACES, cfg)
    batch = SequenceBuilder("count", spec, cfg, seed=0)(to_batch([counting_episode(15)]))
    assert not batch[PROMPT_MASK_KEY].any()


def test_prompts_are_the_donor_end_or_a_uniform_window():
    """GATO's prompts: with probability end_fraction the donor episode's last steps, else a uniform window
    of them; at most half the window (E = 20 steps here: 10-step prompts of a 30-step donor)."""
    spec = make_spec(*COUNT_SPACES, make_cfg(context=60))
    donor, ep = counting_episode(30, eid="donor"), counting_episode(5, first=500, eid="ep")

    def prompt_steps(end_fraction: float, seed: int) -> list[int]:
        cfg = make_cfg(context=60, prompt_prob=1.0, end_fraction=end_fraction)
        batch = SequenceBuilder("count", spec, cfg, seed=seed).build([donor, ep])
        steps = step_index(batch["obs/observation"][1], spec.vocab)
        return steps[batch[PROMPT_MASK_KEY][1]].tolist()

    assert all(prompt_steps(1.0, s) == list(range(20, 30)) for s in range(20))
    starts = [prompt_steps(0.5, s)[0] for s in range(400)]
    n_end = starts.count(20)
    # Half the prompts end the episode; the uniform half picks start 20 with probability 1/21 too.
    assert abs(n_end / 400 - (0.5 + 0.5 / 21)) < 0.1
    assert len(set(starts)) > 12  # the uniform half spreads over the 21 starts


# --------------------------------------------------------------------------------- builder


def test_builder_is_deterministic_and_never_mutates_its_input():
    cfg = make_cfg(context=256, prompt_prob=0.5)
    spec, episode = _grid_task(cfg)
    batch = to_batch([episode(i, L) for i, L in enumerate([5, 40, 12, 3])])
    snapshot = {k: v.copy() for k, v in batch.items()}
    a = SequenceBuilder("grid", spec, cfg, seed=7)(batch)
    b = SequenceBuilder("grid", spec, cfg, seed=7)(batch)
    c = SequenceBuilder("grid", spec, cfg, seed=8)(batch)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    for k, v in batch.items():
        assert all(np.array_equal(x, y) for x, y in zip(v, snapshot[k])), k


def test_builder_rejects_another_tasks_rows_and_handles_empty_batches():
    cfg = make_cfg(context=24)
    spec = make_spec(*COUNT_SPACES, cfg)
    builder = SequenceBuilder("count", spec, cfg)
    with pytest.raises(ValueError, match=r"row 1.*'other'.*'count'"):
        builder(to_batch([counting_episode(5), counting_episode(5, task="other", eid="x")]))
    empty = builder({k: v[:0] for k, v in to_batch([counting_episode(5)]).items()})
    assert_row_format(empty, builder.layout, B=0)


def test_a_context_smaller_than_one_step_is_a_clear_error():
    cfg = make_cfg(context=256)
    spec, _ = _grid_task(cfg)  # 8 text + 2 patches + 1 discrete + sep + action = 13 tokens
    with pytest.raises(ValueError, match=r"task 'grid'.*step_tokens=13.*model.context=12"):
        make_layout("grid", spec, 12)


@pytest.mark.parametrize("name", sorted(AGENT_TASKS))
def test_draws_that_share_tokenized_episodes_equal_draws_that_tokenize_their_windows(name):
    """WindowSampler tokenizes a call's episodes once and slices the windows (``tokens``): the rows must be
    exactly those of tokenizing each window, prompts included, for every draw."""
    cfg = make_cfg(context=256, prompt_prob=0.5)
    spec, episode = AGENT_TASKS[name](cfg)
    episodes = [episode(i, L) for i, L in enumerate([2, 30, 9, 60, 17])]
    cached, plain = SequenceBuilder(name, spec, cfg), SequenceBuilder(name, spec, cfg)
    tokens: dict = {}
    for seed in range(6):
        cached.seed = plain.seed = seed
        a = cached.build(episodes, checked=True, tokens=tokens)
        b = plain.build(episodes)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (name, seed, k)
    has_image = any(f.is_image for f in cached.layout.fields)
    # Image episodes are tokenized per window (whole image episodes would be big); the rest once each.
    assert sorted(tokens) == ([] if has_image else list(range(len(episodes))))
