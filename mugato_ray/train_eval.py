"""Evaluation during training: snapshots of the weights are scored while training goes on.

Every ``train.eval_every`` steps (and at the last step) once every task has joined the mixture
(``tasks[].start_step``: before that a snapshot would score tasks not yet trained, and only take a core
from training; ``mugato_ray.train.scores_snapshot``), rank 0 writes a snapshot of the weights
(``checkpoints.write_snapshot``: ``<run_dir>/snapshots/step_<N>/`` with model.pt, config.yaml,
layouts.json and a BPE tokenizer) and hands its path to a :class:`TrainingEvaluator` actor without
waiting. The actor scores snapshots one after the other, in its own process, with the evaluation
harness's pieces (``rollout.measure_returns`` for environment tasks, ``score_dataset_chunk`` for
dataset tasks), on ``train.eval_episodes`` *validation* seeds per task:
``eval.validation_seed_offset + i``, disjoint from the collection seeds and from the final evaluation's
seeds, so that choosing a snapshot by its score does not leak into the reported numbers.

Each record (``{"step", "tasks": {task: {"mean_return", "normalized", "success_rate", "episodes",
"env_steps_per_s"}}, "iqm"}``) is appended to ``<run_dir>/snapshots/scores.json`` as it lands, and its numbers
go to the run's ``eval`` metrics as ``validation/<task>/<key>`` and ``validation/iqm`` at its step
(``<run_dir>/metrics/eval.csv`` and TensorBoard: ``mugato_ray.metric_log``). The main job then evaluates the snapshot
with the best IQM, or the latest within ``train.select_margin`` of it, and says which it chose
(:func:`best_snapshot`).

On a cluster the actor takes a CPU of its own (``resources.EVAL_SHARE`` of the logical CPUs is held
back from training for it); on a 2-core laptop it shares the cores with training, which slows it down.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mugato_ray.checkpoints import snapshot_root
from mugato_ray.config import Config
from mugato_ray.evaluate import dataset_references, score_dataset_chunk
from mugato_ray.metric_log import open_metric_log, score_metrics
from mugato_ray.metrics import iqm, normalized_score
from mugato_ray.resolve import ResolvedTask, resolve_task, resolve_tasks
from mugato_ray.rollout import PolicySpec, measure_returns

SCORES_FILE = "scores.json"


def validation_seeds(cfg: Config) -> list[int]:
    """The seeds snapshots are scored on: ``eval.validation_seed_offset + i`` for ``i < train.eval_episodes``."""
    return [cfg.eval.validation_seed_offset + i for i in range(cfg.train.eval_episodes)]


def score_policy(cfg: Config, task: str | ResolvedTask, policy: Any, seeds: Sequence[int]) -> dict:
    """``{"mean_return", "normalized", "success_rate", "episodes", "env_steps_per_s"}`` of ``policy`` on ``task``
    over ``seeds``, in this process (a dataset task's steps are its answers).

    ``policy``: a ``PolicySpec``, or (environment tasks) any object of the rollout Policy protocol. Environment
    tasks are measured by ``rollout.measure_returns``: episodes run to the task's own step limit, where the
    references were measured (``rollout.max_episode_steps`` is for collection).
    """
    task, t0 = resolve_task(task, cfg), time.perf_counter()
    if task.info.has_env:
        # An episode lost to an env error is left out, as in the final evaluation: training goes on.
        stats = measure_returns(task, policy, cfg, seeds, skip_failed=True)
        returns, successes, references = stats.returns.tolist(), stats.successes, task.references
        steps = int(stats.lengths.sum())
    else:
        outcomes = score_dataset_chunk(cfg, task.name, policy, list(seeds))
        returns, successes = [o["return"] for o in outcomes], [o["success"] for o in outcomes]
        references, steps = dataset_references(task), len(outcomes)
    seconds = time.perf_counter() - t0
    successes = [s for s in successes if s is not None]
    mean = float(np.mean(returns)) if returns else float("nan")
    return {"mean_return": mean, "normalized": normalized_score(mean, *references),
            "success_rate": float(np.mean(successes)) if successes else None, "episodes": len(returns),
            "env_steps_per_s": steps / seconds if seconds > 0 else None}


class TrainingEvaluator:
    """Scores snapshots in the order they are submitted (a Ray actor: its calls run one at a time)."""

    def __init__(self, cfg: Config):
        import torch

        torch.set_num_threads(1)  # it runs beside training: one core's worth at most
        self.cfg = cfg
        self.tasks = resolve_tasks(cfg)
        # A resumed run keeps the scores of the snapshots its earlier attempts wrote.
        self.records: list[dict] = read_scores(cfg)
        self.metrics: Any = None  # the "eval" metric stream, opened at the first snapshot

    def evaluate(self, step: int, model_file: str) -> dict:
        policy = PolicySpec("model", model_file, temperature=self.cfg.rollout.temperature)
        seeds = validation_seeds(self.cfg)
        tasks = {name: score_policy(self.cfg, task, policy, seeds) for name, task in self.tasks.items()}
        record = {"step": int(step), "model_file": model_file, "tasks": tasks,
                  "iqm": iqm([t["normalized"] for t in tasks.values()])}
        self.records = [r for r in self.records if r["step"] != record["step"]] + [record]
        _write_json(snapshot_root(self.cfg) / SCORES_FILE, self.records)
        self.log_metrics(record)
        return record

    def log_metrics(self, record: dict) -> None:
        """``validation/...`` scores of ``record`` into the run's ``eval`` metrics (``metric_log``). This
        attempt's first snapshot starts the stream at its step: what an interrupted attempt logged from there
        on is dropped (snapshots come in step order)."""
        if self.metrics is None:
            self.metrics = open_metric_log(self.cfg, "eval", start_step=record["step"])
        tasks = {name: {**t, "normalized_score": t["normalized"]} for name, t in record["tasks"].items()}
        self.metrics.write(record["step"], score_metrics("validation", tasks, record["iqm"]))

    def results(self) -> list[dict]:
        """Every record so far (called after the last submission: it runs after every queued evaluation)."""
        return list(self.records)

    def close(self) -> None:
        """Close the metric writers (a W&B run is finished; CSV and TensorBoard are on disk after each write)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def start_evaluator(cfg: Config, num_cpus: float) -> Any:
    """A :class:`TrainingEvaluator` actor reserving ``num_cpus`` logical CPUs; ``run_dir`` is made absolute
    here, in the driver (the actor does not run in the driver's directory)."""
    import dataclasses

    import ray

    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
    return ray.remote(TrainingEvaluator).options(num_cpus=num_cpus).remote(cfg)


def read_scores(cfg: Config) -> list[dict]:
    """The records of ``<run_dir>/snapshots/scores.json`` (empty when there is none); a malformed file is an
    error naming it."""
    path = snapshot_root(cfg) / SCORES_FILE
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not all(isinstance(r, dict) and "step" in r for r in records):
            raise ValueError("expected a list of {'step': ...} records")
    except ValueError as e:
        raise ValueError(f"snapshot scores {path} are malformed ({e}); delete the file to start them afresh") from e
    return records


def best_snapshot(records: Sequence[dict], margin: float = 0.0) -> dict | None:
    """The record to evaluate: the latest step whose IQM is within ``margin`` of the highest (``margin`` 0:
    the highest IQM, the latest step among equals); None when none has an IQM (``train.select_margin``)."""
    scored = [r for r in records if r.get("iqm") is not None]
    if not scored:
        return None
    top = max(r["iqm"] for r in scored)
    return max((r for r in scored if r["iqm"] >= top - margin), key=lambda r: r["step"])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)
