"""Hyperparameter sweeps: the space checked through the override path, trials sized from the cluster, results
ranked and written, and (slow) two tiny trials through Ray Tune."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest

from mugato_ray.config import ConfigError, load_config, save_config
from mugato_ray.episodes import store_dir
from mugato_ray.resources import plan_trial
from mugato_ray.sweep import (
    base_data,
    check_plans,
    result_rows,
    sweep_problems,
    table_lines,
    trial_config,
    tune_space,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
TWO_TASKS = "tasks=[{name: CartPole-v1}, {name: text-arith}]"


def make_cfg(run_dir, *overrides):
    return load_config(ROOT / "configs/smoke.yaml", [f"run_dir={run_dir}", TWO_TASKS, *overrides])


# ---------------------------------------------------------------------------------------------
# The space


def test_a_trial_config_is_the_base_with_its_point_applied_and_reads_the_base_store(tmp_path):
    cfg = make_cfg(tmp_path, "seed=3", "train.seed=7")
    trial = trial_config(base_data(cfg), {"train.lr": "1e-4", "model.n_embd": 64, "seed": 5},
                         tmp_path / "sweep" / "t1", cfg.store_root())
    assert trial.train.lr == pytest.approx(1e-4) and trial.model.n_embd == 64
    assert trial.run_dir == str(tmp_path / "sweep" / "t1")
    assert trial.store_root() == tmp_path / "data" and cfg.store_root() == tmp_path / "data"
    assert store_dir(trial, "CartPole-v1") == tmp_path / "data" / "CartPole-v1"  # every store user reads it
    # A swept root seed moves the derived section seeds; an explicit one stays.
    assert trial.seed == 5 and trial.rollout.seed == 5 and trial.train.seed == 7
    assert cfg.train.lr == pytest.approx(1e-3)  # the base is untouched


@pytest.mark.parametrize(("space", "named"), [
    ("{train.lrr: {choice: [1.0e-3]}}", r"sweep\.space\.train\.lrr.*unknown key 'train\.lrr'"),
    ("{model.n_embd: {choice: [64, big]}}", r"sweep\.space\.model\.n_embd: value 'big'.*expects"),
    ("{train.lr: {uniform: [-1, 1]}}", r"sweep\.space\.train\.lr: value -1\.0.*'train\.lr' must be positive"),
    ("{run_dir: {choice: [/tmp/x]}}", r"sweep\.space\.run_dir: 'run_dir' is fixed"),
    ("{online.beta: {choice: [0.1]}}", r"sweep\.space\.online\.beta: 'online' is fixed"),
])
def test_the_space_is_checked_through_the_override_path_naming_the_key(tmp_path, space, named):
    problems = sweep_problems(make_cfg(tmp_path, f"sweep.space={space}"))
    assert len(problems) == 1 and problems[0].startswith("sweep.space.")
    assert re.search(named, problems[0]), problems[0]


@pytest.mark.parametrize(("overrides", "key"), [
    (["sweep.space={train.lr: {normal: [0, 1]}}"], "sweep.space.train.lr"),
    (["sweep.space={train.lr: {loguniform: [0, 1.0e-3]}}"], "sweep.space.train.lr.loguniform"),
    (["sweep.space={train.lr: {uniform: [3, 1]}}"], "sweep.space.train.lr.uniform"),
    (["sweep.space={train.lr: {choice: []}}"], "sweep.space.train.lr.choice"),
    (["sweep.space={train.lr: {choice: [1], grid: [2]}}"], "sweep.space.train.lr"),
    (["sweep.max_concurrent_trials=0"], "sweep.max_concurrent_trials"),
    (["sweep.num_samples=0"], "sweep.num_samples"),
    (["sweep.metric=validation_iqm"], "train.eval_every"),
    (["sweep.scheduler=asha"], "train.eval_every"),
    (["sweep.scheduler=hyperband"], "sweep.scheduler"),
])
def test_bad_sweep_values_are_config_errors_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_cfg(tmp_path, *overrides)


def test_an_empty_space_and_writes_to_the_shared_store_are_refused(tmp_path):
    assert "sweep.space is empty" in sweep_problems(make_cfg(tmp_path, "sweep.space={}"))[0]
    online = sweep_problems(make_cfg(tmp_path, "online.enabled=true", "data.sources=[expert, dagger]"))
    assert len(online) == 1 and online[0].startswith("online.enabled")
    prompt = sweep_problems(make_cfg(tmp_path, "eval.prompt=true"))  # no store: no demonstration to prompt with
    assert len(prompt) == 1 and prompt[0].startswith("eval.prompt") and "CartPole-v1" in prompt[0]
    assert sweep_problems(make_cfg(tmp_path)) == []


def test_tune_space_draws_from_the_configured_distributions(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    space = tune_space(make_cfg(tmp_path, "sweep.space={train.lr: {loguniform: [1e-4, 3.0e-3]}, "
                                          "model.n_embd: {choice: [64, 128]}, seed: {grid: [1, 2]}}").sweep.space)
    lr, width = space["train.lr"], space["model.n_embd"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 3e-3)
    assert all(1e-4 <= x <= 3e-3 for x in lr.sample(size=50))
    assert isinstance(width, Categorical) and width.categories == [64, 128]
    assert space["seed"] == {"grid_search": [1, 2]}


def test_asha_stops_on_the_validation_iqm_but_never_a_trial_at_its_last_step(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from mugato_ray.sweep import make_scheduler

    assert make_scheduler(make_cfg(tmp_path)) is None
    cfg = make_cfg(tmp_path, "sweep.scheduler=asha", "train.eval_every=3", "train.steps=6")
    asha = make_scheduler(cfg)
    assert isinstance(asha, ASHAScheduler) and asha.metric == "validation_iqm" and asha._time_attr == "step"

    class Trial:
        trial_id = "t"

    asha.on_trial_add(None, Trial())
    # The snapshot of step 6 lands before the final evaluation: the trial must go on to be evaluated.
    decision = asha.on_trial_result(None, Trial(), {"step": 6, "validation_iqm": 0.5})
    assert decision == TrialScheduler.CONTINUE


# ---------------------------------------------------------------------------------------------
# Resources


@pytest.mark.parametrize(("cpus", "concurrent", "extra"), [
    (2.0, 1, []), (8.0, 4, []), (16.0, 2, ["train.num_workers=2", "train.eval_every=5"]), (32.0, 4, ["data.num_tokenize_actors=0"]),
])
def test_concurrent_trials_together_fit_the_cluster_and_each_keeps_its_data_share(tmp_path, cpus, concurrent, extra):
    cfg = make_cfg(tmp_path, f"sweep.max_concurrent_trials={concurrent}", *extra)
    trial = plan_trial(cfg, {"CPU": cpus}, concurrent)
    plan = trial.plan
    assert trial.share_cpus == pytest.approx(cpus / concurrent)
    assert trial.eval_cpus == pytest.approx(cfg.rollout.num_actors * cfg.rollout.actor_cpus)
    assert trial.tune_bundle["CPU"] == pytest.approx(trial.eval_cpus + plan.eval_cpus, abs=1e-4)
    assert (plan.eval_cpus > 0) == ("train.eval_every=5" in extra)
    train_cpus, data_cpus = plan.train_workers * plan.cpus_per_worker, len(cfg.tasks) * plan.data_cpus
    assert train_cpus > 0 and data_cpus >= len(cfg.tasks) * 2 * 0.02  # every dataset: an actor and a read task
    assert trial.reserved_cpus == pytest.approx(trial.tune_bundle["CPU"] + train_cpus + data_cpus)
    assert concurrent * trial.reserved_cpus <= cpus + 1e-6  # k trials at once never oversubscribe the cluster


def test_a_sweep_that_cannot_fit_names_the_keys(tmp_path):
    cfg = make_cfg(tmp_path, "sweep.max_concurrent_trials=4")
    with pytest.raises(ValueError, match=r"sweep\.max_concurrent_trials=4 gives each trial 0\.5 .*rollout\.num_actors"):
        plan_trial(cfg, {"CPU": 2.0}, 4)
    cfg = make_cfg(tmp_path, "sweep.max_concurrent_trials=2", "train.cpus_per_worker=1.5")
    with pytest.raises(ValueError, match=r"sweep\.max_concurrent_trials=2 .*train\.cpus_per_worker=1\.5"):
        plan_trial(cfg, {"CPU": 4.0}, 2)
    # A swept value that does not fit is named with its key, though the base config fits.
    cfg = make_cfg(tmp_path, "sweep.space={train.num_workers: {choice: [1, 8]}}", "train.cpus_per_worker=0.25")
    with pytest.raises(ValueError, match=r"sweep\.space\.train\.num_workers=8: .*train\.cpus_per_worker"):
        check_plans(cfg, {"CPU": 2.0})
    assert check_plans(make_cfg(tmp_path), {"CPU": 2.0}).plan.train_workers == 1


# ---------------------------------------------------------------------------------------------
# Results


class FakeResult:
    """What result_rows reads of a Tune Result."""

    def __init__(self, config, metrics, error=None, path="/x/run_trial_0"):
        self.config, self.metrics, self.error, self.path = config, metrics, error, path


def test_results_are_ranked_by_the_metric_and_the_best_config_is_written(tmp_path):
    cfg = make_cfg(tmp_path)
    results = [
        FakeResult({"train.lr": 1e-3}, {"trial_id": "a", "iqm": 0.2, "validation_iqm": math.nan, "step": 6,
                                        "score/CartPole-v1": 0.1, "score/text-arith": 0.3}),
        FakeResult({"train.lr": 3e-3}, {"trial_id": "b", "iqm": 0.7, "validation_iqm": math.nan, "step": 6,
                                        "score/CartPole-v1": 0.6, "score/text-arith": 0.8}),
        FakeResult({"train.lr": 2e-3}, {"trial_id": "c", "validation_iqm": 0.9, "step": 3}),  # stopped early
        FakeResult({"train.lr": 5e-3}, {}, error=RuntimeError("boom\ntrace"), path="/x/run_trial_d"),
    ]
    rows = result_rows(results, cfg)
    assert [r["trial_id"] for r in rows] == ["b", "a", "c", "run_trial_d"]
    assert [r["status"] for r in rows] == ["done", "done", "stopped", "error"] and rows[3]["error"] == "boom"
    assert rows[0]["run_dir"] == str(tmp_path.resolve() / "sweep" / "b") and rows[0]["score/CartPole-v1"] == 0.6
    best_run = tmp_path / "sweep" / "b"
    trial_cfg = trial_config(base_data(cfg), {"train.lr": 3e-3}, best_run, cfg.store_root())
    save_config(trial_cfg)
    results_file, best_file = write_results(rows, cfg)
    with results_file.open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial_id"] for r in table] == ["b", "a", "c", "run_trial_d"]
    assert float(table[0]["train.lr"]) == 3e-3 and float(table[0]["iqm"]) == 0.7
    assert load_config(best_file).train.lr == pytest.approx(3e-3)
    lines = table_lines(rows, cfg)
    assert lines[0].split() == ["#", "trial", "status", "train.lr", "iqm", "validation_iqm"]
    assert lines[1].split()[:5] == ["1", "b", "done", "0.003", "0.7"]
    # Ranked by the validation IQM instead, the stopped trial leads.
    by_validation = result_rows(results, make_cfg(tmp_path, "sweep.metric=validation_iqm", "train.eval_every=3"))
    assert by_validation[0]["trial_id"] == "c"


# ---------------------------------------------------------------------------------------------
# Two tiny trials through Ray Tune


@pytest.mark.slow
def test_two_tiny_trials_train_evaluate_and_rank(local_ray, tmp_path):
    """The smoke config's sweep (two learning rates, one trial at a time) on a synthetic store: both trials
    train their own run on the base store without writing to it, are evaluated and ranked."""
    from mugato_ray.data import write_synthetic_store
    from mugato_ray.sweep import run_sweep

    cfg = make_cfg(tmp_path, "eval.episodes=2")
    assert cfg.sweep.space == {"train.lr": {"grid": [1e-3, 3e-3]}} and cfg.sweep.max_concurrent_trials == 1
    write_synthetic_store(cfg, 8)
    store = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    result = run_sweep(cfg)
    assert [r["status"] for r in result.rows] == ["done", "done"]
    assert sorted(r["train.lr"] for r in result.rows) == [1e-3, 3e-3]
    with result.results_file.open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and sorted(float(r["train.lr"]) for r in table) == [1e-3, 3e-3]
    assert all(math.isfinite(float(r["iqm"])) and int(r["step"]) == cfg.train.steps for r in table)
    for row in table:
        run = Path(row["run_dir"])
        assert run.parent == tmp_path.resolve() / "sweep" and (run / "eval" / "eval.json").is_file()
        trial = load_config(run / "config.yaml")
        assert trial.train.lr == pytest.approx(float(row["train.lr"]))
        assert trial.store_root() == (tmp_path / "data").resolve()
        assert (run / "checkpoints" / row["trial_id"]).is_dir()  # its own Ray Train run
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == store  # read only
    best = load_config(result.best_file)
    assert best.train.lr == pytest.approx(float(table[0]["train.lr"])) and best.run_dir == table[0]["run_dir"]
