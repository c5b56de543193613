"""The task registry, env construction, wrappers, flat observations and success criteria."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from mugato_ray import envs, resolve, tasks
from mugato_ray.config import Config
from mugato_ray.resolve import register_task, task_spec
from mugato_ray.tasks import TASKS, TaskInfo, get_task, reference_returns
from mugato_ray.tokenizer import Modality

ENV_TASKS = [n for n, t in TASKS.items() if t.has_env]
DATASET_TASKS = [n for n, t in TASKS.items() if not t.has_env]


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the table: registrations in a test do not leak into others."""
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    return tasks.TASKS


def test_initial_suite_is_registered():
    expected = {
        "BabyAI-GoToRedBall-v0",
        "BabyAI-GoToLocal-v0",
        "BabyAI-PickupLoc-v0",
        "BabyAI-OpenDoor-v0",
        "CartPole-v1",
        "Acrobot-v1",
        "MountainCar-v0",
        "Pendulum-v1",
        "InvertedPendulum-v5",
        "ALE/Pong-v5",
        "ALE/Breakout-v5",
        "text-arith",
        "vqa-minigrid-color",
        "text-files",
    }
    assert expected <= set(TASKS)
    assert {TASKS[n].dataset for n in DATASET_TASKS} >= {"arith", "vqa_color", "text_files"}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_row_validates(name):
    assert resolve.validate_task(TASKS[name]) is TASKS[name]
    assert get_task(name) is TASKS[name]


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'NoSuchTask-v0'.*CartPole-v1"):
        get_task("NoSuchTask-v0")


@pytest.mark.parametrize("name", ENV_TASKS)
def test_env_spaces_map_to_spec_and_flat_obs_match(name):
    cfg = Config()
    env = envs.make_env(name)
    try:
        obs, _ = env.reset(seed=3)
        assert env.observation_space.contains(obs)
        spec = task_spec(name, cfg)
        flat = envs.flatten_observation(obs, env.observation_space)
        assert sorted(flat) == sorted(f.key for f in spec.observation)
        for field in spec.observation:
            value = flat[field.key]
            if field.modality is Modality.TEXT:
                assert isinstance(value, str) and value
            else:
                assert value.shape == field.shape and value.dtype.name == field.dtype, field.key
        (action,) = spec.action
        assert action.key == "action"
        sample = np.asarray(env.action_space.sample())
        assert sample.shape == action.shape and sample.dtype.name == action.dtype
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and np.isfinite(reward)
    finally:
        env.close()


def test_babyai_wrapper_gives_text_mission_and_16_patch_image():
    spec = task_spec("BabyAI-GoToRedBall-v0", Config())
    assert [(f.key, f.modality) for f in spec.observation] == [
        ("mission", Modality.TEXT),
        ("image", Modality.IMAGE),
        ("direction", Modality.DISCRETE),
    ]
    image = spec.field("image")
    assert image.shape == (56, 56, 3) and image.tokens == 16 and image.grid == (4, 4)
    assert spec.field("direction").nvec == (4,)


def test_atari_observation_is_84x84x1_with_36_patches():
    spec = task_spec("ALE/Pong-v5", Config())
    (image,) = spec.observation
    assert image.modality is Modality.IMAGE and image.shape == (84, 84, 1)
    assert image.tokens == 36 and image.channels == 16 * 16
    assert spec.step_tokens == 36 + 1 + 1


class _FrameEnv(gym.Env):
    """Returns a fixed frame; for testing observation wrappers without ALE."""

    def __init__(self, frame: np.ndarray):
        self.frame = frame
        self.observation_space = spaces.Box(0, 255, frame.shape, np.uint8)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.frame, {}

    def step(self, action):
        return self.frame, 0.0, False, False, {}


def test_area_resize_preserves_constant_frames_and_the_mean():
    assert np.allclose(envs._area_matrix(210, 84).sum(axis=1), 1.0)
    flat = envs.AtariGray(_FrameEnv(np.full((210, 160), 77, np.uint8)))
    assert np.all(flat.reset()[0] == 77)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (210, 160), dtype=np.uint8)
    out, _ = envs.AtariGray(_FrameEnv(frame)).reset()
    assert out.shape == (84, 84, 1) and out.dtype == np.uint8
    assert abs(out.mean() - frame.mean()) < 0.5  # area averaging keeps the mean (up to rounding)
    # A left/right split frame stays split: the resize keeps geometry, not just statistics.
    split = np.zeros((210, 160), np.uint8)
    split[:, 80:] = 200
    out, _ = envs.AtariGray(_FrameEnv(split)).reset()
    assert np.all(out[:, :42] == 0) and np.all(out[:, 42:] == 200)


def test_area_resize_of_rgb_uses_luma():
    frame = np.zeros((210, 160, 3), np.uint8)
    frame[..., 1] = 100  # pure green
    out, _ = envs.AtariGray(_FrameEnv(frame)).reset()
    assert np.all(out == round(0.587 * 100))


def test_float32_obs_wrapper():
    env = envs.make_env("InvertedPendulum-v5")
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and env.observation_space.dtype == np.float32


def test_flatten_nested_dict_and_stack():
    space = spaces.Dict(
        {
            "pos": spaces.Box(-1, 1, (2,), np.float32),
            "inner": spaces.Dict({"k": spaces.Discrete(3), "msg": spaces.Text(10)}),
        }
    )
    obs = {"pos": [0.5, -0.5], "inner": {"k": 2, "msg": "hi"}}
    flat = envs.flatten_observation(obs, space)
    assert set(flat) == {"pos", "inner/k", "inner/msg"}
    assert flat["pos"].dtype == np.float32 and flat["inner/k"].dtype == np.int64 and flat["inner/msg"] == "hi"
    stacked = envs.stack_observations([flat, {**flat, "inner/msg": "yo"}])
    assert stacked["pos"].shape == (2, 2) and stacked["inner/k"].shape == (2,)
    assert stacked["inner/msg"] == ["hi", "yo"]
    assert envs.flatten_observation(np.zeros(3), spaces.Box(-1, 1, (3,)))["observation"].shape == (3,)
    with pytest.raises(ValueError, match="observation 1 has keys"):
        envs.stack_observations([flat, {"pos": flat["pos"]}])


