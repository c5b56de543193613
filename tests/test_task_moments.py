"""``train.task_moments``: AdamW with per-task moments (mugato_ray.task_moments), alone and in the Learner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mugato_ray.checkpoints import write_checkpoint
from mugato_ray.config import ConfigError, load_config
from mugato_ray.data import step_tasks, task_layouts
from mugato_ray.learner import Learner, join_ramps, restore
from mugato_ray.task_moments import TaskAdamW, TaskGradients
from tests.test_learner import spawn_ranks, with_seed
from tests.test_model import VOCAB, make_batch, text_layout

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("text-arith", "text-files")
LAYOUT = text_layout(16)
LAYOUTS = dict.fromkeys(TASKS, LAYOUT)


def make_cfg(run_dir, *overrides, tasks=TASKS):
    names = ", ".join(f"{{name: {t}}}" for t in tasks)
    return load_config(ROOT / "configs/smoke.yaml", [f"run_dir={run_dir}", f"tasks=[{names}]", "train.steps=20",
                                                     "train.warmup_steps=2", "train.lr=3e-3", *overrides])


def fresh_learner(cfg, seed: int = 0) -> Learner:
    state = restore(with_seed(cfg, seed), VOCAB, None, rank=0)  # restore seeds the weights from train.seed
    return Learner(state.model, state.optimizer, cfg, {t.name: LAYOUT for t in cfg.tasks})


def params(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.raw_model.named_parameters()}


def test_with_one_task_it_is_adamw():
    """One task's moments are AdamW's moments: five steps of both on the same gradients (float64, weight
    decay on one group, a task absent from no step) end at the same parameters."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    b = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    b.load_state_dict(a.state_dict())

    def groups(model):
        ps = list(model.parameters())
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]

    plain = torch.optim.AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95))
    per_task = TaskAdamW(groups(b), 1, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(7, 5, dtype=torch.float64)
        a(x).pow(2).sum().backward()
        plain.step()
        plain.zero_grad()
        b(x).pow(2).sum().backward()
        grads = TaskGradients(list(b.parameters()))
        grads.take(0)
        per_task.step_tasks(grads)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)


def test_in_the_learner_one_task_steps_as_adamw_with_the_same_clip(tmp_path):
    """The Learner with one task and ``train.task_moments``: the first step (clipped: its norm is above 1)
    lands where AdamW's does. (Only one step: AdamW's steps are ~lr * sign(grad) on gradients that are ~0,
    such as the key biases', so rounding differences grow over later steps.)"""
    batch = make_batch(LAYOUT, [1, 1, 1], seed=0)
    runs = []
    for moments in ("false", "true"):
        learner = fresh_learner(make_cfg(tmp_path, f"train.task_moments={moments}", tasks=TASKS[:1]), seed=3)
        assert isinstance(learner.optimizer, TaskAdamW) == (moments == "true")
        runs.append((float(learner.step(0, lambda task: batch).grad_norm), params(learner)))
    (norm_a, pa), (norm_b, pb) = runs
    assert norm_b == pytest.approx(norm_a, rel=1e-6) and norm_a > 1.0  # the clip was active
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-5, atol=1e-6, msg=name)


