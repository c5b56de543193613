"""Distributed training on Ray: Ray Data sequence streams into a Ray Train ``TorchTrainer`` (DDP).

``train(cfg)`` builds one sequence dataset per task (``mugato_ray.data``), sizes workers and actors
from the cluster (``mugato_ray.resources``) and runs :func:`train_loop_per_worker` on every worker. The
worker loop wires the pieces that know nothing of Ray to Ray Train:

- it restores the model and optimizer (``learner.restore``) from the newest checkpoint of the run that
  verifies (``checkpoints.latest_checkpoint``), or starts at step 0; ``ray.train.torch.prepare_model``
  moves the model to the worker's device and wraps it in DDP when there are several workers;
- it reads one endless :class:`TaskStream` of micro-batches per task from the worker's dataset shard
  and hands them to ``learner.Learner.step`` (the mixture, gradient accumulation, clipping, AdamW);
- every ``log_every`` steps ``ray.train.report`` gets the per-task loss and non-pad fraction of the
  positions computed (``nonpad/<task>``, after packing), real tokens/s (pads not counted), lr and grad
  norm (``learner.MetricWindow``); every ``checkpoint_every`` steps (and at the end) rank 0 reports a
  checkpoint directory (``checkpoints.write_checkpoint``); with ``train.eval_every`` rank 0 hands weight
  snapshots to the evaluator actor (``mugato_ray.train_eval``) without waiting;
- rank 0 writes every report to ``<run_dir>/metrics/`` (``train.csv``, TensorBoard under ``tb/train/``:
  ``mugato_ray.metric_log``); an attempt that resumes at step S first drops what was logged after S.

Resume: running again with the same ``run_dir`` (same ``RunConfig(name, storage_path)``) continues from
the latest verified checkpoint, at its step; ``train.max_failures`` lets Ray Train restart dead workers
from it. Test hook: ``learner.FaultHook`` (``MUGATO_TEST_CRASH_AT_STEP``), read here by the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mugato_ray.checkpoints import (
    checkpoint_dir_name,
    latest_checkpoint,
    read_state,
    run_name,
    save_local_checkpoint,
    storage_path,
    write_checkpoint,
    write_snapshot,
)
from mugato_ray.config import Config
from mugato_ray.console import eta, quiet_train_worker, set_verbose, train_log_level, verbose
from mugato_ray.data import ONLINE_KEY, TaskData, build_datasets, task_batch_size, task_weights
from mugato_ray.learner import FaultHook, Learner, LoopState, MetricWindow, restore
from mugato_ray.metric_log import check_loggers, open_metric_log
from mugato_ray.resolve import ResolvedTask, resolve_tasks
from mugato_ray.resources import Plan, describe, plan_resources
from mugato_ray.tokenizer import VocabLayout
from mugato_ray.weights import publish_weights, start_board

log = logging.getLogger(__name__)

SHUFFLE_BUFFER_BATCHES = 8
"""Local shuffle buffer of each task stream, in batches: mixes the back-to-back windows of one actor call."""


class TrainingFailedError(RuntimeError):
    """Training failed past ``train.max_failures`` worker restarts; the message names the key and the cause."""


@dataclass
class TrainResult:
    checkpoint_path: str | None
    """The latest checkpoint directory (model.pt, state.pt, config.yaml, layouts.json)."""
    final_step: int
    """Optimizer steps done when training stopped."""
    metrics: dict[str, Any]
    """The last reported metrics."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every report of rank 0's last attempt, in order."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """Scores of the snapshots evaluated during training (``train.eval_every``), by step."""
    skipped_files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """task -> (file, reason) of store files left out (``data.on_bad_file: skip``)."""
    online: Any = None
    """``online.OnlineStats`` of the online loop (``online.enabled``), else None."""


# ---------------------------------------------------------------------------------------------
# Task streams


