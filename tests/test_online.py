"""Online experience: DAgger labels, weight publishing, the store read again at every pass, retention,
resources, and a run whose online episodes reach the training stream before it ends."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from mugato_ray import experts
from mugato_ray.config import ConfigError, config_from_dict
from mugato_ray.data import ONLINE_KEY, PATH_KEY, WindowSampler
from mugato_ray.episodes import read_episodes, store_dir, write_episodes
from mugato_ray.learner import build_model
from mugato_ray.online import DAggerPolicy, OnlineWorker, retain
from mugato_ray.resolve import resolve_task, resolve_tasks
from mugato_ray.resources import plan_resources
from mugato_ray.rollout import RolloutWorker
from mugato_ray.store_source import REPEAT_KEY, StoreDatasource, online_repeat
from mugato_ray.weights import WeightBoard, publish_weights


@pytest.fixture(scope="module")
def ray_local():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def make_cfg(tmp_path, *, tasks=("CartPole-v1",), **sections):
    data = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "context": 64},
        "tokenizer": {"max_text_tokens": 16},
        "rollout": {"num_actors": 1, "envs_per_actor": 2, "actor_cpus": 0.25},
        "tasks": [{"name": n, "episodes": 4} for n in tasks],
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


# ------------------------------------------------------------------------------------------- DAgger


def test_dagger_labels_are_the_scripted_experts_actions_on_the_states_the_learner_visits(tmp_path):
    cfg = make_cfg(tmp_path)
    task = resolve_task("CartPole-v1", cfg)
    space = task.info  # the random learner needs the env's action space: built from the worker's envs

    def factory(envs):
        learner = experts.RandomPolicy(envs[0].action_space, len(envs))
        return DAggerPolicy(learner, experts.make_expert(space, envs), len(envs), beta=0.0)

    worker = RolloutWorker(task, factory, cfg, num_envs=2)
    eps = worker.sample([5, 6, 7], source="dagger", policy_step=3).episodes
    expert_eps = RolloutWorker(task, experts.make_expert(space, worker.envs), cfg, num_envs=2).sample([5, 6, 7]).episodes
    for ep, ref in zip(eps, expert_eps):
        obs = ep.observations["observation"]
        np.testing.assert_array_equal(ep.actions, experts.cartpole(obs))  # every label is the expert's action
        assert ep.policy_step == 3 and ep.episode_id == f"CartPole-v1-dagger-w3-{ep.seed}" and ep.source == "dagger"
        assert ep.length < ref.length  # the random learner drove: not the expert's 500-step episodes


def test_dagger_labels_the_babyai_bot_along_the_learners_trajectory(tmp_path):
    """The bot is told each executed (random) action and replans: its labels equal those of a fresh bot
    replayed along the same trajectory."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    from mugato_ray.envs import flatten_observation, make_env, stack_observations

    cfg = make_cfg(tmp_path, tasks=("BabyAI-GoToRedBall-v0",))
    task = resolve_task("BabyAI-GoToRedBall-v0", cfg)

    def factory(envs):
        learner = experts.RandomPolicy(envs[0].action_space, len(envs))
        return DAggerPolicy(learner, experts.make_expert(task.info, envs), len(envs), beta=0.0)

    result = RolloutWorker(task, factory, cfg, num_envs=2).sample(list(range(10, 16)), source="dagger")
    eps = result.episodes
    # A random learner often opens a box, after which the bot cannot label: those episodes end there.
    assert len(eps) == 6 and not result.failed and any(not ep.terminated for ep in eps)
    for ep in eps:
        env = make_env(task.info)
        raw, _ = env.reset(seed=ep.seed)
        random = experts.RandomPolicy(env.action_space, 1)
        random.reset([0], [ep.seed])
        bot, taken, labels, executed = BabyAIBot(env.unwrapped), None, [], []
        for _ in range(ep.length):
            labels.append(int(bot.replan(taken)))
            taken = int(random.act(stack_observations([flatten_observation(raw, env.observation_space)]))[0])
            executed.append(taken)
            raw, *_ = env.step(taken)
        assert labels == ep.actions.tolist()
        assert executed == ep.executed.tolist()  # the learner's actions, what the observations followed
        env.close()


