"""Experts reach their measured returns; random and RLlib policies follow the acting protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium import spaces

from mugato_ray import envs, experts, ppo, tasks
from mugato_ray.atari_experts import AtariRAMPolicy
from mugato_ray.config import Config, PPOConfig, load_config
from mugato_ray.experts import RandomPolicy, make_expert
from mugato_ray.rollout import PolicySpec, measure_returns
from mugato_ray.tasks import TaskInfo

# Documented (measured) mean over seeds 0..99, minus a margin for other seeds; random is far below each.
SCRIPTED_FLOOR = {
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "MountainCar-v0": -130.0,
    "Pendulum-v1": -250.0,
    "InvertedPendulum-v5": 950.0,
    "InvertedDoublePendulum-v5": 9300.0,
    "Reacher-v5": -4.5,
}
# Seeds 100.. per task: 20, fewer where an episode is long and slow (1000 RK4 steps of 5 substeps).
SCRIPTED_SEEDS = {"InvertedDoublePendulum-v5": 8}
BABYAI = [n for n, t in tasks.TASKS.items() if t.expert == "babyai_bot"]


def measure(name, kind, seeds, num_envs):
    """Returns of the task's expert or of RandomPolicy, measured as references are (no task entries)."""
    return measure_returns(name, PolicySpec(kind), Config(), seeds, num_envs=num_envs)


@pytest.mark.parametrize("name", sorted(SCRIPTED_FLOOR))
def test_scripted_expert_reaches_its_documented_return(name):
    stats = measure(name, "expert", range(100, 100 + SCRIPTED_SEEDS.get(name, 20)), num_envs=4)
    assert stats.mean_return >= SCRIPTED_FLOOR[name]
    expert_ref, random_ref = tasks.reference_returns(name)
    assert stats.mean_return >= expert_ref - 0.25 * abs(expert_ref - random_ref)
    assert all(stats.successes), stats.returns  # every episode meets the task's success criterion


@pytest.mark.parametrize("name", sorted(SCRIPTED_FLOOR))
def test_scripted_controller_is_row_independent(name):
    """Vectorized over envs: acting on a batch equals acting on each row alone."""
    env = envs.make_env(name)
    obs = np.stack([env.observation_space.sample() for _ in range(16)]).astype(np.float64)
    controller = experts.SCRIPTED[tasks.get_task(name).expert.split(":")[1]]
    batch = controller(obs)
    assert batch.shape[0] == 16
    assert np.array_equal(batch, np.concatenate([controller(obs[i : i + 1]) for i in range(16)]))
    assert all(env.action_space.contains(a) for a in batch)