def test_each_task_is_scaled_by_its_own_moments(tmp_path):
    """Two tasks with gradients of different sizes: AdamW's first step is ~lr * g / |g| per element, so with
    per-task moments the step is lr * (sign(g_a) + sign(g_b)), each task stepping as it would alone, whatever
    the sizes; with shared moments it is lr * sign(g_a + g_b), which the larger gradient decides."""
    a, b = make_batch(LAYOUT, [1, 1, 1], seed=3), make_batch(LAYOUT, [1], seed=4)
    lr = 3e-3 / 2  # lr_at(0) with warmup 2

    def step(*overrides):
        cfg = make_cfg(tmp_path, "train.grad_clip=1.0e9", "train.weight_decay=0.0", *overrides)
        learner = fresh_learner(cfg, seed=5)
        before = params(learner)
        by_task = dict(zip(TASKS, (a, b)))
        grads = {}
        for task in TASKS:  # each task's own gradient, as the step will see it (loss weighted 1/M)
            learner.raw_model.zero_grad()
            out = learner.model(by_task[task], LAYOUT)
            (out.loss / 2).backward()
            grads[task] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for n, p in learner.raw_model.named_parameters()}
        learner.raw_model.zero_grad()
        assert sorted(step_tasks(cfg, 0)) == [0, 1]
        learner.step(0, lambda task: by_task[task])
        after = params(learner)
        return {n: (after[n] - before[n]) / -lr for n in before}, grads

    moved, g = step("train.task_moments=true")
    eps = 1e-8
    for name, d in moved.items():
        ga, gb = g[TASKS[0]][name], g[TASKS[1]][name]
        want = ga / (ga.abs() + eps) + gb / (gb.abs() + eps)
        torch.testing.assert_close(d, want, rtol=1e-3, atol=1e-3, msg=name)
    shared, _ = step("train.task_moments=false")
    # Where the two gradients disagree in sign, the shared step follows the larger; per-task moments cancel.
    name = "blocks.0.attn.qkv.weight"
    ga, gb = g[TASKS[0]][name], g[TASKS[1]][name]
    disagree = (ga.sign() != gb.sign()) & (ga.abs() > 1e-5) & (gb.abs() > 1e-5)
    assert disagree.sum() > 10
    assert moved[name][disagree].abs().max() < 0.02
    # The shared step is (g_a + g_b) / (|g_a + g_b| + eps): a full step where the sum is not itself ~eps.
    decided = disagree & ((ga + gb).abs() > 100 * eps)
    assert decided.sum() > 0.9 * disagree.sum()
    assert shared[name][decided].abs().min() > 0.5
    agree = (ga.sign() == gb.sign()) & (ga.abs() > 1e-5) & (gb.abs() > 1e-5)
    assert moved[name][agree].abs().min() > 1.9  # two tasks' full steps add up
    assert shared[name][agree].abs().max() < 1.01


