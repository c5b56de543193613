"""Metric logs without Ray: CSV and TensorBoard files read back by pandas and TensorBoard's own reader, a widening
header, a resumed or restarted stream logging each step once, a cut-short line, W&B offline and its absence."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mugato_ray.config import ConfigError, config_from_dict
from mugato_ray.metric_log import CsvWriter, MetricLog, MetricLogError, read_metrics, score_metrics


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run folder as (step, value) pairs, as TensorBoard shows them."""
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_csv_and_tensorboard_read_back_and_a_new_key_widens_the_header(tmp_path):
    with MetricLog(tmp_path, "train", ["csv", "tensorboard"]) as log:
        log.write(1, {"step": 1, "loss": 2.5, "lr": 0.1, "note": "text", "flag": True, "none": None})
        log.write(2, {"step": 2, "loss": 2.0, "lr": 0.2, "loss/a": 1.5})  # a task seen from step 2 on
        log.write(3, {"step": 3, "loss": 1.0, "lr": 0.3, "online_rows/a": 7})
    text = (tmp_path / "train.csv").read_text()
    assert text.count("step") == 1 and len(text.splitlines()) == 4  # one header, rewritten wider
    df = pd.read_csv(tmp_path / "train.csv")
    assert list(df.columns) == ["step", "loss", "lr", "loss/a", "online_rows/a"]  # numbers only, step first
    assert df["step"].tolist() == [1, 2, 3] and df["loss"].tolist() == [2.5, 2.0, 1.0]
    assert df["loss/a"].isna().tolist() == [True, False, True] and df.loc[1, "loss/a"] == 1.5
    assert df.loc[2, "online_rows/a"] == 7
    scalars = tb_scalars(tmp_path / "tb" / "train")
    assert set(scalars) == {"loss", "lr", "loss/a", "online_rows/a"}
    assert scalars["loss"] == [(1, 2.5), (2, 2.0), (3, 1.0)] and scalars["loss/a"] == [(2, 1.5)]
    assert read_metrics(tmp_path / "train.csv")[1] == {"step": 2, "loss": 2.0, "lr": 0.2, "loss/a": 1.5}


def test_a_resumed_or_restarted_stream_logs_each_step_once_with_the_values_that_went_on(tmp_path):
    loggers = ["csv", "tensorboard"]
    with MetricLog(tmp_path, "train", loggers) as first:  # an attempt killed after logging step 5
        for step in range(1, 6):
            first.write(step, {"loss": 10.0 + step})
    # The next attempt resumes from the checkpoint of step 3: it starts the stream at step 4.
    with MetricLog(tmp_path, "train", loggers, start_step=4) as second:
        for step in range(4, 8):
            second.write(step, {"loss": 20.0 + step})
        # A worker restarted from the checkpoint of step 5 while this writer lives on: step 6 comes again.
        second.write(6, {"loss": 30.0 + 6})
    want = [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 36.0)]
    df = pd.read_csv(tmp_path / "train.csv")
    assert list(zip(df["step"], df["loss"])) == want  # step 7 of the restarted attempt is gone too
    assert tb_scalars(tmp_path / "tb" / "train")["loss"] == want
    assert len(list((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))) == 2  # one file per attempt


def test_a_line_cut_short_is_dropped_and_a_write_at_a_logged_step_merges_into_its_row(tmp_path):
    path = tmp_path / "eval.csv"
    w = CsvWriter(path)
    w.write(10, {"validation/iqm": 0.5})
    w.write(20, {"validation/iqm": 0.75})
    with open(path, "a") as fh:
        fh.write("30,0.9")  # killed mid-line
    again = CsvWriter(path)
    assert path.read_text().endswith("0.75\n") and sorted(again.rows) == [10, 20]
    again.write(10, {"eval/iqm": 0.625})  # the final evaluation of the snapshot of step 10
    df = pd.read_csv(path)
    assert df["step"].tolist() == [10, 20] and df["validation/iqm"].tolist() == [0.5, 0.75]
    assert df["eval/iqm"].iloc[0] == 0.625 and df["eval/iqm"].isna().iloc[1]
    (tmp_path / "other.csv").write_text("time,loss\n1,2\n")
    with pytest.raises(MetricLogError, match="other.csv"):
        CsvWriter(tmp_path / "other.csv")


def test_score_metrics_flatten_an_evaluation_and_leave_out_missing_numbers():
    tasks = {"CartPole-v1": {"episodes": 4, "mean_return": 200.0, "normalized_score": 0.4, "success_rate": None,
                             "env_steps_per_s": 1000.0, "per_episode": [1, 2]},
             "text-files": {"episodes": 2, "mean_return": 0.0, "normalized_score": None}}
    assert score_metrics("eval", tasks, 0.4) == {
        "eval/CartPole-v1/episodes": 4, "eval/CartPole-v1/mean_return": 200.0,
        "eval/CartPole-v1/normalized_score": 0.4, "eval/CartPole-v1/env_steps_per_s": 1000.0,
        "eval/text-files/episodes": 2, "eval/text-files/mean_return": 0.0, "eval/iqm": 0.4}


def test_loggers_are_checked_by_name():
    assert config_from_dict({}).train.loggers == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match=r"train\.loggers.*'csv', 'tensorboard', 'wandb'.*tensorbord"):
        config_from_dict({"train": {"loggers": ["csv", "tensorbord"]}})
    with pytest.raises(ConfigError, match=r"train\.loggers"):
        config_from_dict({"train": {"loggers": ["csv", "csv"]}})
    with pytest.raises(MetricLogError, match=r"train\.loggers.*known"):
        MetricLog(Path("unused"), "train", ["csv", "plotly"])


def test_wandb_without_the_package_is_an_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(MetricLogError, match=r"train\.loggers lists 'wandb'.*not installed"):
        MetricLog(tmp_path, "train", ["csv", "wandb"])
    assert not list(tmp_path.iterdir())  # checked before any writer made a file


def test_wandb_runs_offline_with_our_steps(tmp_path, monkeypatch):
    calls = []

    class Run:
        def define_metric(self, name, **kw):
            calls.append(("define_metric", name, kw))

        def log(self, data):
            calls.append(("log", data))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricLog(tmp_path, "eval", ["wandb"], run="demo") as log:
        log.write(4, {"eval/iqm": 0.5, "note": "x"})
    init_kw = calls[0][1]
    assert init_kw["mode"] == "offline" and init_kw["dir"] == str(tmp_path) and init_kw["group"] == "demo"
    assert ("define_metric", "*", {"step_metric": "step"}) in calls
    assert ("log", {"eval/iqm": 0.5, "step": 4}) in calls and calls[-1] == ("finish",)