def test_time_limit_from_the_table(registry):
    register_task(TaskInfo("CartPole-short", "classic", "CartPole-v1", expert="scripted:cartpole", max_episode_steps=5))
    env = envs.make_env("CartPole-short")
    env.reset(seed=0)
    truncated = [env.step(0)[3] for _ in range(5)]  # action 0 alone would not end an episode in 4 steps
    assert truncated == [False] * 4 + [True]


def test_a_new_gymnasium_task_needs_only_a_row(registry):
    register_task(TaskInfo("FrozenLake-v1", "classic", "FrozenLake-v1", env_kwargs={"is_slippery": False}))
    spec = task_spec("FrozenLake-v1", Config())
    assert spec.observation[0].modality is Modality.DISCRETE and spec.observation[0].nvec == (16,)
    assert envs.make_env("FrozenLake-v1").spec.kwargs["is_slippery"] is False
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskInfo("FrozenLake-v1", "classic", "FrozenLake-v1"))
    register_task(TaskInfo("FrozenLake-v1", "classic", "FrozenLake-v1"), replace=True)
    assert "is_slippery" not in envs.make_env("FrozenLake-v1").spec.kwargs  # the replaced row counts


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(domain="space"), "domain must be one of"),
        (dict(wrappers=("nope",)), "unknown wrapper 'nope'"),
        (dict(wrappers=("crash_at_step",)), "needs ':<arg>'"),
        (dict(expert="scripted:nope"), "unknown scripted expert 'nope'"),
        (dict(expert="oracle"), "bad expert 'oracle'"),
        (dict(success="return_at_least:lots"), "bad success criterion"),
        (dict(success="happy"), "unknown success criterion 'happy'"),
        (dict(env_id=None), "needs env_id"),
        (dict(max_episode_steps=0), "max_episode_steps"),
    ],
)
def test_bad_rows_are_rejected_naming_the_task(registry, bad, message):
    row = dataclasses.replace(TaskInfo("Bad-v0", "classic", "CartPole-v1"), **bad)
    with pytest.raises(ValueError, match=message) as err:
        register_task(row)
    assert "Bad-v0" in str(err.value)
    assert "Bad-v0" not in registry


def test_dataset_tasks_have_no_env_and_delegate_their_spec():
    with pytest.raises(ValueError, match="dataset task"):
        envs.make_env("text-arith")
    cfg = Config()
    text = task_spec("text-arith", cfg)
    assert text.observation == () and [f.key for f in text.action] == ["text"]
    assert text.action[0].modality is Modality.TEXT
    vqa = task_spec("vqa-minigrid-color", cfg)
    assert [f.key for f in vqa.action] == ["answer"]
    assert {f.modality for f in vqa.observation} == {Modality.IMAGE, Modality.TEXT}


@pytest.mark.parametrize("name", ENV_TASKS)
def test_reference_returns_are_measured(name):
    expert, random = reference_returns(name)
    assert random is not None
    if TASKS[name].expert == "none":
        assert expert is None
    else:
        assert expert is not None and expert > random


def test_reference_returns_unknown_and_unmeasured(registry):
    with pytest.raises(ValueError, match="unknown task"):
        reference_returns("NoSuchTask-v0")
    register_task(TaskInfo("FrozenLake-v1", "classic", "FrozenLake-v1"))
    assert reference_returns("FrozenLake-v1") == (None, None)
    assert reference_returns("text-arith") == (None, None)


def test_success_criteria():
    assert envs.is_success("BabyAI-GoToLocal-v0", 0.8, True) is True
    assert envs.is_success("BabyAI-GoToLocal-v0", 0.0, True) is False
    assert envs.is_success("CartPole-v1", 475.0, False) is True
    assert envs.is_success("CartPole-v1", 474.0, False) is False
    assert envs.is_success("MountainCar-v0", -200.0, False) is False  # truncated by the time limit
    assert envs.is_success("MountainCar-v0", -120.0, True) is True
    assert envs.is_success("ALE/Pong-v5", 21.0, True) is None
    # Reacher: the last step's info says how far the fingertip ended from the target.
    assert envs.is_success("Reacher-v5", -5.0, False, {"reward_dist": -0.01}) is True
    assert envs.is_success("Reacher-v5", -1.0, False, {"reward_dist": -0.03}) is False
    assert envs.is_success("Reacher-v5", -1.0, False, {}) is False  # ended without a step's info
    reach = envs.success_criterion("info_at_least:a:b:-1.5")  # the key may hold colons; the number is last
    assert reach(0.0, False, {"a:b": -1.0}) and not reach(0.0, False, {"a:b": -2.0})
    for bad in ("info_at_least:-0.02", "info_at_least:reward_dist:near"):
        with pytest.raises(ValueError, match="bad success criterion"):
            envs.success_criterion(bad)


def test_crash_at_step_raises_only_for_chosen_seeds():
    env = envs.apply_wrappers(gym.make("CartPole-v1"), ["crash_at_step:3:7,9"])
    env.reset(seed=1)
    for t in range(5):  # seed 1 is not chosen: no crash at step 3
        env.step(t % 2)
    env.reset(seed=7)
    env.step(0)
    env.step(1)
    with pytest.raises(RuntimeError, match="step 3 of the episode with seed 7"):
        env.step(0)