def test_dagger_beta_one_is_the_expert_driving(tmp_path):
    cfg = make_cfg(tmp_path)
    task = resolve_task("CartPole-v1", cfg)

    def factory(envs):
        learner = experts.RandomPolicy(envs[0].action_space, len(envs))
        return DAggerPolicy(learner, experts.make_expert(task.info, envs), len(envs), beta=1.0)

    eps = RolloutWorker(task, factory, cfg, num_envs=2).sample([1, 2], source="dagger").episodes
    assert [ep.episode_return for ep in eps] == [500.0, 500.0]
    assert [ep.executed for ep in eps] == [None, None]  # the expert drove: its labels were executed


# ------------------------------------------------------------------------------------------- weights


def test_published_weights_change_the_actors_actions_and_episodes_carry_their_step(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, online={"mode": "self_imitation", "min_return_fraction": 0.0, "envs_per_actor": 2},
                   data={"sources": ["expert", "policy"]})
    tasks = resolve_tasks(cfg)
    board = ray.remote(WeightBoard).remote()
    worker = OnlineWorker(cfg, tasks, board)
    vocab = tasks["CartPole-v1"].spec.vocab

    def model(seed):
        torch.manual_seed(seed)
        return build_model(cfg, vocab)

    publish_weights(board, model(0), 0)
    first = worker.run_round("CartPole-v1", [100, 101], beta=0.0)
    publish_weights(board, model(1), 10)
    publish_weights(board, model(2), 5)  # older than what the board holds: ignored
    second = worker.run_round("CartPole-v1", [100, 101], beta=0.0)
    assert (first.policy_step, second.policy_step) == (0, 10)
    stored = {ep.episode_id: ep for ep in read_episodes(store_dir(cfg, "CartPole-v1"))}
    a = [stored[f"CartPole-v1-policy-w0-{s}"] for s in (100, 101)]
    b = [stored[f"CartPole-v1-policy-w10-{s}"] for s in (100, 101)]
    assert all(ep.policy_step == 0 for ep in a) and all(ep.policy_step == 10 for ep in b)
    assert any(x.length != y.length or not np.array_equal(x.actions, y.actions) for x, y in zip(a, b))
    # A retried round (same weights, same seeds) stores nothing twice.
    again = worker.run_round("CartPole-v1", [100, 101], beta=0.0)
    assert again.rollout.files and len(read_episodes(store_dir(cfg, "CartPole-v1"))) == 4


def test_an_online_actor_killed_mid_round_is_restarted_and_stores_each_episode_once(ray_local, tmp_path):
    from mugato_ray.rollout import FaultInjection

    cfg = make_cfg(tmp_path, online={"envs_per_actor": 2})
    tasks = resolve_tasks(cfg)
    board = ray.remote(WeightBoard).remote()
    torch.manual_seed(0)
    publish_weights(board, build_model(cfg, tasks["CartPole-v1"].spec.vocab), 0)
    marker = tmp_path / "died"
    faults = FaultInjection(exit_seed=202, exit_marker=str(marker))  # a hard exit, once, inside the round
    actor = ray.remote(OnlineWorker).options(num_cpus=0.25, max_restarts=3, max_task_retries=3).remote(
        cfg, tasks, board, faults)
    result = ray.get(actor.run_round.remote("CartPole-v1", [200, 201, 202, 203], 0.5))
    assert marker.exists()  # the first attempt died
    eps = read_episodes(store_dir(cfg, "CartPole-v1"))
    assert sorted(ep.seed for ep in eps) == [200, 201, 202, 203] and len(result.rollout.outcomes) == 4
    assert not [f for f in store_dir(cfg, "CartPole-v1").iterdir() if f.name.startswith(".")]  # nothing half-written
    ray.kill(actor)


