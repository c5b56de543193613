"""The learning step, apart from Ray: batches in, statistics out.

- :class:`Learner` runs one optimizer step: it sets the step's learning rate, accumulates gradients over
  ``M`` micro-batches whose tasks come from the weighted mixture (``data.step_tasks``: the same tasks in
  the same order on every rank), each micro-batch's loss being its task's mean over loss tokens weighted
  ``1/M``; under DDP only the last micro-batch's backward synchronizes (``no_sync`` on the others); then
  global gradient-norm clipping and the optimizer step, under ``train.precision``'s autocast
  (:func:`training_autocast`). With
  ``train.grad_balance: norm``, :class:`GradBalance` gives every micro-batch's gradient the same norm;
  with ``train.task_moments``, each task's gradient is kept apart, clipped on its own and stepped with its
  own AdamW moments (:mod:`mugato_ray.task_moments`). A task with ``tasks[].start_step`` joins the
  mixture at that step (``M`` counts the tasks already in); with per-task moments its rate then warms up
  (:func:`join_ramps`).
- AdamW (weight decay on matrices and embeddings, i.e. tensors with >= 2 dims; none on norms and
  biases), linear warmup then cosine decay to ``lr * min_lr_ratio`` (:func:`lr_at`, a pure function of
  the step, so a resumed run needs no scheduler state).
- With ``train.ema_decay``, the learner keeps a moving average of the weights after every step
  (:mod:`mugato_ray.weight_average`); :attr:`Learner.acting_model` is what snapshots and checkpoints save.
- :class:`MetricWindow` sums each task's loss, real tokens and computed positions on the device between
  log steps and turns them into the logged metrics (``loss``, ``loss/<task>``, ``nonpad/<task>``,
  ``tokens_per_s``, and ``rank_param_spread`` over several ranks).
- :func:`restore` builds the model and optimizer, from a checkpoint directory or from scratch, and seeds
  torch from ``(train.seed, rank, start step)``: every (re)start is reproducible.
- :class:`FaultHook`: the one fault-injection hook, ``MUGATO_TEST_CRASH_AT_STEP=<n>`` (tests only).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mugato_ray.checkpoints import MODEL_FILE, STATE_FILE, TRAIN_MODEL_KEY, read_state
from mugato_ray.config import Config, TrainConfig
from mugato_ray.data import active_tasks, micro_batches_per_step, step_tasks
from mugato_ray.model import GatoModel, load_model
from mugato_ray.sequence import SequenceLayout
from mugato_ray.task_moments import TaskAdamW, TaskGradients, all_reduce_mean, check_optimizer_state, take_grads
from mugato_ray.tokenizer import VocabLayout
from mugato_ray.weight_average import WeightAverage

log = logging.getLogger(__name__)

CRASH_ENV = "MUGATO_TEST_CRASH_AT_STEP"

Batch = Mapping[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Optimization


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    progress = min(1.0, (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps))
    return tcfg.lr * (tcfg.min_lr_ratio + (1.0 - tcfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def join_ramps(cfg: Config, step: int) -> dict[int, float]:
    """Rate multipliers at optimizer step ``step`` of the tasks still warming up after a late start: a task
    with ``tasks[k].start_step`` s > 0 steps at ``(step - s + 1) / train.warmup_steps`` of its rate until
    ``train.warmup_steps`` steps after s, as the run's rate warms up from step 0 (:func:`lr_at`)."""
    warmup = cfg.train.warmup_steps
    return {k: (step - t.start_step + 1) / warmup for k, t in enumerate(cfg.tasks)
            if 0 < t.start_step <= step < t.start_step + warmup}


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig, num_tasks: int = 1,
                   lr_scales: Sequence[float] | None = None) -> torch.optim.Optimizer:
    """AdamW; weight decay on tensors with >= 2 dims (matmul weights, conv kernels, embedding tables, as
    nanoGPT and GATO's "matrices"), none on norms and biases. With ``train.task_moments``, the same groups
    in a :class:`~mugato_ray.task_moments.TaskAdamW` with moments for ``num_tasks`` tasks, each stepping at
    its ``lr_scales`` multiple of the rate (``tasks[].lr_scale``; None: all 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if tcfg.task_moments:
        return TaskAdamW(groups, num_tasks, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), weight_decay=tcfg.weight_decay,
                         lr_scales=lr_scales)
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, out of its DDP wrapper if it has one."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# Restore


@dataclass
class LoopState:
    """What a training attempt starts from: restored from a checkpoint, or fresh at step 0."""

    step: int
    """The first optimizer step to run (the checkpoint's step, or 0)."""
    model: torch.nn.Module
    """The model as prepared for training (a DDP wrapper when training runs on several ranks)."""
    optimizer: torch.optim.Optimizer
    """:func:`make_optimizer` over the unwrapped model, with the checkpoint's state loaded."""
    checkpoint: Path | None = None
    """The checkpoint directory it was restored from (None: a fresh start)."""
    average: dict[str, torch.Tensor] | None = None
    """The checkpoint's averaged weights (``train.ema_decay``; its model.pt), when it kept the training
    weights apart (state.pt's ``train_model``); None otherwise."""


def build_model(cfg: Config, vocab: VocabLayout) -> GatoModel:
    """A new model of ``cfg.model`` for ``vocab``, with the tokenizer's patch size and mu-law parameters."""
    return GatoModel(cfg.model, vocab, patch_size=cfg.tokenizer.patch_size, mu=cfg.tokenizer.mu, M=cfg.tokenizer.M)


def attempt_seed(seed: int, rank: int, start: int) -> int:
    """torch's seed for an attempt of ``rank`` that starts at step ``start``."""
    return int(np.random.SeedSequence([seed, rank, start]).generate_state(1)[0])


def restore(cfg: Config, vocab: VocabLayout, directory: Path | None, rank: int = 0,
            prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> LoopState:
    """Build the model and its optimizer, from the checkpoint in ``directory`` or (None) from scratch.

    Torch is seeded from ``(train.seed, rank, start step)``; on rank 0 a checkpoint's torch RNG state then
    replaces that seed. ``prepare`` (e.g. ``ray.train.torch.prepare_model``: to the device, DDP) runs on
    the model before the optimizer is made, so that the optimizer's state lands on the model's device.
    """
    state = read_state(Path(directory)) if directory is not None else None
    start = int(state["step"]) if state is not None else 0
    # Seeds depend on the rank and the step the attempt starts at: every (re)start is reproducible. Seeded
    # before the model is built, so that a fresh model's weights are the seed's too.
    torch.manual_seed(attempt_seed(cfg.train.seed, rank, start))
    model: torch.nn.Module = build_model(cfg, vocab)
    average = None
    if directory is not None:
        saved = load_model(Path(directory) / MODEL_FILE).state_dict()
        if state.get(TRAIN_MODEL_KEY) is not None:  # model.pt holds the average; training goes on from these
            average, saved = saved, state[TRAIN_MODEL_KEY]
        try:
            model.load_state_dict(saved)
        except (RuntimeError, TypeError) as e:  # only state.pt's training weights can get here unchecked
            raise ValueError(f"training state {Path(directory) / STATE_FILE}: its {TRAIN_MODEL_KEY!r} does not "
                             f"fit the model of {Path(directory) / MODEL_FILE}: {e}") from e
    if state is not None and rank == 0:
        torch.set_rng_state(state["torch_rng"])
    if prepare is not None:
        model = prepare(model)
    optimizer = make_optimizer(unwrap(model), cfg.train, len(cfg.tasks), [t.lr_scale for t in cfg.tasks])
    if state is not None:
        check_optimizer_state(state["optimizer"], len(cfg.tasks) if cfg.train.task_moments else None,
                              f"checkpoint {directory}")
        optimizer.load_state_dict(state["optimizer"])
    return LoopState(step=start, model=model, optimizer=optimizer,
                     checkpoint=Path(directory) if directory is not None else None, average=average)


# ---------------------------------------------------------------------------------------------
# The step


@dataclass
class MicroStats:
    """One micro-batch of a step: its task (an index into the configured tasks) and its counts."""

    task: int
    loss: torch.Tensor
    """Scalar, detached: the task's mean loss over the micro-batch's loss tokens."""
    num_tokens: torch.Tensor | int
    """Real (non-pad) tokens of the micro-batch."""
    num_positions: int
    """Positions the blocks computed (after packing)."""


@dataclass
class StepStats:
    """What one optimizer step reports; tensors stay on the device (reading them synchronizes a GPU)."""

    step: int
    lr: float
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    micro: list[MicroStats] = field(default_factory=list)

    def mean_loss(self) -> float:
        """Mean of the micro-batches' losses (reads them back from the device)."""
        return float(torch.stack([m.loss.double() for m in self.micro]).mean())


CPU_BF16_MIN_SPEEDUP = 1.3
"""``train.precision: bf16`` on a CPU trains in bf16 only where a bf16 matrix product measures at least this
many times faster than an fp32 one: CPUs with native bf16 instructions (AVX512-BF16, AMX) run it 2-3x
faster, while others emulate it and run it slower than fp32."""


@functools.cache
def cpu_bf16_speedup(n: int = 512, repeats: int = 5) -> float:
    """How many times faster this CPU multiplies two n x n bf16 matrices than fp32 ones (best of
    ``repeats`` each, interleaved; about 0.1 s, measured once per process)."""
    times: dict[torch.dtype, float] = {}
    mats = {dt: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in (torch.float32, torch.bfloat16)}
    for a, b in mats.values():
        a @ b  # warm-up: oneDNN builds its kernel on the first call
    for _ in range(repeats):
        for dt, (a, b) in mats.items():
            t = time.perf_counter()
            a @ b
            times[dt] = min(times.get(dt, math.inf), time.perf_counter() - t)
    return times[torch.float32] / times[torch.bfloat16]


def training_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast the training step runs under for ``train.precision`` on ``device``.

    Only the matrix products (and what autocast casts with them) run in bf16: weights, gradients, optimizer
    moments and the loss (the model's logits are cast to fp32 before it) stay fp32, and on a CPU so does the
    attention product (``model.Attention``: in bf16 it cost the demo's text-arith its exact answers).
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if device.type == "cpu":
        speedup = cpu_bf16_speedup()
        if speedup < CPU_BF16_MIN_SPEEDUP:
            log.warning("train.precision=bf16: this CPU multiplies bf16 matrices at %.2fx its fp32 rate "
                        "(under %.1fx); training in fp32", speedup, CPU_BF16_MIN_SPEEDUP)
            return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Learner:
    """One optimizer step of a (possibly DDP-wrapped) model on micro-batches of the task mixture."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                 layouts: Mapping[str, SequenceLayout], device: torch.device | str = "cpu",
                 average: Mapping[str, torch.Tensor] | None = None):
        self.model, self.optimizer, self.cfg, self.layouts = model, optimizer, cfg, layouts
        self.device = torch.device(device)
        self.raw_model = unwrap(model)
        self.average = (WeightAverage(self.raw_model, cfg.train.ema_decay, average) if cfg.train.ema_decay > 0
                        else None)
        """``train.ema_decay``: the moving average of the weights (mugato_ray.weight_average); None when off."""
        self.ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.amp = training_autocast(cfg.train.precision, self.device)
        self.tasks = [t.name for t in cfg.tasks]
        self.model.train()

    @property
    def acting_model(self) -> torch.nn.Module:
        """The weights the run acts with: the moving average with ``train.ema_decay``, else the model's own."""
        return self.average.model if self.average is not None else self.raw_model

    def step(self, step_index: int, next_batch: Callable[[str], Batch]) -> StepStats:
        """Optimizer step ``step_index``, then the weight average's update (``train.ema_decay``)."""
        stats = self._step(step_index, next_batch)
        if self.average is not None:
            self.average.update(self.raw_model, step_index)
        return stats

    def _step(self, step_index: int, next_batch: Callable[[str], Batch]) -> StepStats:
        """Optimizer step ``step_index``: ``next_batch(task)`` gives each micro-batch of the step's tasks."""
        tcfg, m = self.cfg.train, micro_batches_per_step(self.cfg, step_index)
        lr = lr_at(step_index, tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        balance = GradBalance(self.raw_model) if tcfg.grad_balance == "norm" else None
        per_task = TaskGradients([p for p in self.raw_model.parameters() if p.requires_grad]) \
            if isinstance(self.optimizer, TaskAdamW) else None
        micro = []
        for i, k in enumerate(step_tasks(self.cfg, step_index)):
            task = self.tasks[k]
            batch = next_batch(task)
            # Balanced or per-task gradients are all-reduced once, after the last micro-batch.
            sync = not self.ddp or (i == m - 1 and balance is None and per_task is None)
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.amp:
                out = self.model(batch, self.layouts[task])
                (out.loss / m + touch_all(self.raw_model)).backward()
            if balance is not None:
                balance.take()
            if per_task is not None:
                per_task.take(int(k))
            micro.append(MicroStats(int(k), out.loss.detach(), out.num_tokens, out.num_positions))
        if per_task is not None:
            return StepStats(step_index, lr, self._step_per_task(per_task, step_index), micro)
        if balance is not None:
            balance.finish(all_reduce=self.ddp)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tcfg.grad_clip)
        self.optimizer.step()
        return StepStats(step_index, lr, grad_norm, micro)

    def _step_per_task(self, gradients: TaskGradients, step_index: int) -> torch.Tensor:
        """``train.task_moments``: average over ranks, clip each task's gradient, step each task's moments
        (the tasks that joined late at their warming-up rate, :func:`join_ramps`); returns the norm of the
        tasks' summed gradient before clipping (the logged ``grad_norm``)."""
        if self.ddp:
            gradients.all_reduce()
        grad_norm = gradients.total_norm()
        gradients.clip(self.cfg.train.grad_clip)
        assert isinstance(self.optimizer, TaskAdamW)
        self.optimizer.step_tasks(gradients, active_tasks(self.cfg, step_index), join_ramps(self.cfg, step_index))
        return grad_norm


class GradBalance:
    """``train.grad_balance: norm``: each micro-batch's gradient counts by its direction, not its size.

    With a plain sum, the task whose loss has the largest gradient sets the direction of the shared
    weights' update, and through AdamW's second moments the size of every task's steps on them. Here each
    micro-batch's gradient ``g_i`` is taken out of ``.grad`` after its backward and the step's gradient is
    ``mean_i(|g_i|) * sum_i g_i / |g_i|``: the same overall scale as the sum of equal-norm gradients, with
    every micro-batch contributing equally (a task's share is then its share of micro-batches, i.e. its
    weight). Costs one extra copy of the gradients. Under DDP the micro-batches run without
    synchronization and the combined gradient is averaged over ranks once (:meth:`finish`).
    """

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sum: list[torch.Tensor] | None = None
        self.norms: list[torch.Tensor] = []

    def take(self) -> None:
        """Move the last backward's gradient, normalized, into the running sum."""
        grads = take_grads(self.params)
        norm = torch.nn.utils.get_total_norm(grads)  # the global L2 norm, as clip_grad_norm_ computes it
        self.norms.append(norm)
        scaled = list(torch._foreach_div(grads, norm.clamp_min(1e-12)))
        if self.sum is None:
            self.sum = scaled
        else:
            torch._foreach_add_(self.sum, scaled)

    def finish(self, all_reduce: bool = False) -> None:
        """Put ``mean norm * sum of unit gradients`` into ``.grad`` (averaged over ranks if ``all_reduce``)."""
        assert self.sum is not None, "GradBalance.finish before any take()"  # a step has M >= 1 micro-batches
        torch._foreach_mul_(self.sum, torch.stack(self.norms).mean())
        if all_reduce:
            all_reduce_mean(self.sum)
        for p, g in zip(self.params, self.sum):
            p.grad = g


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricWindow:
    """Per-task sums between two log steps, kept on the device: reading a loss back (``.item()``) would
    synchronize a GPU every micro-batch."""

    def __init__(self, num_tasks: int, device: torch.device | str = "cpu"):
        def zeros() -> torch.Tensor:
            return torch.zeros(num_tasks, dtype=torch.float64, device=device)

        self.loss_sum, self.loss_cnt = zeros(), zeros()
        self.tokens = zeros()  # real (non-pad) tokens
        self.positions = zeros()  # positions the blocks computed
        self.started = time.perf_counter()

    def add(self, task: int, loss: torch.Tensor, num_tokens: torch.Tensor | int, num_positions: int) -> None:
        """One micro-batch of task index ``task``."""
        self.loss_sum[task] += loss.detach().double()
        self.loss_cnt[task] += 1
        self.tokens[task] += num_tokens
        self.positions[task] += num_positions

    def add_step(self, stats: StepStats) -> None:
        for m in stats.micro:
            self.add(m.task, m.loss, m.num_tokens, m.num_positions)

    def reset(self) -> None:
        for t in (self.loss_sum, self.loss_cnt, self.tokens, self.positions):
            t.zero_()
        self.started = time.perf_counter()

    def summary(self, tasks: Sequence[str], elapsed: float | None = None, world: int = 1,
                params: Iterable[torch.Tensor] = ()) -> dict[str, float]:
        """The window's metrics, then a new window. Over ``world`` > 1 ranks the sums are all-reduced and
        ``rank_param_spread`` is max - min over ranks of a checksum of ``params`` (DDP keeps it 0).
        ``elapsed``: the window's seconds (None: measured now, after the sums are read back)."""
        metrics: dict[str, float] = {}
        stats = torch.stack([self.loss_sum, self.loss_cnt, self.tokens, self.positions])
        if world > 1:  # sums over ranks: tiny all-reduces, on log steps only
            import torch.distributed as dist

            dist.all_reduce(stats)
            # DDP keeps replicas identical; max - min of a parameter checksum over ranks proves it.
            checksum = torch.stack([p.detach().double().sum() for p in params]).sum()
            spread = torch.stack([checksum, -checksum])
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            metrics["rank_param_spread"] = float(spread.sum())
        stats = stats.cpu()
        if elapsed is None:
            elapsed = time.perf_counter() - self.started
        metrics["tokens_per_s"] = float(stats[2].sum()) / elapsed
        for j, task in enumerate(tasks):
            if stats[1, j] > 0:
                metrics[f"loss/{task}"] = float(stats[0, j] / stats[1, j])
                metrics[f"nonpad/{task}"] = float(stats[2, j] / stats[3, j])
        seen = stats[1] > 0
        metrics["loss"] = float((stats[0][seen] / stats[1][seen]).mean()) if seen.any() else float("nan")
        self.reset()
        return metrics


# ---------------------------------------------------------------------------------------------
# Fault injection (tests only)


class FaultHook:
    """``MUGATO_TEST_CRASH_AT_STEP=<n>``: rank 0 exits hard (``os._exit(1)``) once, when it reaches step
    ``n``; a marker file ``<run_dir>/.crashed_at_step_<n>`` makes the restarted attempt go on."""

    def __init__(self, crash_at: int | None, run_dir: str | Path, rank: int):
        self.crash_at, self.rank = crash_at, rank
        self.marker = Path(run_dir) / f".crashed_at_step_{crash_at}"

    @staticmethod
    def from_env() -> int | None:
        """The step set in the environment (read by the driver: workers may not share its environment)."""
        value = os.environ.get(CRASH_ENV)
        return int(value) if value else None

    def before_step(self, step: int) -> None:
        if self.crash_at is not None and step == self.crash_at and self.rank == 0 and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
            os._exit(1)
