"""``train.task_moments: true``: AdamW with first and second moments kept per task.

With one AdamW over the sum of the tasks' gradients, every shared weight's step is divided by the running
size of *all* tasks' gradients on it. A task whose gradient there is small (text-arith's is about a
seventh of Pendulum's in the demo's mixture, bench/README.md "text-arith") then moves the weights it
needs at a fraction of the rate it would alone. Here each task ``k`` keeps its own moments of its own
gradient ``g_k`` (the sum of its micro-batches' gradients in the step), and the step is the sum of the
tasks' Adam directions, each weighted by its share of the step's micro-batches against an equal share::

    m_k <- b1 m_k + (1 - b1) g_k          v_k <- b2 v_k + (1 - b2) g_k^2       (each task's own count t_k)
    p   <- p (1 - lr wd) - lr * sum_k w_k * (m_k / (1 - b1^t_k)) / (sqrt(v_k / (1 - b2^t_k)) + eps)
    w_k =  s_k * r_k * T * n_k / M     (n_k of the step's M micro-batches are task k's; T tasks in the
                                        mixture at this step; s_k the task's tasks[].lr_scale, 1 by default;
                                        r_k its warmup after a late start, tasks[].start_step, else 1)

So with equally weighted tasks ``w_k = 1``: every task steps at ``lr`` in its own Adam geometry, as it
would alone, and ``lr`` keeps its meaning when tasks are added (on the weights the tasks share, the step
is the sum of their directions). One task is exactly AdamW. A task absent from a step (weighted
mixtures, ``train.grad_accum``) leaves its moments as they are. Each task's gradient is clipped to
``train.grad_clip`` on its own before it enters its moments, so one task's spike does not shrink the
others' steps. ``tasks[].lr_scale`` sets a task's own rate (``s_k lr``): a task that learns early and fast can
step smaller, so it disturbs the weights it shares with the others less. Memory: two moments per parameter
per task (a plain AdamW keeps two per parameter).

- :class:`TaskGradients` takes each micro-batch's gradient out of ``.grad`` after its backward and sums
  it into its task's buffer; under DDP the buffers are averaged over ranks once, in one all-reduce.
- :class:`TaskAdamW` is the optimizer: a ``torch.optim.Optimizer`` (its state dict is saved and restored
  with checkpoints as AdamW's is), stepped with :meth:`TaskAdamW.step_tasks`. Its param groups carry
  ``num_tasks``, so a checkpoint of the other optimizer, or of another task count, is refused by name
  (:func:`check_optimizer_state`) instead of failing inside a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

KEY = "train.task_moments"


def take_grads(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The parameters' gradients (zeros where a parameter has none), taken out of ``.grad``."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over the ranks in place, in one all-reduce of their concatenation."""
    import torch.distributed as dist  # lazy: only DDP runs reach here

    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, f in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


