"""Properties of mugato_ray.tokenizer: round-trips, fixed bins, raster order, id layout, space mapping."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mugato_ray import tokenizer as tk
from mugato_ray.config import TokenizerConfig
from mugato_ray.specs import space_spec
from mugato_ray.tokenizer import Modality, UnsupportedSpaceError, VocabLayout

CFG = TokenizerConfig()
BYTES = tk.ByteTokenizer()
VOCAB = tk.make_vocab(CFG, BYTES)
HALF_BIN = 1.0 / CFG.value_bins  # half of the bin width 2 / bins
FAST = settings(max_examples=60, deadline=None)


def spec_for(obs_space, act_space=None, cfg=CFG, **kw):
    return space_spec(obs_space, spaces.Discrete(2) if act_space is None else act_space, cfg, VOCAB, **kw)


# --------------------------------------------------------------------------------------------- text


@FAST
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    ids = BYTES.encode(text)
    assert ids.dtype == np.int64
    assert len(ids) == len(text.encode("utf-8"))
    assert ((ids >= 0) & (ids < 256)).all()
    assert BYTES.decode(ids) == text


@pytest.mark.parametrize("text", ["", "a", "naïve café", "日本語のテキスト", "emoji 🤖🧠", "\x00\n\t"])
def test_text_field_round_trips_through_observations(text):
    spec = spec_for(spaces.Text(200))
    (field,) = spec.observation
    tokens = tk.encode_observations(spec, {"observation": [text, "other"]}, BYTES)
    ids = tokens["observation"]
    assert ids.shape == (2, CFG.max_text_tokens, 1) and ids.dtype == np.int64
    n = len(text.encode("utf-8"))
    assert (ids[0, n:, 0] == VOCAB.pad).all()  # padded with the pad id, never a text id
    assert tk.decode_observations(spec, tokens, BYTES)["observation"] == [text, "other"]
    assert field.modality is Modality.TEXT


def test_encode_text_truncates_and_appends_eos_only_when_it_fits():
    ids = tk.encode_text(["abcdef", "ab"], BYTES, VOCAB, tokens=4, append_eos=True)
    assert ids.tolist() == [[97, 98, 99, 100], [97, 98, VOCAB.eos, VOCAB.pad]]
    assert tk.decode_text(ids[1], BYTES, VOCAB) == "ab"
    assert tk.decode_text(ids[0], BYTES, VOCAB) == "abcd"


def test_a_cut_text_observation_is_logged_once_per_field(caplog, monkeypatch):
    monkeypatch.setattr(tk, "_WARNED_TRUNCATION", set())
    spec = spec_for(spaces.Dict({"mission": spaces.Text(200)}), text_tokens=8)
    with caplog.at_level("WARNING", logger="mugato_ray.tokenizer"):
        tk.encode_observations(spec, {"mission": ["go to the red ball"]}, BYTES)
        tk.encode_observations(spec, {"mission": ["pick up the key on your left"]}, BYTES)
        tk.encode_observations(spec, {"mission": ["short"]}, BYTES)
    cut = [r for r in caplog.records if "cut to 8" in r.getMessage()]
    assert len(cut) == 1 and "'mission'" in cut[0].getMessage() and "max_text_tokens" in cut[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mugato_ray.tokenizer"):
        tk.encode_text(["a long free text answer"], BYTES, VOCAB, tokens=4)  # a text action: cut by design
    assert not caplog.records


def test_text_tokens_override_sets_the_text_length():
    spec = spec_for(spaces.Text(5000), text_tokens=1024)
    assert spec.observation[0].tokens == 1024


def test_decode_text_refuses_non_text_ids():
    with pytest.raises(ValueError, match="position 1"):
        tk.decode_text([97, VOCAB.value_offset, 98], BYTES, VOCAB)
    with pytest.raises(ValueError, match="position 0"):
        tk.decode_text([VOCAB.separator], BYTES, VOCAB)
    # after a stop id nothing is read
    assert tk.decode_text([104, 105, VOCAB.pad, VOCAB.separator], BYTES, VOCAB) == "hi"


def test_make_text_tokenizer_names_the_config_key():
    assert isinstance(tk.make_text_tokenizer(TokenizerConfig(text="byte")), tk.ByteTokenizer)
    with pytest.raises(ValueError, match="tokenizer.text"):
        tk.make_text_tokenizer(TokenizerConfig(text="sentencepiece"))
    with pytest.raises(ValueError, match="tokenizer.bpe_path"):
        tk.make_text_tokenizer(TokenizerConfig(text="bpe", bpe_path=None))


def test_bpe_without_tokenizers_package_names_the_config_key(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="tokenizer.text"):
        tk.make_text_tokenizer(TokenizerConfig(text="bpe", bpe_path=str(tmp_path / "tokenizer.json")))


def test_bpe_trains_locally_and_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = ["go to the red ball", "pick up the blue key", "open the yellow door", "naïve café 日本"] * 20
    path = tmp_path / "bpe" / "tokenizer.json"
    trained = tk.train_bpe(corpus, vocab_size=300, path=path)
    loaded = tk.make_text_tokenizer(TokenizerConfig(text="bpe", bpe_path=str(path)))
    assert loaded.size == trained.size <= 300
    vocab = tk.make_vocab(TokenizerConfig(text="bpe", bpe_path=str(path)), loaded)
    assert vocab.text_size == loaded.size
    for text in ["go to the red ball", "  unseen Wörds, 🤖 and spaces  ", ""]:
        ids = loaded.encode(text)
        assert ids.dtype == np.int64 and ((ids >= 0) & (ids < loaded.size)).all()
        assert loaded.decode(ids) == text
    # merges were learned: a corpus sentence needs fewer ids than bytes
    assert len(loaded.encode("pick up the blue key")) < len(b"pick up the blue key")


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory):
    pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return tk.train_bpe(["go to the red ball", "pick up the blue key"] * 10, vocab_size=280, path=path)


@FAST
@given(st.text())
def test_bpe_round_trips_any_text(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text)) == text


# --------------------------------------------------------------------------------------------- values


@FAST
@given(hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e6, 1e6)))
def test_mu_law_matches_the_written_formula_and_decode_inverts_it(x):
    mu, M = 100.0, 256.0
    expected = np.sign(x) * np.log(np.abs(x) * mu + 1.0) / np.log(M * mu + 1.0)
    y = tk.mu_law_encode(x, mu, M)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tk.mu_law_decode(y, mu, M), x, rtol=1e-9, atol=1e-12)


def test_mu_law_keeps_float32_and_maps_M_to_one():
    x = np.array([-256.0, 0.0, 256.0], np.float32)
    y = tk.mu_law_encode(x)
    assert y.dtype == np.float32 and tk.mu_law_decode(y).dtype == np.float32
    np.testing.assert_allclose(y, [-1.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("bins", [1024, 7, 256])
def test_bins_are_fixed_and_uniform_on_minus_one_one(bins):
    centers = tk.undiscretize(np.arange(bins), bins)
    assert centers.dtype == np.float32
    np.testing.assert_allclose(np.diff(centers.astype(np.float64)), 2.0 / bins, rtol=1e-5)
    np.testing.assert_allclose([centers[0], centers[-1]], [-1 + 1 / bins, 1 - 1 / bins], rtol=1e-5)
    # each center falls in its own bin, and the edges go to the first / last bin
    assert (tk.discretize(centers, bins) == np.arange(bins)).all()
    assert tk.discretize(np.array([-5.0, -1.0, 1.0, 5.0]), bins).tolist() == [0, 0, bins - 1, bins - 1]


def test_bin_widths_are_exact_for_1024():
    assert (np.diff(tk.undiscretize(np.arange(1024))) == np.float32(2 / 1024)).all()


@FAST
@given(
    hnp.arrays(
        np.float64,
        st.integers(1, 30),
        elements=st.floats(allow_nan=False, allow_infinity=True, allow_subnormal=True),
    )
)
def test_continuous_round_trip_error_is_at_most_half_a_bin_in_mu_law_domain(x):
    spec = spec_for(spaces.Box(-np.inf, np.inf, (len(x),), np.float64))
    tokens = tk.encode_observations(spec, {"observation": x[None]}, BYTES)
    ids = tokens["observation"]
    assert ((ids >= VOCAB.value_offset) & (ids < VOCAB.value_offset + VOCAB.value_bins)).all()
    decoded = tk.decode_observations(spec, tokens, BYTES)["observation"][0]
    y_true = np.clip(tk.mu_law_encode(x), -1, 1)  # huge values clip to the edge bins
    y_back = tk.mu_law_encode(decoded)
    assert np.abs(y_back - y_true).max() <= HALF_BIN + 1e-9


@FAST
@given(st.floats(-1e4, 1e4), hnp.arrays(np.float32, 50, elements=st.floats(width=32, allow_nan=False)))
def test_same_value_gets_same_id_in_any_batch(value, others):
    spec = spec_for(spaces.Box(-np.inf, np.inf, (1,), np.float32))
    alone = np.array([[value]], np.float32)
    batch = np.concatenate([others[:, None], alone, others[:, None] * 1e-3])
    ids_alone = tk.encode_observations(spec, {"observation": alone}, BYTES)["observation"]
    ids_batch = tk.encode_observations(spec, {"observation": batch}, BYTES)["observation"]
    assert ids_batch[len(others), 0, 0] == ids_alone[0, 0, 0]


def test_discretize_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        tk.discretize(np.array([0.0, np.nan]))


# --------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(("rows", "cols", "channels", "patch"), [(3, 4, 3, 16), (2, 2, 1, 16), (1, 5, 3, 4)])
def test_patches_are_in_raster_order(rows, cols, channels, patch):
    # patch (r, c) is filled with r * cols + c, so patch index == its value in raster order
    grid = np.arange(rows * cols, dtype=np.uint8).reshape(rows, cols)
    image = np.repeat(np.repeat(grid, patch, 0), patch, 1)[..., None].repeat(channels, -1)
    patches = tk.image_to_patches(image, patch)
    assert patches.shape == (rows * cols, patch * patch * channels) and patches.dtype == np.uint8
    for p in range(rows * cols):
        assert (patches[p] == p).all()


def test_patch_is_flattened_as_patch_patch_channels_in_c_order():
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    patches = tk.image_to_patches(image, 16)
    assert (patches[1 * 3 + 2] == image[16:32, 32:48].reshape(-1)).all()


@FAST
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3]), st.sampled_from([4, 7, 16]))
def test_patches_round_trip_and_pad_bottom_right_with_zeros(E, H, W, C, patch):
    rng = np.random.default_rng(H * 41 + W)
    images = rng.integers(1, 256, (E, H, W, C), dtype=np.uint8)  # no zeros, so padding is visible
    patches = tk.image_to_patches(images, patch)
    rows, cols = tk.patch_grid(H, W, patch)
    assert (rows, cols) == (-(-H // patch), -(-W // patch))
    assert patches.shape == (E, rows * cols, patch * patch * C)
    # the padded canvas: the image in the top-left corner, zeros bottom/right
    canvas = patches.reshape(E, rows, cols, patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
    canvas = canvas.reshape(E, rows * patch, cols * patch, C)
    assert (canvas[:, :H, :W] == images).all()
    assert (canvas[:, H:] == 0).all() and (canvas[:, :, W:] == 0).all()
    back = tk.patches_to_image(patches, H, W, patch)
    assert back.shape == images.shape and (back == images).all()
    # unbatched form agrees with the batched one
    assert (tk.image_to_patches(images[0], patch) == patches[0]).all()
    assert (tk.patches_to_image(patches[0], H, W, patch, C) == images[0]).all()


def test_image_to_patches_accepts_non_contiguous_input():
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    strided = images[::2, :, ::-1]
    assert (tk.image_to_patches(strided) == tk.image_to_patches(np.ascontiguousarray(strided))).all()


def test_image_observation_is_uint8_patches_and_round_trips():
    spec = spec_for(spaces.Box(0, 255, (40, 24, 3), np.uint8))
    (field,) = spec.observation
    assert (field.modality, field.grid, field.tokens, field.channels) == (Modality.IMAGE, (3, 2), 6, 768)
    images = np.random.default_rng(2).integers(0, 256, (5, 40, 24, 3), dtype=np.uint8)
    tokens = tk.encode_observations(spec, {"observation": images}, BYTES)["observation"]
    assert tokens.shape == (5, 6, 768) and tokens.dtype == np.uint8  # not normalized here
    assert (tk.decode_observations(spec, {"observation": tokens}, BYTES)["observation"] == images).all()


# --------------------------------------------------------------------------------------------- vocab


@pytest.mark.parametrize(("text_size", "bins"), [(256, 1024), (32000, 1024), (1, 2), (300, 77)])
def test_vocab_ranges_are_disjoint_and_cover_every_id(text_size, bins):
    vocab = VocabLayout(text_size, bins)
    ranges = vocab.ranges()
    owner = np.zeros(vocab.size, np.int64)
    for lo, hi in ranges.values():
        assert 0 <= lo < hi <= vocab.size
        owner[lo:hi] += 1
    assert (owner == 1).all()  # disjoint and covering [0, size)
    assert ranges["text"] == (0, text_size)
    assert ranges["value"] == (vocab.value_offset, vocab.value_offset + bins)
    for special in (vocab.separator, vocab.pad, vocab.eos):
        assert special >= text_size + bins and special < vocab.size
    assert len({vocab.separator, vocab.pad, vocab.eos}) == 3


# --------------------------------------------------------------------------------------------- spaces


@pytest.mark.parametrize(
    ("space", "modality", "tokens", "channels", "extra"),
    [
        (spaces.Discrete(5, start=2), Modality.DISCRETE, 1, 1, {"nvec": (5,), "start": (2,), "shape": ()}),
        (spaces.MultiDiscrete([[3, 4], [5, 6]]), Modality.DISCRETE, 4, 1, {"nvec": (3, 4, 5, 6), "shape": (2, 2)}),
        (spaces.MultiBinary(3), Modality.DISCRETE, 3, 1, {"nvec": (2, 2, 2), "start": (0, 0, 0)}),
        (spaces.Box(-1, 1, (2, 3), np.float32), Modality.CONTINUOUS, 6, 1, {"low": (-1.0,) * 6, "dtype": "float32"}),
        (spaces.Box(-1, 1, (), np.float64), Modality.CONTINUOUS, 1, 1, {"dtype": "float64"}),
        (spaces.Box(0, 255, (64, 64, 3), np.uint8), Modality.IMAGE, 16, 768, {"grid": (4, 4)}),
        (spaces.Box(0, 255, (84, 84, 1), np.uint8), Modality.IMAGE, 36, 256, {"grid": (6, 6)}),
        (spaces.Box(0, 255, (5,), np.uint8), Modality.DISCRETE, 5, 1, {"nvec": (256,) * 5, "start": (0,) * 5}),
        (spaces.Box(-3, 3, (2,), np.int64), Modality.DISCRETE, 2, 1, {"nvec": (7, 7), "start": (-3, -3)}),
        (spaces.Text(30), Modality.TEXT, CFG.max_text_tokens, 1, {"dtype": "str", "shape": ()}),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, spaces.Space) else None,
)
def test_observation_space_maps_to_modality(space, modality, tokens, channels, extra):
    (field,) = spec_for(space).observation
    assert field.key == "observation"
    assert (field.modality, field.tokens, field.channels) == (modality, tokens, channels)
    for name, value in extra.items():
        assert getattr(field, name) == value, name


def test_dict_space_is_flattened_in_gato_order_with_nested_keys():
    obs = spaces.Dict(
        {
            "z_vec": spaces.Box(-1, 1, (3,), np.float32),
            "a_disc": spaces.Discrete(4),
            "mission": spaces.Text(40),
            "camera": spaces.Box(0, 255, (16, 16, 3), np.uint8),
            "arm": spaces.Dict({"joints": spaces.Box(-1, 1, (2,), np.float32), "grip": spaces.MultiBinary(1)}),
            "b_text": spaces.Text(10),
        }
    )
    spec = spec_for(obs, spaces.Box(-1, 1, (2,), np.float32))
    keys = [f.key for f in spec.observation]
    assert keys == ["b_text", "mission", "camera", "a_disc", "arm/grip", "arm/joints", "z_vec"]
    assert spec.obs_tokens == 64 + 64 + 1 + 1 + 1 + 2 + 3
    assert spec.action_tokens == 2 and spec.step_tokens == spec.obs_tokens + 1 + 2
    assert spec.field("arm/joints").modality is Modality.CONTINUOUS


def test_encode_observations_gives_steps_tokens_channels_per_field():
    obs = spaces.Dict(
        {
            "mission": spaces.Text(40),
            "image": spaces.Box(0, 255, (20, 20, 3), np.uint8),
            "pos": spaces.MultiDiscrete([4, 4], start=[-2, 0]),
            "vel": spaces.Box(-np.inf, np.inf, (3,), np.float32),
        }
    )
    spec = spec_for(obs)
    E = 3
    rng = np.random.default_rng(3)
    batch = {
        "mission": ["go", "to", "door"],
        "image": rng.integers(0, 256, (E, 20, 20, 3), dtype=np.uint8),
        "pos": np.array([[-2, 0], [1, 3], [0, 2]]),
        "vel": rng.normal(size=(E, 3)).astype(np.float32),
    }
    tokens = tk.encode_observations(spec, batch, BYTES)
    for field in spec.observation:
        assert tokens[field.key].shape == (E, field.tokens, field.channels), field.key
    assert tokens["image"].dtype == np.uint8
    assert tokens["pos"][..., 0].tolist() == [[256, 256], [259, 259], [258, 258]]  # (value - start) + offset
    back = tk.decode_observations(spec, tokens, BYTES)
    assert back["mission"] == batch["mission"]
    assert (back["pos"] == batch["pos"]).all() and (back["image"] == batch["image"]).all()
    assert back["vel"].dtype == np.float32


@pytest.mark.parametrize(
    ("space", "name"),
    [
        (spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))), "Tuple"),
        (spaces.Sequence(spaces.Discrete(2)), "Sequence"),
        (spaces.Graph(spaces.Discrete(2), None), "Graph"),
        (spaces.Box(0, 255, (8, 8, 3), np.int32), "int32"),
        (spaces.Discrete(5000), "5000"),
        (spaces.Dict({"inner": spaces.Tuple((spaces.Discrete(2),))}), "inner"),
    ],
)
def test_unsupported_observation_spaces_raise_naming_the_space(space, name):
    with pytest.raises(UnsupportedSpaceError, match=name):
        spec_for(space)


@pytest.mark.parametrize(
    ("space", "name"),
    [
        (spaces.Dict({"a": spaces.Discrete(2)}), "Dict"),
        (spaces.Text(5), "Text"),
        (spaces.Tuple((spaces.Discrete(2),)), "Tuple"),
    ],
)
def test_unsupported_action_spaces_raise_naming_the_space(space, name):
    with pytest.raises(UnsupportedSpaceError, match=name):
        spec_for(spaces.Discrete(2), space)


def test_encode_errors_name_the_field():
    spec = spec_for(spaces.Dict({"pos": spaces.Discrete(3), "vel": spaces.Box(-1, 1, (2,), np.float32)}))
    good = {"pos": np.array([0, 2]), "vel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="'vel'.*shape"):
        tk.encode_observations(spec, {**good, "vel": np.zeros((2, 3), np.float32)}, BYTES)
    with pytest.raises(ValueError, match="'pos'.*value 3 at step 1"):
        tk.encode_observations(spec, {**good, "pos": np.array([0, 3])}, BYTES)
    with pytest.raises(KeyError, match="'vel'"):
        tk.encode_observations(spec, {"pos": good["pos"]}, BYTES)


# --------------------------------------------------------------------------------------------- actions


@pytest.mark.parametrize("n", [1, 3, 18, 1024])
def test_legal_mask_for_discrete_n_allows_exactly_n_value_ids(n):
    spec = spec_for(spaces.Discrete(2), spaces.Discrete(n, start=-1))
    mask = tk.legal_action_mask(spec)
    assert mask.shape == (1, VOCAB.size) and mask.dtype == np.bool_
    assert mask.sum() == n
    assert mask[0, VOCAB.value_offset : VOCAB.value_offset + n].all()
    # every id encode_actions can produce is legal
    ids = tk.encode_actions(spec, np.arange(-1, n - 1))["action"][:, 0, 0]
    assert mask[0, ids].all()


def test_legal_mask_multidiscrete_and_continuous():
    spec = spec_for(spaces.Discrete(2), spaces.MultiDiscrete([2, 5, 3]))
    assert tk.legal_action_mask(spec).sum(1).tolist() == [2, 5, 3]
    spec = spec_for(spaces.Discrete(2), spaces.Box(-1, 1, (4,), np.float32))
    mask = tk.legal_action_mask(spec)
    assert mask.shape == (4, VOCAB.size)
    lo, hi = VOCAB.ranges()["value"]
    assert mask[:, lo:hi].all() and mask.sum() == 4 * VOCAB.value_bins


@FAST
@given(st.data())
@pytest.mark.parametrize(
    "space",
    [
        spaces.Discrete(7, start=-3),
        spaces.MultiDiscrete([[2, 9], [4, 1]], start=[[0, 5], [-2, 10]]),
        spaces.MultiBinary(6),
        spaces.MultiBinary((2, 3)),
        spaces.Box(0, 9, (3,), np.int32),
    ],
    ids=lambda s: type(s).__name__,
)
def test_discrete_actions_round_trip_exactly(space, data):
    spec = spec_for(spaces.Discrete(2), space)
    seed = data.draw(st.integers(0, 2**31 - 1))
    space.seed(seed)
    E = data.draw(st.integers(1, 8))
    actions = np.stack([space.sample() for _ in range(E)])
    ids = tk.encode_actions(spec, actions)["action"]
    assert ids.shape == (E, spec.action_tokens, 1) and ids.dtype == np.int64
    back = tk.decode_actions(spec, ids)
    assert back.dtype == space.dtype and back.shape == actions.shape
    assert (back == actions).all()
    assert all(space.contains(a) for a in back)
    assert (tk.decode_actions(spec, ids[..., 0]) == actions).all()  # (E, T) accepted too


@FAST
@given(st.data())
def test_bounded_continuous_actions_decode_within_half_a_bin(data):
    low = np.array([-1.0, 0.0, -400.0], np.float32)
    high = np.array([1.0, 0.05, 1200.0], np.float32)
    space = spaces.Box(low, high, dtype=np.float32)
    spec = spec_for(spaces.Discrete(2), space)
    unit = data.draw(hnp.arrays(np.float64, (5, 3), elements=st.floats(0, 1)))
    actions = (low + unit * (high - low)).astype(np.float32)
    back = tk.decode_actions(spec, tk.encode_actions(spec, actions)["action"])
    assert back.dtype == np.float32 and all(space.contains(a) for a in back)
    tol = HALF_BIN * (high.astype(np.float64) - low) / 2 * 2  # half a bin of [-1,1] scaled by (high-low)/2
    assert (np.abs(back.astype(np.float64) - actions) <= tol + 1e-6 * np.abs(high)).all()
    # bounded actions are scaled linearly, not mu-law: the bounds land in the edge bins
    edges = tk.encode_actions(spec, np.stack([low, high]))["action"][..., 0] - VOCAB.value_offset
    assert edges.tolist() == [[0] * 3, [VOCAB.value_bins - 1] * 3]


def test_out_of_bounds_continuous_actions_clip_and_unbounded_use_mu_law():
    space = spaces.Box(np.array([-1.0, -np.inf]), np.array([1.0, np.inf]), dtype=np.float64)
    spec = spec_for(spaces.Discrete(2), space)
    actions = np.array([[5.0, 3.0], [-5.0, -1000.0]])
    ids = tk.encode_actions(spec, actions)["action"][..., 0] - VOCAB.value_offset
    assert ids[:, 0].tolist() == [VOCAB.value_bins - 1, 0]  # clipped to the bounds
    expected = tk.discretize(tk.mu_law_encode(actions[:, 1]))  # the unbounded component is mu-law encoded
    assert ids[:, 1].tolist() == expected.tolist()
    back = tk.decode_actions(spec, ids + VOCAB.value_offset)
    assert np.abs(tk.mu_law_encode(back[:, 1]) - np.clip(tk.mu_law_encode(actions[:, 1]), -1, 1)).max() <= HALF_BIN


def test_continuous_action_values_are_each_ids_decoded_value():
    box = spaces.Box(np.array([-3.0, -np.inf], np.float32), np.array([3.0, np.inf], np.float32), dtype=np.float32)
    spec = spec_for(spaces.Discrete(2), box)
    values = tk.continuous_action_values(spec)
    lo, bins = VOCAB.value_offset, VOCAB.value_bins
    assert values.shape == (2, VOCAB.size)
    for v in (0, 1, bins // 2, bins - 1):
        np.testing.assert_allclose(values[:, lo + v], tk.decode_actions(spec, np.array([[lo + v, lo + v]]))[0])
    # Bounded: evenly spaced bin centres from low to high; unbounded: mu-law, increasing but not even.
    np.testing.assert_allclose(values[0, lo : lo + 2], [-3.0 + 3.0 / bins, -3.0 + 9.0 / bins], rtol=1e-5)
    steps = np.diff(values[1, lo : lo + bins])
    assert (steps > 0).all() and steps.max() > 10 * steps.min()
    assert not values[:, :lo].any() and not values[:, lo + bins :].any()  # not value ids
    assert tk.continuous_action_values(spec_for(spaces.Discrete(2), spaces.Discrete(3))) is None


def test_decode_actions_rejects_illegal_ids():
    spec = spec_for(spaces.Discrete(2), spaces.Discrete(3))
    with pytest.raises(ValueError, match="'action'.*id"):
        tk.decode_actions(spec, np.array([[VOCAB.value_offset + 3]]))
    with pytest.raises(ValueError, match="'action'.*id"):
        tk.decode_actions(spec, np.array([[VOCAB.separator]]))