class TaskStream:
    """Endless micro-batches of one task from this worker's dataset shard.

    When a pass ends (every rank ends it at the same micro-batch: the shards are equal and batches drop
    the remainder), the next one starts: Ray Data re-executes the dataset with new windows.
    """

    def __init__(self, shard: Any, batch_size: int, seed: int, device: torch.device):
        self.shard, self.batch_size, self.seed, self.device = shard, batch_size, seed, device
        self.epoch, self._it, self._first = 0, None, None
        self.online_rows = 0
        """Rows of online episodes this stream has returned (``data.ONLINE_KEY``; online experience only)."""

    def start(self) -> TaskStream:
        """Start the pass and fetch its first batch (called for all tasks at once, see :func:`start_streams`)."""
        self._first = self._next()
        return self

    def next(self) -> dict[str, torch.Tensor]:
        batch = self._next()
        online = batch.pop(ONLINE_KEY, None)
        if online is not None:
            self.online_rows += int(online.sum())
        return batch

    def _next(self) -> dict[str, torch.Tensor]:
        if self._first is not None:
            batch, self._first = self._first, None
            return batch
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.shard.iter_torch_batches(
                    batch_size=self.batch_size,
                    drop_last=True,
                    local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * self.batch_size,
                    local_shuffle_seed=self.seed + self.epoch,
                    device=self.device,
                ))
            try:
                return next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
        raise RuntimeError("a task dataset produced no full batch in a whole pass; its store is too small "
                           "for data.batch_size x train workers")


def scores_snapshot(cfg: Config, done: int) -> bool:
    """Whether a snapshot is scored after ``done`` optimizer steps: every ``train.eval_every`` steps and at the
    last, once every task of positive weight has trained (``done`` past its ``tasks[].start_step``)."""
    tcfg = cfg.train
    if tcfg.eval_every <= 0 or not (done % tcfg.eval_every == 0 or done == tcfg.steps):
        return False
    return done > max((t.start_step for t in cfg.tasks if t.weight > 0), default=0)


def start_streams(streams: dict[str, TaskStream]) -> None:
    """Start every task's pass concurrently: each first batch waits for its dataset's actors to start,
    which would otherwise add up, one task after the other, on the first step."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        list(pool.map(TaskStream.start, streams.values()))


# ---------------------------------------------------------------------------------------------
# The worker loop


def restore_on_worker(cfg: Config, vocab: VocabLayout, rank: int) -> LoopState:
    """The model (prepared by Ray Train) and optimizer from the newest verified checkpoint, or fresh.

    ``cfg.run_dir`` must be the driver's absolute one: Ray Train workers do not run in its directory.
    """
    import ray.train
    import ray.train.torch

    checkpoint = ray.train.get_checkpoint()
    if "://" not in storage_path(cfg):
        # The newest checkpoint that verifies, whatever Ray's bookkeeping says: after a SIGKILL Ray may
        # know only an older one, and its newest may be truncated. (The driver-mode loop keeps its own
        # checkpoints, which Ray does not track at all.) Workers read the same shared storage.
        checkpoint = None
        with contextlib.suppress(FileNotFoundError):
            checkpoint = ray.train.Checkpoint.from_directory(str(latest_checkpoint(cfg, warn=rank == 0)))
    prepare = ray.train.torch.prepare_model  # moves to the device; DDP when world > 1
    if checkpoint is None:
        return restore(cfg, vocab, None, rank, prepare)
    with checkpoint.as_directory() as d:
        return restore(cfg, vocab, Path(d), rank, prepare)


def report(metrics: dict[str, Any], done: int, ckpt_now: bool, learner: Learner, config: dict[str, Any],
           rank: int) -> None:
    """``ray.train.report`` of one log or checkpoint step. On checkpoint steps rank 0 reports a checkpoint
    (in driver mode one written in place into the run's storage, which Ray Train does not persist)."""
    import ray.train

    cfg, specs, layouts = config["cfg"], config["specs"], config["layouts"]
    # model.pt holds the weights the run acts with; with train.ema_decay the training weights go to state.pt.
    model, optimizer = learner.acting_model, learner.optimizer
    train_model = learner.raw_model if learner.average is not None else None
    if ckpt_now and config.get("local_mode", False):
        # Ray Train's driver mode (num_workers=0) does not persist checkpoints: write them in place.
        path = save_local_checkpoint(cfg, model, optimizer, done, specs, layouts, train_model)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
    elif ckpt_now and rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), model, optimizer, done, cfg, specs, layouts, train_model)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(done))
        # The controller registers a reported checkpoint asynchronously; a worker that died before
        # that would restart from the previous one (or from step 0). Wait until it is committed.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    else:
        ray.train.report(metrics)