# ------------------------------------------------------------------------------------------- the store


def _write(folder, task, source, seeds, spec, policy_step=None):
    from mugato_ray.data import synthetic_episodes

    eps = synthetic_episodes(task, spec, len(seeds), seed=seeds[0], length=(3, 6))
    for ep, s in zip(eps, seeds):
        ep.source, ep.seed, ep.policy_step = source, s, policy_step
        ep.episode_id = f"{task}-{source}-{s}"
    return write_episodes(folder, eps, name=f"{source}-{seeds[0]}.parquet", spec=spec)[0]


def test_store_source_lists_new_files_at_every_execution_and_weights_online_rows(ray_local, tmp_path):
    cfg = make_cfg(tmp_path)
    spec = resolve_task("CartPole-v1", cfg).spec
    folder = tmp_path / "store"
    _write(folder, "CartPole-v1", "expert", list(range(6)), spec)
    ds = ray.data.read_datasource(StoreDatasource(folder, 0.5, PATH_KEY))

    def one_pass():  # streamed, as Ray Train's shards read it: every pass executes the dataset again
        return [(r[PATH_KEY], r[REPEAT_KEY]) for r in ds.iter_rows()]

    assert len(one_pass()) == 6
    online = _write(folder, "CartPole-v1", "dagger", [100, 101], spec, policy_step=7)
    rows = one_pass()  # the new file is in
    assert len(rows) == 8
    repeat = {"dagger" in path: r for path, r in rows}
    assert repeat[False] == 1.0 and repeat[True] == pytest.approx(online_repeat(6, 2, 0.5)) == 3.0
    online.unlink()  # retention removed it: the next pass reads the rest, no error
    assert len(one_pass()) == 6


def test_window_sampler_draws_online_episodes_to_the_fraction(tmp_path):
    cfg = make_cfg(tmp_path, online={"enabled": True}, data={"sources": ["expert", "dagger"]})
    spec = resolve_task("CartPole-v1", cfg).spec
    folder = tmp_path / "store"
    path = _write(folder, "CartPole-v1", "dagger", [1, 2], spec, policy_step=0)
    table = pq.read_table(path).to_pydict()
    n = len(table["episode_id"])
    for r, want in [(1.0, 4), (2.5, 10)]:
        batch = {k: np.asarray(v, dtype=object) if k.startswith("obs.") or k in ("actions", "rewards") else np.asarray(v)
                 for k, v in table.items()}
        batch |= {PATH_KEY: np.asarray([str(path)] * n), REPEAT_KEY: np.full(n, r),
                  "window_seed": np.full(n, 0.5)}
        sampler = WindowSampler("CartPole-v1", spec, cfg, seed=0, windows=4)
        outs = list(sampler(batch))
        assert len(outs) in (int(want), int(np.ceil(want)))  # stochastic rounding of 4 * r draws
        assert all(out[ONLINE_KEY].all() for out in outs)


def test_retention_keeps_the_newest_online_episodes_and_every_demonstration(tmp_path):
    import os

    cfg = make_cfg(tmp_path)
    spec = resolve_task("CartPole-v1", cfg).spec
    folder = tmp_path / "store"
    demo = _write(folder, "CartPole-v1", "expert", [0, 1, 2], spec)
    files = [_write(folder, "CartPole-v1", "dagger", [10 * k, 10 * k + 1], spec, policy_step=k) for k in range(4)]
    for k, f in enumerate(files):
        os.utime(f, (1000 + k, 1000 + k))
    deleted = retain(folder, keep=5)
    assert deleted == [(f, 2) for f in files[:2]] and demo.exists() and all(f.exists() for f in files[2:])


# ------------------------------------------------------------------------------------------- config, resources


def test_online_config_checks_name_their_keys(tmp_path):
    with pytest.raises(ConfigError, match="online.fraction"):
        make_cfg(tmp_path, online={"fraction": 1.0})
    with pytest.raises(ConfigError, match="data.sources.*'policy'"):
        make_cfg(tmp_path, online={"enabled": True, "mode": "self_imitation"})
    with pytest.raises(ConfigError, match="online.publish_every"):
        make_cfg(tmp_path, online={"publish_every": 0})


