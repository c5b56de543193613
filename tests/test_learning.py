"""Learning: the model learns a control task, the data filter and DART noise do what they say, the
baseline learns, and snapshots are scored during training and the best one chosen."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mugato_ray import experts
from mugato_ray.baseline import BaselinePolicy, train_baseline
from mugato_ray.checkpoints import snapshot_root
from mugato_ray.config import ConfigError, load_config
from mugato_ray.data import EpisodeFilter, WindowSampler, synthetic_episodes, task_layouts, write_synthetic_store
from mugato_ray.episodes import episode_to_row, store_dir
from mugato_ray.metric_log import open_metric_log, read_metrics
from mugato_ray.metrics import bootstrap_ci
from mugato_ray.pipeline import choose_checkpoint
from mugato_ray.resolve import task_spec
from mugato_ray.rollout import PolicySpec, RolloutWorker, perturb
from mugato_ray.sequence import tokenize_episode
from mugato_ray.tasks import reference_returns
from mugato_ray.tokenizer import ByteTokenizer
from mugato_ray.train import TrainResult, train
from mugato_ray.train_eval import SCORES_FILE, best_snapshot, read_scores, score_policy

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(run_dir, tasks: str, *overrides):
    return load_config(ROOT / "configs/smoke.yaml", [f"run_dir={run_dir}", f"tasks={tasks}", *overrides])


def collect_in_process(cfg, task: str, seeds) -> list:
    worker = RolloutWorker(task, PolicySpec("expert"), cfg, num_envs=4)
    try:
        return worker.sample(list(seeds), store_dir=store_dir(cfg, task)).episodes
    finally:
        worker.close()


# ---------------------------------------------------------------------------------------------
# The model learns


def test_a_tiny_model_learns_cartpole_well_beyond_random(local_ray, tmp_path):
    """20 expert episodes, the tiny preset, 200 steps through the real training path: the lower end of the
    bootstrap CI of its held-out return is far above random's mean (22)."""
    cfg = make_cfg(tmp_path, "[{name: CartPole-v1, episodes: 20, window: 2, batch_size: 32}]",
                   "train.steps=200", "train.warmup_steps=20", "train.lr=3e-3", "train.checkpoint_every=200",
                   "train.log_every=50", "data.prompt_prob=0.0")
    collect_in_process(cfg, "CartPole-v1", range(20))
    result = train(cfg)
    outcome = RolloutWorker("CartPole-v1", PolicySpec("model", str(Path(result.checkpoint_path) / "model.pt")),
                            cfg, num_envs=8).sample([1_000_000 + i for i in range(16)], return_episodes=False)
    returns = [o["return"] for o in outcome.outcomes]
    lo, _ = bootstrap_ci(returns, samples=1000, seed=0)
    _, random_return = reference_returns("CartPole-v1")
    # Training is not bit-reproducible (Ray Data's order): one run of 200 steps gave a lower end of 82.7, so
    # the bar is 3x random's mean, well above the Learning issue's "above random's mean".
    assert lo > 3 * random_return, (lo, returns)


def test_the_baseline_learns_cartpole(tmp_path):
    cfg = make_cfg(tmp_path, "[{name: CartPole-v1, episodes: 10}]")
    episodes = collect_in_process(cfg, "CartPole-v1", range(10))
    net = train_baseline(task_spec("CartPole-v1", cfg), episodes, steps=300, seed=0)
    score = score_policy(cfg, "CartPole-v1", BaselinePolicy(net), [1_000_000 + i for i in range(8)])
    assert score["normalized"] > 0.8, score


# ---------------------------------------------------------------------------------------------
# The data filter


def test_the_data_filter_keeps_only_listed_sources_above_the_threshold():
    f = EpisodeFilter(("expert", "dagger"), min_return=100.0)
    mask = f.mask(["expert", "expert", "random", "policy", "dagger"], [150.0, 50.0, 500.0, 500.0, 10.0])
    # low-return expert dropped; random and policy not listed; dagger kept whatever its return
    assert mask.tolist() == [True, False, False, False, True]
    assert EpisodeFilter(("expert", "policy"), min_return=100.0).mask(["policy", "policy"], [99.0, 100.0]).tolist() \
        == [False, True]