class TaskGradients:
    """Per-task gradient sums of one optimizer step, taken out of ``.grad`` after each backward."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.sums: dict[int, list[torch.Tensor]] = {}
        self.counts: dict[int, int] = {}

    def take(self, task: int) -> None:
        """Move the last backward's gradient into ``task``'s sum."""
        grads = take_grads(self.params)
        if task in self.sums:
            torch._foreach_add_(self.sums[task], grads)
        else:
            self.sums[task] = grads
        self.counts[task] = self.counts.get(task, 0) + 1

    def shares(self) -> dict[int, float]:
        """Each task's share of the step's micro-batches (they sum to 1)."""
        total = sum(self.counts.values())
        return {k: c / total for k, c in self.counts.items()}

    def all_reduce(self) -> None:
        """Average every task's sum over the ranks (every rank ran the same tasks: ``data.step_tasks``)."""
        all_reduce_mean([g for k in sorted(self.sums) for g in self.sums[k]])

    def total_norm(self) -> torch.Tensor:
        """The L2 norm of the tasks' summed gradient (what a plain step would clip), for the logs."""
        tasks = sorted(self.sums)
        total = [g.clone() for g in self.sums[tasks[0]]]
        for k in tasks[1:]:
            torch._foreach_add_(total, self.sums[k])
        return torch.nn.utils.get_total_norm(total)

    def clip(self, max_norm: float) -> None:
        """Clip each task's gradient to ``max_norm`` on its own."""
        for grads in self.sums.values():
            # clip_grad_norm_'s coefficient, applied to these tensors (torch's helper clips parameters' .grad).
            coef = (max_norm / (torch.nn.utils.get_total_norm(grads) + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)


class TaskAdamW(torch.optim.Optimizer):
    """AdamW with per-task moments (module docstring); step it with :meth:`step_tasks`."""

    def __init__(self, params: Iterable[Any], num_tasks: int, lr: float, betas: tuple[float, float],
                 weight_decay: float, eps: float = 1e-8, lr_scales: Sequence[float] | None = None):
        if num_tasks < 1:
            raise ValueError(f"{KEY}: needs at least one task, got {num_tasks}")
        scales = [1.0] * num_tasks if lr_scales is None else [float(s) for s in lr_scales]
        if len(scales) != num_tasks or not all(s > 0 for s in scales):
            raise ValueError(f"{KEY}: lr_scales must be {num_tasks} positive numbers, got {scales}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "num_tasks": num_tasks})
        self.num_tasks = num_tasks
        # Not in the param groups: a resumed run takes its rates from its config, not from the checkpoint.
        self.lr_scales = scales

    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - torch's signature
        raise RuntimeError(f"{KEY}: TaskAdamW steps with step_tasks(gradients), which carries each task's gradient")

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(self.num_tasks, dtype=torch.float64)
            state["exp_avg"] = torch.zeros((self.num_tasks, *p.shape), dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros((self.num_tasks, *p.shape), dtype=p.dtype, device=p.device)
        return state

    @torch.no_grad()
    def step_tasks(self, gradients: TaskGradients, active: int | None = None,
                   ramps: Mapping[int, float] | None = None) -> None:
        """One step from each present task's summed gradient, weighted ``s_k * r_k * T * n_k / M`` (module
        docstring). ``active``: T, the tasks in the mixture at this step (None: all the optimizer's tasks);
        ``ramps``: r_k of the tasks warming up after a late start (absent: 1).

        Vectorized over each group's parameters (``torch._foreach_*``, as AdamW's foreach path), one pass
        per present task."""
        index = {id(p): i for i, p in enumerate(gradients.params)}
        shares = gradients.shares()
        if bad := [k for k in shares if not 0 <= k < self.num_tasks]:
            raise ValueError(f"{KEY}: task index {bad[0]} outside the optimizer's {self.num_tasks} tasks")
        tasks = self.num_tasks if active is None else active
        if not 1 <= tasks <= self.num_tasks:
            raise ValueError(f"{KEY}: {tasks} active tasks, outside 1..{self.num_tasks}")
        ramps = ramps or {}
        weights = {k: self.lr_scales[k] * ramps.get(k, 1.0) * share * tasks for k, share in shares.items()}
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in index]
            if not params:
                continue
            b1, b2 = group["betas"]
            states = [self._state(p) for p in params]
            directions = [torch.zeros_like(p) for p in params]
            for k, weight in weights.items():
                grads = [gradients.sums[k][index[id(p)]] for p in params]
                for state in states:
                    state["step"][k] += 1
                counts = [float(state["step"][k]) for state in states]
                m = [state["exp_avg"][k] for state in states]
                v = [state["exp_avg_sq"][k] for state in states]
                torch._foreach_lerp_(m, grads, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
                denom = torch._foreach_div(v, [1 - b2**t for t in counts])
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, group["eps"])
                torch._foreach_addcdiv_(directions, m, denom, [weight / (1 - b1**t) for t in counts])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, directions, alpha=-group["lr"])


def check_optimizer_state(state: Mapping[str, Any], num_tasks: int | None, where: str) -> None:
    """Refuse an optimizer state dict made with the other ``train.task_moments`` (or another task count).

    ``num_tasks``: the task count when the run uses per-task moments, None for a plain AdamW.
    """
    groups = state.get("param_groups") or [{}]
    saved = groups[0].get("num_tasks")
    if saved == num_tasks:
        return
    def said(n: int | None) -> str:
        return f"per-task moments for {n} tasks ({KEY}: true)" if n is not None else f"one AdamW ({KEY}: false)"
    raise ValueError(f"{where}: the checkpoint's optimizer state holds {said(saved)}, but this run uses "
                     f"{said(num_tasks)}; resume with the same {KEY} and tasks, or start a new run_dir")
