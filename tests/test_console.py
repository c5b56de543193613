"""The console: the project's own lines by default, Ray's informational output only with --verbose."""

from __future__ import annotations

import logging.config
import os

import yaml

from mugato_ray import console
from mugato_ray.cli import parse_job_args
from mugato_ray.train import progress_line


def test_time_left_is_said_in_the_unit_that_reads_best():
    assert console.eta(0, 10, 5.0) == ""  # no rate yet
    assert console.eta(10, 10, 5.0) == ""  # done
    assert console.eta(5, 10, 30.0) == "about 30 s left"
    assert console.eta(1, 11, 60.0) == "about 10 min left"
    assert console.eta(1, 101, 360.0) == "about 10.0 h left"


def test_training_progress_line_has_rate_time_left_and_loss_and_all_metrics_only_when_verbose():
    metrics = {"step": 50, "lr": 1e-3, "loss": 1.23456, "loss/CartPole-v1": 0.5, "tokens_per_s": 1000.0}
    quiet = progress_line(metrics, total=200, steps_here=50, seconds=100.0, verbose=False)
    assert quiet == "train step 50/200 (25%), 0.50 steps/s, about 5 min left, loss 1.2346"
    loud = progress_line(metrics, total=200, steps_here=50, seconds=100.0, verbose=True)
    assert loud.startswith("train step 50/200") and "loss/CartPole-v1=0.5" in loud and "tokens_per_s=1000" in loud
    resumed = progress_line({"step": 150}, total=200, steps_here=50, seconds=100.0, verbose=False)
    assert resumed == "train step 150/200 (75%), 0.50 steps/s, about 2 min left"  # the rate of this attempt


def test_verbose_flag_reaches_the_environment_that_ray_processes_inherit(tmp_path, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ntasks: [{{name: CartPole-v1}}]\n")
    parse_job_args(["--config", str(path), "--verbose"], "d")
    assert console.verbose() and os.environ[console.VERBOSE_ENV] == "1" and console.quiet_ray_environment() == {}
    assert console.train_log_level() == "INFO"
    parse_job_args(["--config", str(path)], "d")
    assert not console.verbose() and console.train_log_level() == "WARNING"
    env = console.quiet_ray_environment()
    assert env["RAY_DATA_LOGGING_CONFIG"] == str(console.RAY_DATA_LOGGING_FILE)


def test_ray_data_logging_config_keeps_the_file_and_shows_errors_only():
    config = yaml.safe_load(console.RAY_DATA_LOGGING_FILE.read_text())
    assert config["handlers"]["console"]["level"] == "ERROR"
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]
    assert config["loggers"]["ray.data"]["level"] == "DEBUG"  # the file gets everything
    logging.config.dictConfig(config)  # a valid logging config (Ray Data loads it the same way)
    handler = next(h for h in logging.getLogger("ray.data").handlers if h.level)
    assert handler.level == logging.ERROR