def test_the_window_sampler_never_windows_a_filtered_episode(tmp_path):
    """A store batch of expert, random and low-return expert episodes: only the kept ones give rows."""
    cfg = make_cfg(tmp_path, "[{name: Pendulum-v1}]", "data.prompt_prob=0.0")
    spec = task_spec("Pendulum-v1", cfg)
    eps = synthetic_episodes("Pendulum-v1", spec, 6, seed=1, length=(3, 3))
    for ep, (source, ret) in zip(eps, [("expert", 1.0), ("expert", 1.0), ("random", 1.0), ("policy", 1.0),
                                       ("expert", -9.0), ("dagger", -9.0)]):
        ep.source = source
        ep.rewards = np.full(ep.length, ret / ep.length, np.float32)
    rows = [episode_to_row(ep) for ep in eps]
    batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
    sampler = WindowSampler("Pendulum-v1", spec, cfg, windows=1,
                            episode_filter=EpisodeFilter(("expert", "dagger"), min_return=0.0))
    (out,) = list(sampler(batch))
    assert len(out["step_mask"]) == 3
    # Each row is a whole kept episode (3 steps fit the window), in order: the observation tokens are theirs.
    _, layouts = task_layouts(cfg)
    for row, i in zip(out["obs/observation"], (0, 1, 5)):
        tokens = tokenize_episode(eps[i], spec, ByteTokenizer(), layout=layouts["Pendulum-v1"])
        assert np.array_equal(row[:3], tokens["obs/observation"])


def test_training_refuses_a_store_with_nothing_the_filter_keeps(local_ray, tmp_path):
    cfg = make_cfg(tmp_path, "[{name: Pendulum-v1}]", "data.sources=[dagger]")
    write_synthetic_store(cfg, 4)  # expert episodes only
    with pytest.raises(ValueError, match=r"Pendulum-v1.*data\.sources=\['dagger'\]"):
        train(cfg)


# ---------------------------------------------------------------------------------------------
# DART noise


def test_perturb_noises_box_and_discrete_actions_and_names_other_spaces():
    import gymnasium as gym

    rng = np.random.default_rng(0)
    box = gym.spaces.Box(-2.0, 2.0, (3,), np.float32)
    edge = np.stack([perturb(np.full(3, 1.9, np.float32), box, rng, 0.5) for _ in range(500)])
    assert edge.dtype == np.float32 and (edge <= 2.0).all() and (edge >= -2.0).all() and (edge == 2.0).any()
    centre = np.stack([perturb(np.zeros(3, np.float32), box, rng, 0.5) for _ in range(2000)])
    assert abs(float(centre.std()) - 1.0) < 0.1  # std 0.5 x half-range 2 (clipping at 2 sigma trims ~4%)
    disc = gym.spaces.Discrete(4)
    changed = np.mean([perturb(np.asarray(2), disc, rng, 0.4) != 2 for _ in range(2000)])
    assert abs(changed - 0.4 * 3 / 4) < 0.05  # replaced w.p. 0.4, by another action 3 times in 4
    assert perturb(np.asarray(2), disc, rng, 0.0) == 2
    with pytest.raises(ValueError, match="MultiDiscrete"):
        perturb(np.zeros(2, np.int64), gym.spaces.MultiDiscrete([3, 3]), rng, 0.3)