def test_three_parties_fit_on_two_cpus_and_too_many_online_actors_is_an_error(tmp_path):
    cfg = make_cfg(tmp_path, online={"enabled": True, "num_actors": 1, "actor_cpus": 0.25},
                   train={"num_workers": 1})
    plan = plan_resources(cfg, {"CPU": 2.0})
    used = plan.train_workers * plan.cpus_per_worker + plan.data_cpus * len(cfg.tasks) + plan.online_cpus
    assert plan.online_cpus == 0.25 and plan.cpus_per_worker > 0 and used <= 2.0
    greedy = make_cfg(tmp_path, online={"enabled": True, "num_actors": 8, "actor_cpus": 0.5})
    with pytest.raises(ValueError, match="online.num_actors=8 x online.actor_cpus=0.5"):
        plan_resources(greedy, {"CPU": 2.0})
    gpu = make_cfg(tmp_path, online={"enabled": True, "num_actors": 2, "actor_gpus": 0.25},
                   train={"num_workers": 2, "use_gpu": True})
    assert plan_resources(gpu, {"CPU": 16.0, "GPU": 3.0}).online_cpus == 0.5  # 2 + 2 x 0.25 GPUs fit in 3
    with pytest.raises(ValueError, match="online.actor_gpus=0.25 GPUs next to 2 for training"):
        plan_resources(gpu, {"CPU": 16.0, "GPU": 2.0})


# ------------------------------------------------------------------------------------------- a run


def test_online_run_feeds_training_before_it_ends(ray_local, tmp_path):
    """A short DAgger run on 2 CPUs: the three parties fit, rounds use newer and newer weights, and the
    training stream reads online rows before the last step (observed in its metrics)."""
    from mugato_ray.collect import collect
    from mugato_ray.evaluate import online_lines
    from mugato_ray.pipeline import online_summary
    from mugato_ray.train import train

    cfg = make_cfg(
        tmp_path,
        # 100 steps: on a loaded machine the first online round can land after the second data pass started,
        # and the third pass is the first to read it (seen with 60 steps: no online row before the end).
        train={"steps": 100, "num_workers": 1, "log_every": 10, "checkpoint_every": 100, "warmup_steps": 5,
               "torch_threads": 1},
        data={"batch_size": 8, "num_tokenize_actors": 1, "tokenize_actor_cpus": 0.2},
        online={"enabled": True, "publish_every": 10, "episodes_per_round": 4, "envs_per_actor": 4,
                "fraction": 0.5, "keep_episodes": 400},
    )
    collect(cfg, log=lambda _: None)
    result = train(cfg)
    assert result.final_step == 100 and result.online is not None and not result.online.errors
    stored = [ep for ep in read_episodes(store_dir(cfg, "CartPole-v1")) if ep.source == "dagger"]
    assert stored and all(ep.policy_step is not None for ep in stored)
    assert len({ep.policy_step for ep in stored}) >= 2  # actors switched to newer weights between rounds
    seen = [m.get("online_rows/CartPole-v1", 0) for m in result.history]
    assert seen[-1] > 0 and any(v > 0 for v in seen[:-1])  # online rows reached training before the end
    summary = online_summary(result.online, result.history)
    # A fast machine runs more rounds than the retention bound keeps (seen: 424 stored, 400 kept).
    produced = summary["episodes"]["CartPole-v1"]
    assert summary["kept"]["CartPole-v1"] == len(stored) <= 400
    assert produced == len(stored) or produced > 400
    json.dumps(summary)  # the report section is plain JSON
    row = next(line for line in online_lines(summary) if line.startswith("| CartPole-v1"))
    assert row.startswith(f"| CartPole-v1 | {produced} | {len(stored)} |") and row.endswith(f"| {seen[-1]} |")