def maybe_publish(config: dict[str, Any], learner: Learner, step: int, first: bool, rank: int) -> None:
    """Rank 0 publishes its weights to the online actors at its first step and every
    ``online.publish_every`` steps (``weights.publish_weights``; online experience only)."""
    board, every = config.get("weights_board"), config["cfg"].online.publish_every
    if board is not None and rank == 0 and (first or step % every == 0):
        publish_weights(board, learner.raw_model, step)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The loop every Ray Train worker runs; returns (on rank 0) the metrics it reported."""
    import ray.train
    import ray.train.torch

    cfg: Config = config["cfg"]
    plan: Plan = config["plan"]
    specs, layouts = config["specs"], config["layouts"]
    tasks, tcfg = [t.name for t in cfg.tasks], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(plan.torch_threads)
    set_verbose(config.get("verbose", True))  # this worker's console (mugato_ray.console)
    quiet_train_worker()
    # The run directory as the driver resolved it: Ray Train workers do not run in the driver's directory.
    local_cfg = dataclasses.replace(cfg, run_dir=config["run_dir_abs"])

    state = restore_on_worker(local_cfg, next(iter(specs.values())).vocab, rank)
    streams = {t: TaskStream(task_shard(t), task_batch_size(cfg, t), tcfg.seed * 7919 + rank, device) for t in tasks}
    if state.step < tcfg.steps:  # tasks of weight 0 are never drawn: their datasets never start
        start_streams({t: streams[t] for t, w in zip(tasks, task_weights(cfg)) if w > 0})
    evaluator = config.get("evaluator")  # scores snapshots while training goes on (mugato_ray.train_eval)
    fault = FaultHook(config.get("crash_at_step"), local_cfg.run_dir, rank)
    window = MetricWindow(len(tasks), device)
    learner = Learner(state.model, state.optimizer, cfg, layouts, device, state.average)
    # Rank 0 keeps every report (Ray Train keeps none without a checkpoint); what an interrupted attempt
    # logged after this attempt's checkpoint is dropped.
    metric_log = open_metric_log(local_cfg, "train", start_step=state.step + 1) if rank == 0 else None

    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(state.step, tcfg.steps):
        fault.before_step(step)
        maybe_publish(config, learner, step, step == state.step, rank)
        stats = learner.step(step, lambda task: streams[task].next())
        window.add_step(stats)
        done = step + 1
        if evaluator is not None and rank == 0 and scores_snapshot(cfg, done):
            # Not awaited: the actor scores it while training goes on.
            snapshot = write_snapshot(local_cfg, learner.acting_model, done, specs, layouts)
            evaluator.evaluate.remote(done, str(snapshot))
        log_now = done % tcfg.log_every == 0 or done == tcfg.steps
        ckpt_now = done % tcfg.checkpoint_every == 0 or done == tcfg.steps
        if not (log_now or ckpt_now):
            continue
        metrics: dict[str, Any] = {"step": done, "lr": stats.lr, "grad_norm": float(stats.grad_norm)}
        if log_now:
            metrics |= window.summary(tasks, world=world, params=learner.raw_model.parameters())
            metrics |= {f"online_rows/{t}": s.online_rows for t, s in streams.items() if cfg.online.enabled}
        if metric_log is not None:
            history.append(metrics)
            metric_log.write(done, metrics)
            log.info(progress_line(metrics, tcfg.steps, done - state.step, time.perf_counter() - started,
                                   config.get("verbose", True)))
        report(metrics, done, ckpt_now, learner, config, rank)
    if metric_log is not None:
        metric_log.close()
    return history


def dataset_name(task: str) -> str:
    """The name Ray Train gives a task's dataset: Ray Data names its log files after it, so a task name with a
    "/" (``ALE/Pong-v5``) would point them into a folder that does not exist and stop training."""
    return task.replace("/", "_")


def task_shard(task: str) -> Any:
    """This Ray Train worker's shard of ``task``'s dataset."""
    import ray.train  # lazy: as in train_loop_per_worker (the module is imported by processes without Ray Train)

    return ray.train.get_dataset_shard(dataset_name(task))


def progress_line(metrics: dict[str, Any], total: int, steps_here: int, seconds: float, verbose: bool) -> str:
    """Rank 0's line at a log step: step, rate, time left and mean loss; every metric when ``verbose``
    (the metrics files hold them all either way)."""
    done = metrics["step"]
    rate = steps_here / seconds if seconds > 0 else 0.0
    head = f"train step {done}/{total} ({100 * done / total:.0f}%), {rate:.2f} steps/s"
    left = eta(steps_here, steps_here + total - done, seconds)
    head += f", {left}" if left else ""
    if verbose:
        return head + " | " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
    return head + (f", loss {metrics['loss']:.4f}" if "loss" in metrics else "")


# ---------------------------------------------------------------------------------------------
# The driver


def make_trainer(cfg: Config, plan: Plan, data: TaskData, evaluator: Any, board: Any = None) -> Any:
    """The ``TorchTrainer`` that runs :func:`train_loop_per_worker` on ``plan.train_workers`` workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": plan.cpus_per_worker} | ({"GPU": 1} if plan.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "plan": plan,
            "specs": data.specs,
            "layouts": data.layouts,
            "crash_at_step": FaultHook.from_env(),
            # Resolved here: Ray Train workers do not run in the driver's directory.
            "run_dir_abs": str(Path(cfg.run_dir).resolve()),
            "local_mode": plan.train_workers == 0,
            "evaluator": evaluator,
            "weights_board": board,
            "verbose": verbose(),
        },
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.train_workers, use_gpu=plan.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name(cfg),
            storage_path=storage_path(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=train_log_level()),  # mugato_ray.console
        ),
        datasets={dataset_name(t): ds for t, ds in data.datasets.items()},
        dataset_config=ingest_config(cfg),
    )