def test_expert_noise_perturbs_the_states_but_records_the_experts_actions(tmp_path):
    import gymnasium as gym

    cfg = make_cfg(tmp_path, "[{name: CartPole-v1, episodes: 4, expert_noise: 0.3}]")
    noisy = collect_in_process(cfg, "CartPole-v1", range(4))
    for ep in noisy:  # every recorded action is the expert's action on the recorded state
        obs = np.asarray(ep.observations["observation"])
        assert np.array_equal(np.asarray(ep.actions).reshape(-1), experts.cartpole(obs).reshape(-1))
    # What the env executed is kept beside the labels: replayed from the seed, it visits the recorded states.
    for ep in noisy:
        assert ep.executed is not None and not np.array_equal(ep.executed, ep.actions)
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=ep.seed)
        for t, a in enumerate(ep.executed):
            np.testing.assert_array_equal(obs, ep.observations["observation"][t])
            obs, *_ = env.step(int(a))
    clean_cfg = make_cfg(tmp_path / "clean", "[{name: CartPole-v1, episodes: 4}]")
    clean = collect_in_process(clean_cfg, "CartPole-v1", range(4))
    assert all(ep.executed is None for ep in clean)  # the expert's own actions were executed
    # The executed actions were not the expert's: the same seeds visit other states.
    assert any(not np.array_equal(a.observations["observation"][:50], b.observations["observation"][:50])
               for a, b in zip(noisy, clean))
    # Reproducible: the noise comes from the episode's seed.
    again = collect_in_process(make_cfg(tmp_path / "again", "[{name: CartPole-v1, episodes: 4, expert_noise: 0.3}]"),
                               "CartPole-v1", range(4))
    assert all(np.array_equal(a.observations["observation"], b.observations["observation"])
               for a, b in zip(noisy, again))


# ---------------------------------------------------------------------------------------------
# Evaluation during training


@pytest.mark.parametrize("text_start,scored", [(0, [2, 4]), (2, [4])])
def test_snapshots_are_scored_during_training_and_the_best_is_chosen(local_ray, tmp_path, text_start, scored):
    # A relative run_dir, as in the configs: Ray Train workers do not run in the driver's directory.
    # text_start 2: text-arith joins at step 2, so the snapshot of step 2 (text not yet trained) is not scored.
    cfg = make_cfg(os.path.relpath(tmp_path / "run"),
                   f"[{{name: CartPole-v1, episodes: 4, window: 2}}, {{name: text-arith, episodes: 8, start_step: {text_start}}}]",
                   "train.steps=4", "train.eval_every=2", "train.eval_episodes=2", "train.checkpoint_every=4")
    collect_in_process(cfg, "CartPole-v1", range(4))
    from mugato_ray.collect import collect

    collect(cfg, resume=True, log=lambda *_: None)  # the text task's episodes (no env: generated in the driver)
    result = train(cfg)
    assert [r["step"] for r in result.evaluations] == scored
    assert sorted(int(p.name.split("_")[1]) for p in snapshot_root(cfg).glob("step_*")) == scored
    for r in result.evaluations:
        assert Path(r["model_file"]).is_relative_to(tmp_path.resolve() / "run" / "snapshots")
        assert Path(r["model_file"]).is_file() and (Path(r["model_file"]).parent / "layouts.json").is_file()
        assert set(r["tasks"]) == {"CartPole-v1", "text-arith"}
        assert r["tasks"]["CartPole-v1"]["normalized"] is not None and r["iqm"] is not None
    assert read_scores(cfg) == result.evaluations  # written as they land
    rows = read_metrics(Path(cfg.run_dir) / "metrics" / "eval.csv")  # and into the run's metrics, by step
    assert [r["step"] for r in rows] == scored
    for row, r in zip(rows, result.evaluations):
        assert row["validation/iqm"] == r["iqm"] and row["validation/CartPole-v1/episodes"] == 2
        assert row["validation/CartPole-v1/normalized_score"] == r["tasks"]["CartPole-v1"]["normalized"]
        assert row["validation/text-arith/env_steps_per_s"] > 0
    assert (snapshot_root(cfg) / SCORES_FILE).is_file()
    checkpoint, training = choose_checkpoint(cfg, result, log=lambda *_: None)
    best = best_snapshot(result.evaluations)
    assert checkpoint == best["model_file"] and training["chosen_step"] == best["step"]


