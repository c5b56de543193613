"""The rollout worker: valid, seed-determined episodes; env errors and actor deaths; GATO's return filter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray

from mugato_ray import envs
from mugato_ray.config import config_from_dict
from mugato_ray.episodes import read_episodes, store_dir
from mugato_ray.rollout import FaultInjection, PolicySpec, RolloutActor, RolloutWorker
from mugato_ray.tasks import get_task

STEPS = 60  # episode cap: CartPole's expert would otherwise run 500 steps


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict({"run_dir": str(tmp_path / "run"),
                             "rollout": {"envs_per_actor": 3, "max_episode_steps": STEPS}})


def same(a, b) -> bool:
    """Episodes equal in everything a rollout records."""
    return (a.episode_id == b.episode_id and a.seed == b.seed and a.terminated == b.terminated
            and a.success == b.success and np.array_equal(a.actions, b.actions)
            and np.array_equal(a.rewards, b.rewards) and a.observations.keys() == b.observations.keys()
            and all(np.array_equal(a.observations[k], b.observations[k]) for k in a.observations))


def test_expert_episodes_are_valid_and_complete(cfg):
    worker = RolloutWorker("CartPole-v1", PolicySpec("expert"), cfg)
    seeds = [7, 3, 11, 5, 9]
    res = worker.sample(seeds)
    assert [ep.seed for ep in res.episodes] == seeds  # requested order, whatever slot finished first
    assert res.failed == [] and res.filtered == 0 and res.files == []
    for ep in res.episodes:
        ep.validate(worker.spec)
        assert ep.episode_id == f"CartPole-v1-expert-{ep.seed}" and ep.source == "expert"
        # The expert balances past the cap: every episode is cut at exactly STEPS, not terminated.
        assert ep.length == STEPS and not ep.terminated
        assert ep.observations["observation"].shape == (STEPS, 4) and ep.actions.dtype == np.int64
        assert np.all(ep.rewards == 1.0)
    assert res.env_steps == STEPS * len(seeds)
    assert res.returns == [ep.episode_return for ep in res.episodes]


def test_episode_depends_only_on_its_seed(cfg):
    """Same seeds -> identical episodes, whatever the number of envs, slot or order; other seeds differ."""
    for kind in ("expert", "random"):
        a = RolloutWorker("CartPole-v1", PolicySpec(kind), cfg, num_envs=3).sample([0, 1, 2, 3, 4])
        b = RolloutWorker("CartPole-v1", PolicySpec(kind), cfg, num_envs=2).sample([4, 3, 2, 1, 0])
        by_seed = {ep.seed: ep for ep in b.episodes}
        assert len(a.episodes) == 5 and all(same(ep, by_seed[ep.seed]) for ep in a.episodes)
        c = RolloutWorker("CartPole-v1", PolicySpec(kind), cfg, num_envs=3).sample([100, 101, 102, 103, 104])
        firsts = {ep.observations["observation"][0].tobytes() for ep in a.episodes + c.episodes}
        assert len(firsts) == 10  # every seed starts from its own state


def test_babyai_bot_episodes_validate_against_the_spec(cfg):
    worker = RolloutWorker("BabyAI-GoToRedBall-v0", PolicySpec("expert"), cfg, num_envs=2)
    res = worker.sample([0, 1, 2])
    assert len(res.episodes) == 3 and all(ep.success for ep in res.episodes)
    for ep in res.episodes:
        ep.validate(worker.spec)
        assert ep.observations["image"].shape == (ep.length, 56, 56, 3)
        assert len(ep.observations["mission"]) == ep.length and "red ball" in ep.observations["mission"][0]


def test_env_error_drops_only_that_episode(cfg):
    """Envs raising mid-episode lose those seeds (reported), are rebuilt, and the other episodes are intact."""
    crashing = dataclasses.replace(get_task("CartPole-v1"), name="CartPole-crash",
                                   wrappers=("crash_at_step:5:2,4",))
    seeds = [0, 1, 2, 3, 4, 5]
    res = RolloutWorker(crashing, PolicySpec("random"), cfg, num_envs=2).sample(seeds)
    assert sorted(f["seed"] for f in res.failed) == [2, 4]
    assert all("crash_at_step" in f["error"] for f in res.failed)
    clean = RolloutWorker("CartPole-v1", PolicySpec("random"), cfg, num_envs=2).sample(seeds)
    want = {ep.seed: ep for ep in clean.episodes}
    assert [ep.seed for ep in res.episodes] == [0, 1, 3, 5]
    for ep in res.episodes:
        assert ep.episode_id == f"CartPole-crash-expert-{ep.seed}"
        ref = want[ep.seed]
        assert np.array_equal(ep.actions, ref.actions) and np.array_equal(ep.rewards, ref.rewards)
        assert np.array_equal(ep.observations["observation"], ref.observations["observation"])


def test_env_error_in_reset_is_survived(cfg, monkeypatch):
    class FailReset(envs.gym.Wrapper):
        def reset(self, *, seed=None, options=None):
            if seed == 1:
                raise OSError("reset failed")
            return self.env.reset(seed=seed, options=options)

    monkeypatch.setitem(envs.WRAPPERS, "fail_reset", FailReset)
    task = dataclasses.replace(get_task("CartPole-v1"), name="CartPole-badreset", wrappers=("fail_reset",))
    res = RolloutWorker(task, PolicySpec("expert"), cfg, num_envs=1).sample([0, 1, 2])
    assert [ep.seed for ep in res.episodes] == [0, 2]
    assert res.failed == [{"seed": 1, "error": "OSError: reset failed"}]


def test_return_filter_drops_low_return_episodes(cfg):
    res = RolloutWorker("CartPole-v1", PolicySpec("random"), cfg).sample(list(range(12)), min_return=20.0)
    everything = RolloutWorker("CartPole-v1", PolicySpec("random"), cfg).sample(list(range(12)))
    low = sum(r < 20.0 for r in everything.returns)
    assert 0 < low < 12  # the threshold splits this sample, so the test can fail both ways
    assert res.filtered == low and len(res.episodes) == 12 - low
    assert all(ep.episode_return >= 20.0 for ep in res.episodes)
    assert res.env_steps == everything.env_steps  # filtered episodes were still run


def test_store_write_is_one_atomic_file(cfg, tmp_path):
    store = tmp_path / "store"
    worker = RolloutWorker("CartPole-v1", PolicySpec("expert"), cfg)
    res = worker.sample([10, 11, 12, 13], source="random", store_dir=store, return_episodes=False)
    assert res.episodes == [] and len(res.returns) == 4
    assert [p.name for p in store.iterdir()] == ["random-10-13.parquet"] and res.files == [
        str(store / "random-10-13.parquet")]
    back = read_episodes(store)
    assert [ep.episode_id for ep in back] == [f"CartPole-v1-random-{s}" for s in (10, 11, 12, 13)]
    again = worker.sample([10, 11, 12, 13], source="random")  # the store holds exactly what was run
    assert all(same(a, b) for a, b in zip(back, again.episodes))


def test_bad_arguments_are_named(cfg):
    with pytest.raises(ValueError, match="kind"):
        PolicySpec("greedy")
    with pytest.raises(ValueError, match="checkpoint"):
        PolicySpec("model")
    with pytest.raises(ValueError, match="text-arith"):
        RolloutWorker("text-arith", PolicySpec("expert"), cfg)
    with pytest.raises(ValueError, match="distinct"):
        RolloutWorker("CartPole-v1", PolicySpec("expert"), cfg, num_envs=1).sample([1, 1])


def test_two_actors_write_readable_episodes(ray_local, cfg, tmp_path):
    store = tmp_path / "store"
    actors = [RolloutActor.options(num_cpus=0.5).remote("CartPole-v1", PolicySpec("expert"), cfg, 2)
              for _ in range(2)]
    results = ray.get([a.sample.remote(seeds, store_dir=str(store), return_episodes=False)
                       for a, seeds in zip(actors, ([0, 1, 2], [3, 4, 5]))])
    # Named by what they hold, not by the actor that wrote them: a seed's run reads the same files in any run.
    assert sorted(p.name for p in store.iterdir()) == ["expert-0-2.parquet", "expert-3-5.parquet"]
    back = read_episodes(store)
    assert sorted(ep.seed for ep in back) == list(range(6)) and sum(len(r.returns) for r in results) == 6
    for ep in back:
        ep.validate()


def test_dead_actor_is_restarted_and_its_call_retried(ray_local, cfg, tmp_path):
    """The process hard-exits mid-call (first attempt only): Ray restarts it, the call completes once."""
    store, marker = tmp_path / "store", tmp_path / "exited"
    actor = RolloutActor.options(num_cpus=0.5).remote(
        "CartPole-v1", PolicySpec("expert"), cfg, 2, faults=FaultInjection(exit_seed=3, exit_marker=str(marker)))
    res = ray.get(actor.sample.remote([0, 1, 2, 3, 4, 5], store_dir=str(store)), timeout=120)
    assert marker.exists()  # the crash did happen
    assert [ep.seed for ep in res.episodes] == list(range(6))
    assert [p.name for p in store.iterdir()] == ["expert-0-5.parquet"]  # no temp or partial file
    assert sorted(ep.seed for ep in read_episodes(store)) == list(range(6))


def test_a_tasks_own_temperature_decides_how_the_model_acts(tmp_path):
    """tasks[].temperature overrides the policy's temperature on that task: the worker's model samples at it,
    and gives exactly the episodes a policy of that temperature gives; without it the model acts greedily."""
    torch = pytest.importorskip("torch")
    from mugato_ray.model import GatoModel, save_model
    from mugato_ray.tokenizer import make_vocab

    base = {"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "context": 96},
            "rollout": {"envs_per_actor": 2, "max_episode_steps": 16}}
    cfg = config_from_dict({**base, "tasks": [{"name": "CartPole-v1", "temperature": 1.0}]})
    plain = config_from_dict({**base, "tasks": [{"name": "CartPole-v1"}]})
    torch.manual_seed(0)
    ckpt = str(save_model(GatoModel(cfg.model, make_vocab(cfg.tokenizer)), tmp_path / "model.pt"))
    seeds = [0, 1, 2, 3]
    task_sampled = RolloutWorker("CartPole-v1", PolicySpec("model", ckpt), cfg)
    assert task_sampled.policy.temperature == 1.0
    policy_sampled = RolloutWorker("CartPole-v1", PolicySpec("model", ckpt, temperature=1.0), plain)
    greedy = RolloutWorker("CartPole-v1", PolicySpec("model", ckpt), plain)
    assert greedy.policy.temperature == 0.0
    a, b, g = (w.sample(seeds).episodes for w in (task_sampled, policy_sampled, greedy))
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x.actions, y.actions) for x, y in zip(a, g))


def test_model_policy_is_seed_determined_and_can_be_prompted(tmp_path):
    """A (untrained) checkpoint acts through the same worker: sampled episodes depend only on their seed."""
    torch = pytest.importorskip("torch")
    from mugato_ray.model import GatoModel, save_model
    from mugato_ray.tokenizer import make_vocab

    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "context": 96},
                            "rollout": {"envs_per_actor": 2, "max_episode_steps": 8}})
    torch.manual_seed(0)
    ckpt = str(save_model(GatoModel(cfg.model, make_vocab(cfg.tokenizer)), tmp_path / "model.pt"))
    sampled = PolicySpec("model", ckpt, temperature=1.0)
    a = RolloutWorker("CartPole-v1", sampled, cfg).sample([0, 1, 2])
    b = RolloutWorker("CartPole-v1", sampled, cfg, num_envs=3).sample([2, 1, 0])
    assert all(same(x, y) for x, y in zip(a.episodes, reversed(b.episodes)))
    for ep in a.episodes:
        ep.validate()
        assert set(np.unique(ep.actions)) <= {0, 1}

    with pytest.raises(FileNotFoundError, match="successful expert episode"):
        RolloutWorker("CartPole-v1", PolicySpec("model", ckpt, prompt=True), cfg)
    expert_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_episode_steps=None))
    RolloutWorker("CartPole-v1", PolicySpec("expert"), expert_cfg, num_envs=1).sample(
        [5], store_dir=store_dir(cfg, "CartPole-v1"))
    prompted = RolloutWorker("CartPole-v1", PolicySpec("model", ckpt, prompt=True), cfg)
    assert prompted.policy.prompt_steps == prompted.policy.layout.steps // 2  # from the stored demonstration
    assert len(prompted.sample([0, 1]).episodes) == 2
