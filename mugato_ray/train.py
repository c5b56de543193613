"""Distributed training: Ray Data sequence streams into a Ray Train ``TorchTrainer`` (DDP).

``train(cfg)`` builds one sequence dataset per task (``mugato_ray.data``), sizes workers and actors
from the cluster (``mugato_ray.resources``) and runs :func:`train_loop_per_worker` on every worker:

- each optimizer step accumulates gradients over ``M`` micro-batches whose tasks come from the
  weighted mixture (``data.step_tasks``: the same tasks in the same order on every rank); each
  micro-batch's loss is its task's mean over loss tokens, weighted ``1/M``; DDP synchronizes only the
  last micro-batch's backward (``no_sync`` on the others);
- AdamW (weight decay on matrices and embeddings, i.e. tensors with >= 2 dims; none on norms and
  biases), linear warmup then cosine decay to ``lr * min_lr_ratio`` (a pure function of the step, so a
  resumed run needs no scheduler state), global gradient-norm clipping, bf16 autocast on GPU only;
- every ``log_every`` steps ``ray.train.report`` gets the per-task loss and non-pad fraction of the
  positions computed (``nonpad/<task>``, after packing), real tokens/s (pads not counted), lr and grad norm;
  every ``checkpoint_every`` steps (and at the end) rank 0 adds a checkpoint directory:
  ``model.pt`` (``model.save_model``), ``state.pt`` (optimizer, step, torch RNG), ``config.yaml`` and
  ``layouts.json`` (``data.save_layouts``), all loadable without executing code.

Resume: running again with the same ``run_dir`` (same ``RunConfig(name, storage_path)``) continues from
the latest checkpoint, at its step; ``train.max_failures`` lets Ray Train restart dead workers from it.
Test hook: ``MUGATO_TEST_CRASH_AT_STEP=<n>`` makes rank 0 exit hard once when it reaches step ``n``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mugato_ray.config import Config, TrainConfig, save_config
from mugato_ray.data import (
    LAYOUTS_FILE,
    build_datasets,
    micro_batches_per_step,
    save_layouts,
    step_tasks,
    task_batch_size,
    task_weights,
)
from mugato_ray.resources import Plan, describe, plan_resources

log = logging.getLogger(__name__)

CRASH_ENV = "MUGATO_TEST_CRASH_AT_STEP"
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.pt", "state.pt", "config.yaml"
MANIFEST_FILE = "manifest.json"
"""Written last into every checkpoint: each file's size and SHA-256, so a checkpoint can be verified."""
STATE_FORMAT = 1
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