def test_babyai_bot_succeeds_on_its_levels():
    """About 100 episodes in all, a different seed range per level (each level was measured on 100 seeds)."""
    per_level = -(-100 // len(BABYAI))
    results = [measure(name, "expert", range(i * per_level, (i + 1) * per_level), num_envs=4)
               for i, name in enumerate(BABYAI)]
    successes = {name: stats.successes for name, stats in zip(BABYAI, results)}
    assert all(len(s) == per_level for s in successes.values())  # no episode lost to an error
    assert all(np.mean(s) >= 0.9 for s in successes.values()), successes
    assert np.mean([s for level in successes.values() for s in level]) >= 0.99


def double_pendulum_lqr_gain() -> np.ndarray:
    """How experts.DOUBLE_PENDULUM_LQR_GAIN was derived: linearize InvertedDoublePendulum-v5's own MuJoCo model
    around the upright rest state (central differences of one control step, frame_skip mj_steps) to
    s' = A s + B u on s = (qpos, qvel), then iterate the discrete Riccati recursion with Q = I, R = 1."""
    import mujoco

    env = envs.make_env("InvertedDoublePendulum-v5").unwrapped
    model, data = env.model, env.data

    def step(state_6, u):
        mujoco.mj_resetData(model, data)
        data.qpos[:], data.qvel[:], data.ctrl[:] = state_6[:3], state_6[3:], u
        mujoco.mj_step(model, data, nstep=env.frame_skip)
        return np.concatenate([data.qpos, data.qvel])

    eps, zero = 1e-6, np.zeros(6)
    A_6x6 = np.stack([(step(eps * e, 0.0) - step(-eps * e, 0.0)) / (2 * eps) for e in np.eye(6)], axis=1)
    B_6x1 = ((step(zero, eps) - step(zero, -eps)) / (2 * eps))[:, None]
    Q, R = np.eye(6), np.eye(1)
    P = Q
    for _ in range(2000):  # converges in ~220 iterations
        K_1x6 = np.linalg.solve(R + B_6x1.T @ P @ B_6x1, B_6x1.T @ P @ A_6x6)
        P = Q + A_6x6.T @ P @ (A_6x6 - B_6x1 @ K_1x6)
    assert np.max(np.abs(np.linalg.eigvals(A_6x6 - B_6x1 @ K_1x6))) < 1  # the closed loop is stable
    return K_1x6[0]


def test_double_pendulum_gain_is_the_lqr_of_the_env_model():
    np.testing.assert_allclose(experts.DOUBLE_PENDULUM_LQR_GAIN, double_pendulum_lqr_gain(), rtol=1e-3)


def test_episode_results_do_not_depend_on_batch_slots():
    """Random CartPole with 1 env and with 3 envs in lockstep: same return for every seed."""
    seeds = [11, 12, 13, 14, 15]
    one = measure("CartPole-v1", "random", seeds, num_envs=1)
    three = measure("CartPole-v1", "random", seeds, num_envs=3)
    assert np.array_equal(one.returns, three.returns) and np.array_equal(one.lengths, three.lengths)
    other = measure("CartPole-v1", "random", [s + 100 for s in seeds], num_envs=3)
    assert not np.array_equal(one.returns, other.returns)


def test_more_envs_than_seeds():
    stats = measure("Acrobot-v1", "expert", [3], num_envs=4)
    assert stats.lengths.shape == (1,) and stats.lengths[0] > 0 and stats.successes == [True]


def test_measuring_raises_on_env_errors_unless_told_to_skip_them():
    """An episode lost to an env error is an error when measuring; skip_failed leaves it out (snapshot scoring)."""
    import dataclasses

    crashing = dataclasses.replace(tasks.get_task("CartPole-v1"), name="CartPole-crash",
                                   wrappers=("crash_at_step:5:2,4",))
    with pytest.raises(RuntimeError, match=r"2 episode\(s\) lost to env errors: seed 2: .*crash_at_step"):
        measure_returns(crashing, PolicySpec("random"), Config(), range(6), num_envs=2)
    stats = measure_returns(crashing, PolicySpec("random"), Config(), range(6), num_envs=2, skip_failed=True)
    clean = measure("CartPole-v1", "random", [0, 1, 3, 5], num_envs=2)
    assert stats.seeds.tolist() == [0, 1, 3, 5] and np.array_equal(stats.returns, clean.returns)


@pytest.mark.parametrize(
    "space",
    [
        spaces.Discrete(5, start=-2),
        spaces.Box(-2.0, 2.0, (3,), np.float32),
        spaces.MultiDiscrete([3, 4]),
    ],
    ids=["discrete", "box", "multidiscrete"],
)
def test_random_policy_is_seeded_per_episode_not_per_slot(space):
    a, b = RandomPolicy(space, 3), RandomPolicy(space, 3)
    a.reset([0, 1, 2], [5, 6, 7])
    b.reset([2, 0, 1], [5, 6, 7])  # seed 5 runs in slot 2 of b
    seq_a = np.stack([a.act({}) for _ in range(20)])
    seq_b = np.stack([b.act({}) for _ in range(20)])
    assert np.array_equal(seq_a[:, 0], seq_b[:, 2])  # seed 5
    assert np.array_equal(seq_a[:, 2], seq_b[:, 1])  # seed 7
    assert not np.array_equal(seq_a[:, 0], seq_a[:, 1])  # different seeds differ
    assert all(space.contains(x.astype(space.dtype)) for x in seq_a.reshape(-1, *space.shape))
    assert seq_a.dtype == space.dtype and seq_a.shape == (20, 3, *space.shape)


def test_random_policy_needs_a_reset():
    policy = RandomPolicy(spaces.Discrete(2), 2)
    policy.reset([0], [1])
    with pytest.raises(RuntimeError, match=r"envs \[1\] were never reset"):
        policy.act({})


def test_make_expert_dispatch():
    env = envs.make_env("CartPole-v1")
    assert isinstance(make_expert("CartPole-v1", [env]), experts.ScriptedPolicy)
    assert isinstance(
        make_expert("BabyAI-GoToLocal-v0", [envs.make_env("BabyAI-GoToLocal-v0")]), experts.BabyAIBotPolicy
    )
    pong = envs.make_env("ALE/Pong-v5")
    assert isinstance(make_expert("ALE/Pong-v5", [pong]), AtariRAMPolicy)
    with pytest.raises(ValueError, match="task 'Pong-none' has no expert"):
        make_expert(TaskInfo("Pong-none", "atari", "ALE/Pong-v5"), [])
    with pytest.raises(FileNotFoundError, match="not an RLlib"):
        make_expert(TaskInfo("CartPole-x", "classic", "CartPole-v1", expert="rllib:/nonexistent/dir"), [env])


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        # address="local": a fresh instance even if a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_ppo_expert_checkpoint_loads_and_acts(local_ray, tmp_path):
    """A tiny PPO run writes a checkpoint that RLlibPolicy (through make_expert) loads and acts with."""
    cfg = Config(run_dir=str(tmp_path / "run"))
    knobs = PPOConfig(iterations=1, train_batch_size=128, minibatch_size=64, num_epochs=1, hidden=[16], seed=cfg.seed)
    path = ppo.train_ppo_expert("CartPole-v1", knobs, ppo.expert_dir(cfg, "CartPole-v1"), log=lambda s: None)
    assert path == tmp_path / "run" / "experts" / "CartPole-v1"
    assert json.loads((path / "expert.json").read_text())["env_steps"] >= 128
    assert not list(path.parent.glob(".*tmp*"))  # the temporary save folder was swapped in
    info = TaskInfo("CartPole-ppo", "classic", "CartPole-v1", expert=f"rllib:{path}")
    env_list = [envs.make_env(info) for _ in range(3)]
    policy = make_expert(info, env_list)
    assert isinstance(policy, experts.RLlibPolicy)
    obs = np.stack([e.reset(seed=i)[0] for i, e in enumerate(env_list)])
    actions = policy.act({"observation": obs})
    assert actions.shape == (3,) and actions.dtype == np.int64
    assert all(env_list[0].action_space.contains(a) for a in actions)
    # Greedy: the same observations give the same actions.
    assert np.array_equal(actions, policy.act({"observation": obs}))
    stats = measure_returns(info, policy, cfg, [0, 1, 2], num_envs=3)
    assert np.all(stats.lengths > 0) and stats.seeds.tolist() == [0, 1, 2]


def test_train_expert_job_smoke(local_ray, tmp_path, capsys):
    """jobs/train_expert.py with configs/expert_ppo.yaml and a tiny budget trains, saves and scores an expert."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_expert_job", root / "jobs" / "train_expert.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    job.main(
        [
            "--config", str(root / "configs" / "expert_ppo.yaml"), "--task", "CartPole-v1", "ppo.iterations=1",
            "ppo.train_batch_size=128", "ppo.minibatch_size=64", "ppo.num_epochs=1", "ppo.eval_episodes=2",
            f"run_dir={tmp_path}",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "CartPole-v1: greedy mean return" in out
    assert (tmp_path / "experts" / "CartPole-v1" / "expert.json").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert "over 2 episodes" in out
    assert load_config(tmp_path / "config.yaml").ppo.iterations == 1  # the run records its PPO knobs