def ingest_config(cfg: Config) -> Any:
    """Ray Train's dataset options: this process's Ray Data options (what Ray Train carries over by default),
    in the store's order when ``data.preserve_order`` (then the split between workers ignores node locality
    too, so it is the same every run)."""
    import copy

    import ray.data
    import ray.train

    # A copy, not DataConfig.default_ingest_options(): that passes exclude_resources to ExecutionOptions
    # and Ray warns of its deprecation in every run.
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = cfg.data.preserve_order
    return ray.train.DataConfig(execution_options=options)


def train(cfg: Config, plan: Plan | None = None, resolved: Mapping[str, ResolvedTask] | None = None) -> TrainResult:
    """Train on every task's store under ``<run_dir>/data/``; resumes the run if it has checkpoints.

    Needs a connected Ray (``cli.init_ray``). ``plan`` defaults to ``plan_resources(cfg,
    ray.cluster_resources())``; ``resolved`` (the run's tasks) to ``resolve_tasks(cfg)``.
    """
    import ray
    import ray.train

    check_loggers(cfg.train.loggers)  # here, not in a worker after the datasets have started
    plan = plan or plan_resources(cfg, ray.cluster_resources())
    log.info("resources: %s", describe(plan, len(cfg.tasks)))
    data = build_datasets(cfg, plan, world_size=max(1, plan.train_workers), resolved=resolved)
    evaluator = online = board = None
    if cfg.train.eval_every > 0:
        # Lazy: the evaluator's and online actors' rollouts import gymnasium, which training workers
        # (importing this module) do not need.
        from mugato_ray.train_eval import start_evaluator

        evaluator = start_evaluator(cfg, plan.eval_cpus)
    if cfg.online.enabled:
        from mugato_ray.online import OnlineLoop  # lazy: as for the evaluator

        board = start_board()
        online = OnlineLoop(cfg, resolved or resolve_tasks(cfg), board).start()
    trainer = make_trainer(cfg, plan, data, evaluator, board)
    try:
        result = trainer.fit()
        # Actor calls run in order: this returns once every submitted snapshot is scored.
        evaluations = ray.get(evaluator.results.remote()) if evaluator is not None else []
        if evaluator is not None:
            ray.get(evaluator.close.remote())
    except ray.train.TrainingFailedError as e:
        raise TrainingFailedError(
            f"training of run '{run_name(cfg)}' failed after train.max_failures={cfg.train.max_failures} "
            "restarts of its workers (raise it to survive more failures; a rerun resumes from the newest "
            f"verified checkpoint under {Path(storage_path(cfg)) / run_name(cfg)}). Cause: {e}"
        ) from e
    finally:
        if evaluator is not None:
            ray.kill(evaluator)
        online_stats = online.stop() if online is not None else None
        if board is not None:
            ray.kill(board)
    history = list(result.return_value or [])
    metrics = dict(result.metrics or {})
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt is None:
        with contextlib.suppress(FileNotFoundError):
            ckpt = str(latest_checkpoint(cfg))
    final_step = int(metrics["step"]) if "step" in metrics else (int(read_state(Path(ckpt))["step"]) if ckpt else 0)
    return TrainResult(checkpoint_path=ckpt, final_step=final_step, metrics=metrics, history=history,
                       evaluations=evaluations, skipped_files=data.skipped_files, online=online_stats)