# ---------------------------------------------------------------------------------------------
# Optimization


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    progress = min(1.0, (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps))
    return tcfg.lr * (tcfg.min_lr_ratio + (1.0 - tcfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on tensors with >= 2 dims (matmul weights, conv kernels, embedding tables, as
    nanoGPT and GATO's "matrices"), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))


def touch_all(model: torch.nn.Module) -> torch.Tensor:
    """A zero that depends on every parameter.

    Added to each micro-batch's loss so that every parameter gets a gradient in every backward, even
    those a task does not use (the patch embedding in a text-only micro-batch). DDP then needs no
    ``find_unused_parameters`` (which walks the autograd graph after every forward and interacts
    subtly with ``no_sync`` accumulation), its buckets become ready in the same order for every task,
    and the gradients are unchanged (d(0 * sum p)/dp = 0). It costs one read of the parameters.
    """
    return sum(p.sum() for p in model.parameters()) * 0.0


# ---------------------------------------------------------------------------------------------
# Checkpoints


def run_name(cfg: Config) -> str:
    """Ray Train run name: the run directory's name (the same run directory resumes the same run)."""
    return Path(cfg.run_dir).resolve().name or "run"


def storage_path(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints: ``train.storage_path`` (a path, or a URI such as ``s3://...``)
    or ``<run_dir>/checkpoints``; paths are made absolute."""
    if cfg.train.storage_path and "://" in cfg.train.storage_path:
        return cfg.train.storage_path
    return str(Path(cfg.train.storage_path or Path(cfg.run_dir) / "checkpoints").resolve())


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """``manifest.json``: size and SHA-256 of every other file of ``directory``; written last, atomically."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"files": manifest}, indent=1))
    return tmp.replace(directory / MANIFEST_FILE)


def verify_checkpoint(directory: Path) -> str | None:
    """None when ``directory`` is a complete checkpoint whose files match its manifest, else the reason."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (it is written last: the checkpoint was never completed)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({e})"
    for name in (MODEL_FILE, STATE_FILE):
        if name not in files:
            return f"{MANIFEST_FILE} does not list {name}"
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want.get('bytes')}"
        if _sha256(path) != want.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def latest_checkpoint(cfg: Config, warn: bool = True) -> Path:
    """The newest checkpoint of this run that verifies against its manifest, whatever Ray's own bookkeeping
    says (checked newest first, so older ones are not read). Newer ones that do not verify are logged
    (``warn``), each with its reason and folder. FileNotFoundError naming where it looked, and what it
    skipped, when none verifies."""
    if "://" in storage_path(cfg):
        raise ValueError(f"train.storage_path={storage_path(cfg)!r} is not a local or mounted path; open its "
                         "checkpoints with ray.train.Result.from_path")
    root = Path(storage_path(cfg)) / run_name(cfg)
    newest, skipped = None, []
    for d in sorted(root.glob("checkpoint_[0-9]*"), reverse=True) if root.is_dir() else []:
        why = verify_checkpoint(d) if d.is_dir() else "not a directory"
        if why is None:
            newest = d
            break
        skipped.append((d, why))
    if warn:
        for d, why in skipped:
            log.warning("checkpoint %s does not verify (%s); using %s instead. Delete that folder to silence "
                        "this.", d, why, newest or "none (training starts at step 0)")
    if newest is None:
        also = f"; skipped {len(skipped)} that do not verify: {[str(d) for d, _ in skipped][:3]}" if skipped else ""
        raise FileNotFoundError(f"no checkpoint of run '{run_name(cfg)}' under {root}{also}; train first "
                                "(jobs/train.py)")
    return newest


def write_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     cfg: Config, specs: dict, layouts: dict) -> None:
    """Fill ``directory`` with model.pt, state.pt, config.yaml, layouts.json (and a BPE tokenizer.json)."""
    from mugato_ray.model import save_model

    save_model(model, directory / MODEL_FILE)
    torch.save({"format": STATE_FORMAT, "step": step, "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state()}, directory / STATE_FILE)
    save_config(cfg, directory)
    save_layouts(directory / LAYOUTS_FILE, specs, layouts)
    if cfg.tokenizer.text == "bpe" and cfg.tokenizer.bpe_path:
        shutil.copyfile(cfg.tokenizer.bpe_path, directory / "tokenizer.json")
    write_manifest(directory)  # last: a checkpoint without it never completed


def save_local_checkpoint(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                          specs: dict, layouts: dict) -> Path:
    """Write a checkpoint straight into the run's storage (complete or absent: a hidden temporary
    directory renamed into place) and keep the newest ``train.keep_checkpoints``."""
    root = Path(storage_path(cfg)) / run_name(cfg)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    write_checkpoint(tmp, model, optimizer, step, cfg, specs, layouts)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("checkpoint_[0-9]*"))[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def read_state(directory: Path) -> dict[str, Any]:
    """state.pt of a checkpoint directory (``weights_only=True``); ValueError naming the file if bad."""
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise ValueError(f"training state {path} is missing or corrupt: {e}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"training state {path}: expected format {STATE_FORMAT}")
    return state


# ---------------------------------------------------------------------------------------------
# The loop


class TaskStream:
    """Endless micro-batches of one task from this worker's dataset shard.

    When a pass ends (every rank ends it at the same micro-batch: the shards are equal and batches drop
    the remainder), the next one starts: Ray Data re-executes the dataset with new windows.
    """

    def __init__(self, shard: Any, batch_size: int, seed: int, device: torch.device):
        self.shard, self.batch_size, self.seed, self.device = shard, batch_size, seed, device
        self.epoch, self._it, self._first = 0, None, None

    def start(self) -> TaskStream:
        """Start the pass and fetch its first batch (called for all tasks at once, see :func:`start_streams`)."""
        self._first = self.next()
        return self

    def next(self) -> dict[str, torch.Tensor]:
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


def start_streams(streams: dict[str, TaskStream]) -> None:
    """Start every task's pass concurrently: each first batch waits for its dataset's actors to start,
    which would otherwise add up, one task after the other, on the first step."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        list(pool.map(TaskStream.start, streams.values()))


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The loop every Ray Train worker runs; returns (on rank 0) the metrics it reported."""
    import ray.train
    import ray.train.torch

    from mugato_ray.model import GatoModel, load_model

    cfg: Config = config["cfg"]
    plan: Plan = config["plan"]
    specs, layouts = config["specs"], config["layouts"]
    tasks = [t.name for t in cfg.tasks]
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(plan.torch_threads)

    vocab = next(iter(specs.values())).vocab
    model = GatoModel(cfg.model, vocab, patch_size=cfg.tokenizer.patch_size, mu=cfg.tokenizer.mu, M=cfg.tokenizer.M)
    start, state = 0, None
    local = config.get("local_mode", False)
    # The run directory as the driver resolved it: Ray Train workers do not run in the driver's directory.
    local_cfg = dataclasses.replace(cfg, run_dir=config["run_dir_abs"])
    checkpoint = ray.train.get_checkpoint()
    if "://" not in storage_path(local_cfg):
        # The newest checkpoint that verifies, whatever Ray's bookkeeping says: after a SIGKILL Ray may
        # know only an older one, and its newest may be truncated. (The driver-mode loop keeps its own
        # checkpoints, which Ray does not track at all.) Workers read the same shared storage.
        checkpoint = None
        with contextlib.suppress(FileNotFoundError):
            checkpoint = ray.train.Checkpoint.from_directory(str(latest_checkpoint(local_cfg, warn=rank == 0)))
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_model(Path(d) / MODEL_FILE).state_dict())
            state = read_state(Path(d))
        start = int(state["step"])
    # Seeds depend on the rank and the step the attempt starts at: every (re)start is reproducible.
    torch.manual_seed(int(np.random.SeedSequence([tcfg.seed, rank, start]).generate_state(1)[0]))
    if state is not None and rank == 0:
        torch.set_rng_state(state["torch_rng"])
    model = ray.train.torch.prepare_model(model)  # moves to the device; DDP when world > 1
    raw_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    optimizer = make_optimizer(raw_model, tcfg)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    streams = {t: TaskStream(ray.train.get_dataset_shard(t), task_batch_size(cfg, t), tcfg.seed * 7919 + rank, device)
               for t in tasks}
    if start < tcfg.steps:  # tasks of weight 0 are never drawn: their datasets never start
        start_streams({t: streams[t] for t, w in zip(tasks, task_weights(cfg)) if w > 0})
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    evaluator = config.get("evaluator")  # scores snapshots while training goes on (mugato_ray.train_eval)
    crash_at = config.get("crash_at_step")
    marker = Path(local_cfg.run_dir) / f".crashed_at_step_{crash_at}"
    m = micro_batches_per_step(cfg)

    history: list[dict[str, Any]] = []
    # Summed on the device: reading a loss back (.item()) would synchronize a GPU every micro-batch.
    loss_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    loss_cnt = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    tokens = torch.zeros(len(tasks), dtype=torch.float64, device=device)  # real (non-pad) tokens
    positions = torch.zeros(len(tasks), dtype=torch.float64, device=device)  # positions the blocks computed
    t_window = time.perf_counter()
    model.train()
    for step in range(start, tcfg.steps):
        if crash_at is not None and step == crash_at and rank == 0 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os._exit(1)
        lr = lr_at(step, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        for i, k in enumerate(step_tasks(cfg, step)):
            task = tasks[k]
            batch = streams[task].next()
            sync = not ddp or i == m - 1
            with (contextlib.nullcontext() if sync else model.no_sync()), amp:
                out = model(batch, layouts[task])
                (out.loss / m + touch_all(raw_model)).backward()
            loss_sum[k] += out.loss.detach().double()
            loss_cnt[k] += 1
            tokens[k] += out.num_tokens
            positions[k] += out.num_positions
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
        optimizer.step()

        done = step + 1
        if evaluator is not None and rank == 0 and (done % tcfg.eval_every == 0 or done == tcfg.steps):
            from mugato_ray.train_eval import write_snapshot

            # Not awaited: the actor scores it while training goes on.
            snapshot = write_snapshot(local_cfg, raw_model, done, specs, layouts)
            evaluator.evaluate.remote(done, str(snapshot))
        log_now = done % tcfg.log_every == 0 or done == tcfg.steps
        ckpt_now = done % tcfg.checkpoint_every == 0 or done == tcfg.steps
        if not (log_now or ckpt_now):
            continue
        metrics: dict[str, Any] = {"step": done, "lr": lr, "grad_norm": float(grad_norm)}
        if log_now:
            stats = torch.stack([loss_sum, loss_cnt, tokens, positions])
            if world > 1:  # sums over ranks: tiny all-reduces, on log steps only
                import torch.distributed as dist

                dist.all_reduce(stats)
                # DDP keeps replicas identical; max - min of a parameter checksum over ranks proves it.
                checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum()
                spread = torch.stack([checksum, -checksum])
                dist.all_reduce(spread, op=dist.ReduceOp.MAX)
                metrics["rank_param_spread"] = float(spread.sum())
            stats = stats.cpu()
            elapsed = time.perf_counter() - t_window
            metrics["tokens_per_s"] = float(stats[2].sum()) / elapsed
            for j, task in enumerate(tasks):
                if stats[1, j] > 0:
                    metrics[f"loss/{task}"] = float(stats[0, j] / stats[1, j])
                    metrics[f"nonpad/{task}"] = float(stats[2, j] / stats[3, j])
            seen = stats[1] > 0
            metrics["loss"] = float((stats[0][seen] / stats[1][seen]).mean()) if seen.any() else float("nan")
            loss_sum.zero_()
            loss_cnt.zero_()
            tokens.zero_()
            positions.zero_()
            t_window = time.perf_counter()
        if rank == 0:
            history.append(metrics)
            log.info("step %d %s", done, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))
        if ckpt_now and local:
            # Ray Train's driver mode (num_workers=0) does not persist checkpoints: write them in place.
            path = save_local_checkpoint(cfg, raw_model, optimizer, done, specs, layouts)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        elif ckpt_now and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(Path(tmp), raw_model, optimizer, done, cfg, specs, layouts)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=checkpoint_dir_name(done))
            # The controller registers a reported checkpoint asynchronously; a worker that died before
            # that would restart from the previous one (or from step 0). Wait until it is committed.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        else:
            ray.train.report(metrics)
    return history


# ---------------------------------------------------------------------------------------------
# The driver


def train(cfg: Config, plan: Plan | None = None) -> TrainResult:
    """Train on every task's store under ``<run_dir>/data/``; resumes the run if it has checkpoints.

    Needs a connected Ray (``cli.init_ray``). ``plan`` defaults to ``plan_resources(cfg,
    ray.cluster_resources())``.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    for key in ("log_every", "checkpoint_every"):
        if getattr(cfg.train, key) < 1:
            raise ValueError(f"train.{key} must be at least 1, got {getattr(cfg.train, key)}")
    plan = plan or plan_resources(cfg, ray.cluster_resources())
    log.info("resources: %s", describe(plan, len(cfg.tasks)))
    data = build_datasets(cfg, plan, world_size=max(1, plan.train_workers))
    resources = {"CPU": plan.cpus_per_worker} | ({"GPU": 1} if plan.use_gpu else {})
    crash_at = os.environ.get(CRASH_ENV)
    evaluator = None
    if cfg.train.eval_every > 0:
        from mugato_ray.train_eval import start_evaluator

        evaluator = start_evaluator(cfg, plan.eval_cpus)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "plan": plan,
            "specs": data.specs,
            "layouts": data.layouts,
            "crash_at_step": int(crash_at) if crash_at else None,
            # Resolved here: Ray Train workers do not run in the driver's directory.
            "run_dir_abs": str(Path(cfg.run_dir).resolve()),
            "local_mode": plan.train_workers == 0,
            "evaluator": evaluator,
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
        ),
        datasets=data.datasets,
    )
    try:
        result = trainer.fit()
        # Actor calls run in order: this returns once every submitted snapshot is scored.
        evaluations = ray.get(evaluator.results.remote()) if evaluator is not None else []
    except ray.train.TrainingFailedError as e:
        raise TrainingFailedError(
            f"training of run '{run_name(cfg)}' failed after train.max_failures={cfg.train.max_failures} "
            "restarts of its workers (raise it to survive more failures; a rerun resumes from the newest "
            f"verified checkpoint under {Path(storage_path(cfg)) / run_name(cfg)}). Cause: {e}"
        ) from e
    finally:
        if evaluator is not None:
            ray.kill(evaluator)
    history = list(result.return_value or [])
    metrics = dict(result.metrics or {})
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt is None:
        with contextlib.suppress(FileNotFoundError):
            ckpt = str(latest_checkpoint(cfg))
    final_step = int(metrics["step"]) if "step" in metrics else (int(read_state(Path(ckpt))["step"]) if ckpt else 0)
    return TrainResult(checkpoint_path=ckpt, final_step=final_step, metrics=metrics, history=history,
                       evaluations=evaluations, skipped_files=data.skipped_files)