def test_best_snapshot_takes_the_highest_iqm_then_the_latest_step(tmp_path):
    records = [{"step": 2, "iqm": 0.5}, {"step": 4, "iqm": 0.9}, {"step": 6, "iqm": 0.9}, {"step": 8, "iqm": None}]
    assert best_snapshot(records)["step"] == 6
    assert best_snapshot([{"step": 2, "iqm": None}]) is None
    no_evals = TrainResult(checkpoint_path="/x/checkpoint_00000004", final_step=4, metrics={})
    cfg = make_cfg(tmp_path, "[{name: CartPole-v1}]")  # no metrics/train.csv yet: no loss history
    assert choose_checkpoint(cfg, no_evals, log=lambda *_: None) == ("/x/checkpoint_00000004", {"history": []})
    with open_metric_log(cfg, "train") as log:  # what rank 0 writes: the report's loss curves come from it
        log.write(2, {"step": 2, "loss": 2.0, "loss/CartPole-v1": 2.0, "lr": 1e-3, "nonpad/CartPole-v1": 0.5})
    _, training = choose_checkpoint(cfg, no_evals, log=lambda *_: None)
    assert training == {"history": [{"step": 2, "loss": 2.0, "loss/CartPole-v1": 2.0}]}


def test_select_margin_prefers_the_latest_snapshot_near_the_best(tmp_path):
    """``train.select_margin``: an earlier snapshot is chosen only when it leads every later one by more than
    the margin; the choice, its rule and the margin go to the log and the report."""
    records = [{"step": 2, "iqm": 0.5}, {"step": 4, "iqm": 0.9}, {"step": 6, "iqm": 0.82}, {"step": 8, "iqm": 0.79},
               {"step": 10, "iqm": None}]
    assert best_snapshot(records)["step"] == 4
    assert best_snapshot(records, 0.05)["step"] == 4  # 0.82 trails by 0.08
    assert best_snapshot(records, 0.1)["step"] == 6  # 0.79 trails by 0.11
    assert best_snapshot(records, 0.11)["step"] == 8
    assert best_snapshot([{"step": 2, "iqm": None}], 0.1) is None
    evals = [{**r, "model_file": f"/x/step_{r['step']}/model.pt", "tasks": {}} for r in records[:4]]
    result = TrainResult(checkpoint_path="/x/checkpoint_00000008", final_step=8, metrics={}, evaluations=evals)
    lines: list[str] = []
    checkpoint, training = choose_checkpoint(make_cfg(tmp_path, "[{name: CartPole-v1}]", "train.select_margin=0.1"),
                                             result, log=lines.append)
    assert checkpoint == "/x/step_6/model.pt"
    assert (training["chosen_step"], training["chosen_iqm"], training["select_margin"]) == (6, 0.82, 0.1)
    assert "step 6 (IQM 0.820), the latest within 0.1 of the best IQM of 4" in lines[-1]
    checkpoint, training = choose_checkpoint(make_cfg(tmp_path, "[{name: CartPole-v1}]"), result, log=lines.append)
    assert checkpoint == "/x/step_4/model.pt" and "(IQM 0.900), the best of 4" in lines[-1]
    with pytest.raises(ConfigError, match="train.select_margin"):
        make_cfg(tmp_path, "[{name: CartPole-v1}]", "train.select_margin=-0.1")


# ---------------------------------------------------------------------------------------------
# Acting uses the training window


def test_acting_reads_the_window_a_checkpoint_was_trained_with(tmp_path):
    from mugato_ray.checkpoints import checkpoint_layout
    from mugato_ray.data import save_layouts

    cfg = make_cfg(tmp_path, "[{name: CartPole-v1, window: 2}, {name: Pendulum-v1}]")
    specs, layouts = task_layouts(cfg)
    assert layouts["CartPole-v1"].steps == 2 and layouts["Pendulum-v1"].steps > 2
    model_file = tmp_path / "ckpt" / "model.pt"
    model_file.parent.mkdir()
    assert checkpoint_layout(model_file, "CartPole-v1", specs["CartPole-v1"]) is None  # no layouts.json
    save_layouts(model_file.parent / "layouts.json", specs, layouts)
    # A config without the window (evaluating the checkpoint elsewhere) still acts with the trained one.
    assert checkpoint_layout(model_file, "CartPole-v1", specs["CartPole-v1"]) == layouts["CartPole-v1"]
    assert checkpoint_layout(model_file, "Acrobot-v1", specs["CartPole-v1"]) is None  # not trained on it
    assert checkpoint_layout(model_file, "CartPole-v1", specs["Pendulum-v1"]) is None  # another spec
