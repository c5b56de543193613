"""Fuzzing configs and policy observations: every rejection is the project's own error, naming the key or
the field (episodes and store rows are fuzzed in tests/test_episodes.py)."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mugato_ray.config import Config, ConfigError, TokenizerConfig, config_from_dict
from mugato_ray.specs import space_spec
from mugato_ray.tokenizer import ByteTokenizer, encode_observations, make_vocab

SECTIONS = ["tokenizer", "model", "data", "train", "rollout", "eval", "ppo", "online"]
FIELDS = {name: [f for f in getattr(Config(), name).__dataclass_fields__] for name in SECTIONS}


def garbage():
    return st.one_of(
        st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )


@st.composite
def configs(draw):
    data = {}
    for name in draw(st.lists(st.sampled_from(SECTIONS), max_size=4, unique=True)):
        keys = st.one_of(st.sampled_from(FIELDS[name]), st.text(max_size=6))
        data[name] = draw(st.one_of(garbage(), st.dictionaries(keys, garbage(), max_size=4)))
    if draw(st.booleans()):
        data["tasks"] = draw(st.one_of(garbage(), st.lists(st.one_of(
            garbage(), st.fixed_dictionaries({"name": st.sampled_from(["CartPole-v1", "x"])},
                                             optional={"weight": garbage(), "episodes": garbage(),
                                                       "window": garbage()})), max_size=3)))
    if draw(st.booleans()):
        data[draw(st.text(max_size=6))] = draw(garbage())
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
@example({"tasks": [{}]})  # a task without its required name once escaped as a TypeError
def test_any_config_is_built_or_rejected_with_a_config_error_naming_a_key(data):
    try:
        cfg = config_from_dict(data, where="fuzz.yaml")
    except ConfigError as e:
        assert "fuzz.yaml" in str(e) and ("key" in str(e) or "'" in str(e)), str(e)
    else:
        assert isinstance(cfg, Config)


_CFG = TokenizerConfig(max_text_tokens=8)
_SPEC = space_spec(
    spaces.Dict({
        "mission": spaces.Text(max_length=20),
        "image": spaces.Box(0, 255, (16, 16, 3), np.uint8),
        "direction": spaces.Discrete(4),
        "pos": spaces.Box(-1.0, 1.0, (2,), np.float32),
    }),
    spaces.Discrete(3), _CFG, make_vocab(_CFG),
)
_GOOD = {
    "mission": ["go to the ball", "open the door"],
    "image": np.zeros((2, 16, 16, 3), np.uint8),
    "direction": np.array([0, 3]),
    "pos": np.zeros((2, 2), np.float32),
}


def bad_values():
    return st.one_of(
        garbage(),
        st.lists(st.text(max_size=30), max_size=3),
        st.builds(lambda v, shape: np.full(shape, v), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from([(2,), (2, 2), (2, 3), (2, 16, 16, 3), (1, 2)])),
        st.builds(lambda v, shape: np.full(shape, v, np.int64), st.integers(-10**6, 10**6),
                  st.sampled_from([(2,), (2, 2), (2, 16, 16, 3)])),
    )


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_GOOD)), bad_values())
def test_a_garbage_observation_field_is_encoded_or_rejected_naming_the_field(key, value):
    observations = dict(_GOOD) | {key: value}
    try:
        tokens = encode_observations(_SPEC, observations, ByteTokenizer())
    except (ValueError, KeyError) as e:
        assert repr(key) in str(e), str(e)
    else:
        assert all(np.asarray(t).shape[0] == len(t) for t in tokens.values())


def test_a_missing_observation_field_is_named():
    try:
        encode_observations(_SPEC, {k: v for k, v in _GOOD.items() if k != "pos"}, ByteTokenizer())
    except KeyError as e:
        assert "'pos'" in str(e)
    else:
        raise AssertionError("a missing field was accepted")