def test_an_absent_task_keeps_its_moments_and_a_task_index_outside_is_refused():
    p = torch.nn.Parameter(torch.ones(3))
    opt = TaskAdamW([p], 3, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    grads = TaskGradients([p])
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    grads.take(1)
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    grads.take(1)  # a task's micro-batches add up
    assert p.grad is None and grads.shares() == {1: 1.0}
    opt.step_tasks(grads)
    state = opt.state[p]
    assert state["step"].tolist() == [0.0, 1.0, 0.0]
    assert not state["exp_avg"][0].any() and not state["exp_avg"][2].any()
    torch.testing.assert_close(state["exp_avg"][1], 0.1 * torch.tensor([2.0, -1.0, 1.5]))
    # Its share is 1 of 1 micro-batches, so its weight is 3 (tasks) * 1: three times AdamW's first step.
    torch.testing.assert_close(p.detach(), torch.tensor([0.7, 1.3, 0.7]), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="step_tasks"):
        opt.step()
    bad = TaskGradients([p])
    p.grad = torch.ones(3)
    bad.take(3)
    with pytest.raises(ValueError, match="task index 3"):
        opt.step_tasks(bad)


def test_a_tasks_lr_scale_is_its_own_rate():
    """AdamW's first step is lr * g / |g| per element; with scales (1, 0.25) the two tasks' steps are
    lr * sign(g_a) and lr * 0.25 * sign(g_b), so where they agree 1.25 lr, where they disagree 0.75 lr."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = TaskAdamW([p], 2, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, lr_scales=[1.0, 0.25])
    grads = TaskGradients([p])
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    grads.take(0)
    p.grad = torch.tensor([3.0, 4.0, -0.1])
    grads.take(1)
    opt.step_tasks(grads)
    torch.testing.assert_close(p.detach(), -0.1 * torch.tensor([1.25, -0.75, 0.75]), rtol=0, atol=1e-6)
    for bad in ([1.0], [1.0, 0.0]):
        with pytest.raises(ValueError, match="lr_scales must be 2 positive numbers"):
            TaskAdamW([p], 2, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, lr_scales=bad)


def test_the_config_sets_each_tasks_rate_and_a_resumed_run_takes_its_own(tmp_path):
    scaled = "tasks=[{name: text-arith}, {name: text-files, lr_scale: 0.25}]"
    cfg = make_cfg(tmp_path, "train.task_moments=true", scaled)
    learner = fresh_learner(cfg)
    assert learner.optimizer.lr_scales == [1.0, 0.25]
    specs, _ = task_layouts(cfg)
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, learner.raw_model, learner.optimizer, 1, cfg, specs, LAYOUTS)
    resumed = restore(make_cfg(tmp_path, "train.task_moments=true"), VOCAB, ckpt)
    assert resumed.optimizer.lr_scales == [1.0, 1.0]  # the run's config, not the checkpoint's
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.lr_scale.*train.task_moments"):
        make_cfg(tmp_path, scaled)
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.lr_scale' must be positive"):
        make_cfg(tmp_path, "train.task_moments=true", "tasks=[{name: text-arith, lr_scale: 0}]")


def test_the_tasks_in_the_mixture_and_a_joining_tasks_ramp_set_the_weights():
    """With 3 tasks configured and only task 0 in the mixture (``active=1``), its first step is lr * g / |g|,
    as alone (not 3x: T counts the tasks in the mixture); a ramp of 0.25 (a task warming up after its
    start_step) scales it to a quarter."""
    def first_step(**kwargs):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = TaskAdamW([p], 3, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
        grads = TaskGradients([p])
        p.grad = torch.tensor([1.0, -2.0, 0.5])
        grads.take(0)
        opt.step_tasks(grads, **kwargs)
        return p.detach()

    sign = torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(first_step(), -0.3 * sign, rtol=0, atol=1e-6)  # every task in: w = T * 1
    torch.testing.assert_close(first_step(active=1), -0.1 * sign, rtol=0, atol=1e-6)
    torch.testing.assert_close(first_step(active=1, ramps={0: 0.25}), -0.025 * sign, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="4 active tasks"):
        first_step(active=4)


def test_a_late_task_is_left_out_of_the_step_then_warms_up(tmp_path):
    """``tasks[1].start_step: 5``: the Learner's step 0 draws only task 0 and lands exactly where a run of
    task 0 alone does (M and T count the tasks in the mixture); from step 5 it draws both, task 1's rate
    ramping over ``train.warmup_steps`` (4 here)."""
    batch = make_batch(LAYOUT, [1, 1, 1], seed=0)
    late = make_cfg(tmp_path, "train.task_moments=true", "train.warmup_steps=4",
                    "tasks=[{name: text-arith}, {name: text-files, start_step: 5}]")
    alone = make_cfg(tmp_path, "train.task_moments=true", "train.warmup_steps=4", tasks=TASKS[:1])

    def step(cfg, index):
        learner, drawn = fresh_learner(cfg, seed=3), []
        learner.step(index, lambda task: drawn.append(task) or batch)
        return params(learner), sorted(drawn)

    (with_late, drawn), (by_itself, _) = step(late, 0), step(alone, 0)
    assert drawn == ["text-arith"]
    for name in with_late:
        torch.testing.assert_close(with_late[name], by_itself[name], rtol=0, atol=0, msg=name)
    assert step(late, 5)[1] == ["text-arith", "text-files"]
    assert [join_ramps(late, s) for s in (4, 5, 6, 8, 9)] == [{}, {1: 0.25}, {1: 0.5}, {1: 1.0}, {}]
    for bad, match in ((-1, "must be non-negative"), (20, "is 20, but the run has train.steps=20")):
        with pytest.raises(ConfigError, match=r"tasks\[1\]\.start_step' " + match):
            make_cfg(tmp_path, f"tasks=[{{name: text-arith}}, {{name: text-files, start_step: {bad}}}]")
    with pytest.raises(ConfigError, match="no task with a positive weight has start_step 0"):
        make_cfg(tmp_path, "tasks=[{name: text-arith, start_step: 2}, {name: text-files, weight: 0}]")


def test_each_task_is_clipped_on_its_own():
    p = torch.nn.Parameter(torch.zeros(2))
    grads = TaskGradients([p])
    p.grad = torch.tensor([30.0, 40.0])  # norm 50
    grads.take(0)
    p.grad = torch.tensor([0.3, 0.4])  # norm 0.5
    grads.take(1)
    assert float(grads.total_norm()) == pytest.approx(50.5)
    grads.clip(1.0)
    torch.testing.assert_close(grads.sums[0][0], torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
    torch.testing.assert_close(grads.sums[1][0], torch.tensor([0.3, 0.4]))
    assert grads.shares() == {0: 0.5, 1: 0.5}


def test_a_checkpoint_resumes_its_moments_and_the_other_optimizer_is_refused_by_name(tmp_path):
    cfg = make_cfg(tmp_path, "train.task_moments=true")
    specs, _ = task_layouts(cfg)
    batches = {t: make_batch(LAYOUT, [1, 1], seed=i) for i, t in enumerate(TASKS)}
    learner = fresh_learner(cfg)
    for step in range(3):
        learner.step(step, batches.__getitem__)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint(ckpt, learner.raw_model, learner.optimizer, 3, cfg, specs, LAYOUTS)
    state = restore(cfg, VOCAB, ckpt)
    assert isinstance(state.optimizer, TaskAdamW)
    assert state.optimizer.state_dict()["param_groups"] == learner.optimizer.state_dict()["param_groups"]
    resumed = Learner(state.model, state.optimizer, cfg, LAYOUTS)
    learner.step(3, batches.__getitem__)
    resumed.step(3, batches.__getitem__)
    for (name, p), q in zip(learner.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), name

    with pytest.raises(ValueError, match=r"train.task_moments.*one AdamW"):
        restore(make_cfg(tmp_path, "train.task_moments=false"), VOCAB, ckpt)
    with pytest.raises(ValueError, match="for 3 tasks"):
        restore(make_cfg(tmp_path, "train.task_moments=true", tasks=(*TASKS, "CartPole-v1")), VOCAB, ckpt)


def test_a_plain_checkpoint_is_refused_by_a_per_task_run(tmp_path):
    cfg = make_cfg(tmp_path)
    specs, _ = task_layouts(cfg)
    learner = fresh_learner(cfg)
    learner.step(0, lambda task: make_batch(LAYOUT, [1], seed=1))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint(ckpt, learner.raw_model, learner.optimizer, 1, cfg, specs, LAYOUTS)
    with pytest.raises(ValueError, match=rf"{ckpt}.*holds one AdamW.*per-task moments for 2 tasks"):
        restore(make_cfg(tmp_path, "train.task_moments=true"), VOCAB, ckpt)


def test_it_excludes_gradient_balancing(tmp_path):
    with pytest.raises(ConfigError, match="train.task_moments"):
        make_cfg(tmp_path, "train.task_moments=true", "train.grad_balance=norm")


def _ddp_rank(rank: int, world: int, run_dir: str, port: int) -> None:
    """One rank of the DDP test below: its own batch of each task, parameters saved after one step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = make_cfg(run_dir, "train.task_moments=true")
        state = restore(cfg, VOCAB, None, rank=rank, prepare=torch.nn.parallel.DistributedDataParallel)
        learner = Learner(state.model, state.optimizer, cfg, LAYOUTS)
        batches = _rank_batches(rank)
        learner.step(0, batches.__getitem__)
        torch.save(params(learner), Path(run_dir) / f"params-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rank_batches(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    return {TASKS[0]: make_batch(LAYOUT, [1, 1, 1], seed=10 + rank), TASKS[1]: make_batch(LAYOUT, [1], seed=20 + rank)}


def test_under_ddp_each_tasks_gradient_is_averaged_over_ranks(tmp_path):
    spawn_ranks(_ddp_rank, tmp_path)
    got = [torch.load(tmp_path / f"params-{r}.pt") for r in range(2)]
    # The same step in one process, from each task's gradient averaged over the two ranks' batches.
    cfg = make_cfg(tmp_path, "train.task_moments=true")
    learner = fresh_learner(cfg)  # the ranks' model: rank 0's, train.seed 0, which DDP copies
    model = learner.raw_model
    grads = TaskGradients([p for p in model.parameters() if p.requires_grad])
    for k, task in enumerate(TASKS):
        for rank in range(2):
            out = model(_rank_batches(rank)[task], LAYOUT)
            (out.loss / 2 / 2).backward()  # 1/M for the micro-batch, 1/2 for the mean over ranks
        grads.take(k)
        grads.counts[k] = 1
    grads.clip(cfg.train.grad_clip)
    for group in learner.optimizer.param_groups:
        group["lr"] = 3e-3 / 2
    learner.optimizer.step_tasks(grads)
    want = params(learner)
    # A first AdamW step moves a weight by about lr * g / (|g| + eps): where g is within rounding of zero, the
    # order of the sum (gloo's all-reduce against one process's two backwards) moves it by a few 1e-6 on some
    # CPUs. A rank that skipped the average would be off by about lr (1.5e-3) on most weights: atol is lr / 100.
    for name in want:
        for rank in range(2):
            torch.testing.assert_close(got[rank][name], want[name], rtol=1e-4, atol=1.5e-5, msg=f"rank {rank}: {name}")
    assert math.isfinite(float(next(iter(want.values())).sum()))
