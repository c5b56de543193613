"""The learning step without Ray: a plain model, plain dict batches, one process."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mugato_ray.checkpoints import read_state, verify_checkpoint, write_checkpoint
from mugato_ray.config import load_config
from mugato_ray.data import task_layouts
from mugato_ray.learner import Learner, MetricWindow, MicroStats, StepStats, attempt_seed, lr_at, restore
from tests.test_model import VOCAB, make_batch, text_layout

ROOT = Path(__file__).resolve().parents[1]
TASK = "text-arith"
LAYOUT = text_layout(16)


def make_cfg(run_dir, *overrides):
    return load_config(ROOT / "configs/smoke.yaml", [f"run_dir={run_dir}", f"tasks=[{{name: {TASK}}}]",
                                                     "train.steps=20", "train.warmup_steps=2", "train.lr=3e-3",
                                                     *overrides])


def with_seed(cfg, seed: int):
    """``cfg`` with ``train.seed = seed``."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))


def fresh_learner(cfg, seed: int = 0) -> Learner:
    state = restore(with_seed(cfg, seed), VOCAB, None, rank=0)  # restore seeds the weights from train.seed
    return Learner(state.model, state.optimizer, cfg, {TASK: LAYOUT})


def checkpoint_after(cfg, steps: int, directory: Path, batch) -> Learner:
    """A fresh learner stepped ``steps`` times on ``batch``, then checkpointed into ``directory`` as training
    does: its acting weights in model.pt and, with ``train.ema_decay``, the training weights in state.pt."""
    learner = fresh_learner(cfg)
    for step in range(steps):
        learner.step(step, lambda task: batch)
    directory.mkdir()
    specs, _ = task_layouts(cfg)
    write_checkpoint(directory, learner.acting_model, learner.optimizer, steps, cfg, specs, {TASK: LAYOUT},
                     train_model=learner.raw_model if learner.average is not None else None)
    assert verify_checkpoint(directory) is None
    return learner


def test_steps_on_a_fixed_batch_lower_the_loss_and_report_their_stats(tmp_path):
    cfg = make_cfg(tmp_path, "train.grad_accum=2")
    learner = fresh_learner(cfg)
    batch = make_batch(LAYOUT, [1, 1, 1, 1], seed=7)
    asked = []

    def next_batch(task):
        asked.append(task)
        return batch

    losses = []
    for step in range(cfg.train.steps):
        stats = learner.step(step, next_batch)
        assert stats.step == step and stats.lr == pytest.approx(lr_at(step, cfg.train))
        assert [m.task for m in stats.micro] == [0, 0] and math.isfinite(float(stats.grad_norm))
        assert all(int(m.num_tokens) > 0 and m.num_positions > 0 for m in stats.micro)
        assert not stats.micro[0].loss.requires_grad
        losses.append(stats.mean_loss())
    assert asked == [TASK] * 2 * cfg.train.steps
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(cfg.train.steps - 1, cfg.train))
    # A uniform predictor scores ln(|V|) ~ 5.8 nats on random bytes; 20 AdamW steps memorize a good part.
    assert losses[-1] < losses[0] - 1.0, losses
    assert losses[-1] < min(losses[:5])


def test_m_identical_micro_batches_make_the_same_step_as_one(tmp_path):
    """Each micro-batch's loss is weighted 1/M: M copies of a batch give exactly the gradient of one."""
    batch = make_batch(LAYOUT, [1, 1, 1], seed=3)
    results = []
    for m in (1, 3):
        cfg = make_cfg(tmp_path, f"train.grad_accum={m}", "train.grad_clip=1.0e9")  # clipping would hide a scale
        learner = fresh_learner(cfg, seed=5)
        stats = learner.step(0, lambda task: batch)
        assert len(stats.micro) == m
        results.append((stats, dict(learner.raw_model.named_parameters())))
    (one, p1), (three, p3) = results
    assert float(three.grad_norm) == pytest.approx(float(one.grad_norm), rel=1e-5)
    assert float(one.grad_norm) > 0
    for name, p in p1.items():
        # (The parameters themselves are not compared: AdamW's first update is ~lr * sign(grad), which
        # rounding can flip on gradients that are ~0, such as the key biases' under softmax.)
        torch.testing.assert_close(p3[name].grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_metric_window_summary_on_known_sums_then_resets():
    tasks = ["a", "b", "c"]
    window = MetricWindow(len(tasks))
    window.add(0, torch.tensor(2.0), 10, 20)
    window.add(0, torch.tensor(4.0), torch.tensor(6), 12)
    window.add_step(StepStats(0, 1e-3, torch.tensor(1.0), [MicroStats(1, torch.tensor(1.0), 3, 4)]))
    metrics = window.summary(tasks, elapsed=2.0)
    assert metrics == {"tokens_per_s": 9.5, "loss/a": 3.0, "nonpad/a": 0.5, "loss/b": 1.0, "nonpad/b": 0.75,
                       "loss": 2.0}
    assert list(metrics) == ["tokens_per_s", "loss/a", "nonpad/a", "loss/b", "nonpad/b", "loss"]
    for t in (window.loss_sum, window.loss_cnt, window.tokens, window.positions):
        assert t.dtype == torch.float64 and not t.any()
    empty = window.summary(tasks, elapsed=1.0)
    assert set(empty) == {"tokens_per_s", "loss"} and empty["tokens_per_s"] == 0.0 and math.isnan(empty["loss"])
    window.add(2, torch.tensor(0.5), 1, 1)
    assert window.summary(tasks)["loss"] == 0.5  # elapsed measured by the window itself


def test_restore_round_trips_a_checkpoint_and_seeds_the_attempt(tmp_path):
    cfg = make_cfg(tmp_path)
    batch = make_batch(LAYOUT, [1, 1], seed=11)
    ckpt = tmp_path / "ckpt"
    learner = checkpoint_after(cfg, 3, ckpt, batch)
    assert (ckpt / "layouts.json").is_file()

    state = restore(cfg, VOCAB, ckpt, rank=0)
    assert state.step == 3 and state.checkpoint == ckpt
    assert torch.equal(torch.get_rng_state(), read_state(ckpt)["torch_rng"])  # rank 0: the saved RNG
    want, got = learner.raw_model.state_dict(), state.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    saved, loaded = learner.optimizer.state_dict(), state.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"] and saved["state"].keys() == loaded["state"].keys()
    for i, s in saved["state"].items():
        assert all(torch.equal(s[k], loaded["state"][i][k]) for k in s)
    # The resumed learner makes the same next step as the one that kept going.
    resumed = Learner(state.model, state.optimizer, cfg, {TASK: LAYOUT})
    learner.step(3, lambda task: batch)
    resumed.step(3, lambda task: batch)
    for (name, p), q in zip(learner.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), name

    restore(cfg, VOCAB, ckpt, rank=1)  # other ranks: seeded from (train.seed, rank, start step)
    assert torch.initial_seed() == attempt_seed(cfg.train.seed, 1, 3)
    fresh = restore(cfg, VOCAB, None, rank=1)
    assert fresh.step == 0 and fresh.checkpoint is None and not fresh.optimizer.state_dict()["state"]
    assert torch.initial_seed() == attempt_seed(cfg.train.seed, 1, 0)


def test_a_fresh_model_is_the_seeds_whatever_ran_before(tmp_path):
    """The initial weights come from ``train.seed``: the same seed gives the same model even when something
    drew from torch's global generator first (in a training worker that differs from run to run),
    another seed another model, and another rank another draw (DDP then copies rank 0's)."""
    cfg = make_cfg(tmp_path)
    torch.manual_seed(123)
    first = restore(cfg, VOCAB, None, rank=0).model.state_dict()
    torch.rand(1000)  # what ran before restore must not matter
    again = restore(cfg, VOCAB, None, rank=0).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = restore(with_seed(cfg, 1), VOCAB, None, rank=0).model.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)
    rank1 = restore(cfg, VOCAB, None, rank=1).model.state_dict()
    assert not all(torch.equal(first[k], rank1[k]) for k in first)


def test_balanced_gradients_count_each_micro_batch_by_its_direction(tmp_path):
    """``train.grad_balance: norm``: the step's gradient is mean(|g_i|) * sum(g_i / |g_i|) over the
    micro-batches' gradients g_i, however different their sizes."""
    a = make_batch(LAYOUT, [1, 1, 1], seed=3)
    b = make_batch(LAYOUT, [1], seed=4)  # a different batch: another gradient, of another norm

    def grads(*overrides, batches):
        cfg = make_cfg(tmp_path, "train.grad_clip=1.0e9", *overrides)
        learner = fresh_learner(cfg, seed=5)
        it = iter(batches)
        learner.step(0, lambda task: next(it))
        return {n: p.grad.clone() for n, p in learner.raw_model.named_parameters()}

    def norm(g):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g.values()]))

    ga, gb = grads("train.grad_accum=1", batches=[a]), grads("train.grad_accum=1", batches=[b])
    na, nb = norm(ga), norm(gb)
    assert not math.isclose(float(na), float(nb), rel_tol=0.05)  # else balancing would change nothing
    plain = grads("train.grad_accum=2", batches=[a, b])
    balanced = grads("train.grad_accum=2", "train.grad_balance=norm", batches=[a, b])
    for name in ga:
        # Each micro-batch's loss is weighted 1/2 either way; normalizing cancels that, the mean norm not.
        want = (na + nb) / 4 * (ga[name] / na + gb[name] / nb)
        torch.testing.assert_close(balanced[name], want, rtol=1e-4, atol=1e-8, msg=name)
        torch.testing.assert_close(plain[name], (ga[name] + gb[name]) / 2, rtol=1e-4, atol=1e-8, msg=name)
    assert not all(torch.allclose(balanced[n], plain[n], rtol=1e-3) for n in ga)


def spawn_ranks(fn, run_dir, world: int = 2) -> None:
    """Run ``fn(rank, world, run_dir, port)`` in ``world`` processes that meet on a free local port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(world, str(run_dir), port), nprocs=world, join=True)


def _balanced_ddp_rank(rank: int, world: int, run_dir: str, port: int) -> None:
    """One rank of the DDP test below: its own two micro-batches, gradients saved after the step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = make_cfg(run_dir, "train.grad_clip=1.0e9", "train.grad_accum=2", "train.grad_balance=norm")
        state = restore(cfg, VOCAB, None, rank=rank, prepare=torch.nn.parallel.DistributedDataParallel)
        learner = Learner(state.model, state.optimizer, cfg, {TASK: LAYOUT})
        it = iter([make_batch(LAYOUT, [1, 1, 1], seed=10 + rank), make_batch(LAYOUT, [1], seed=20 + rank)])
        learner.step(0, lambda task: next(it))
        grads = {n: p.grad for n, p in learner.raw_model.named_parameters()}
        torch.save(grads, Path(run_dir) / f"grads-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_balanced_gradients_under_ddp_are_the_mean_of_each_ranks_balanced_gradient(tmp_path):
    spawn_ranks(_balanced_ddp_rank, tmp_path)
    got = [torch.load(tmp_path / f"grads-{r}.pt") for r in range(2)]
    want = []
    for rank in range(2):  # each rank's balanced gradient, computed alone
        cfg = make_cfg(tmp_path, "train.grad_clip=1.0e9", "train.grad_accum=2", "train.grad_balance=norm")
        learner = fresh_learner(cfg)  # the ranks' model: rank 0's, train.seed 0, which DDP copies
        it = iter([make_batch(LAYOUT, [1, 1, 1], seed=10 + rank), make_batch(LAYOUT, [1], seed=20 + rank)])
        learner.step(0, lambda task, it=it: next(it))
        want.append({n: p.grad.clone() for n, p in learner.raw_model.named_parameters()})
    for name in want[0]:
        mean = (want[0][name] + want[1][name]) / 2
        for rank in range(2):
            torch.testing.assert_close(got[rank][name], mean, rtol=1e-4, atol=1e-7, msg=f"rank {rank}: {name}")


def test_train_precision_bf16_runs_the_products_in_bf16_and_keeps_fp32_state(tmp_path, monkeypatch, caplog):
    """``train.precision``: bf16 on a CPU whose bf16 products are fast runs the step's matrix products in
    bf16 (a different, nearby loss) while weights, gradients and moments stay fp32; fp32 and the default
    (auto, fp32 on a CPU) run none in bf16; and a CPU that multiplies bf16 slowly trains in fp32, saying so."""
    import mugato_ray.learner as learner_module

    batch = make_batch(LAYOUT, [1, 1, 1, 1], seed=7)
    monkeypatch.setattr(learner_module, "cpu_bf16_speedup", lambda: 2.5)
    losses = {}
    for precision in ("auto", "fp32", "bf16"):
        learner = fresh_learner(make_cfg(tmp_path, f"train.precision={precision}"), seed=3)
        with learner.amp:
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (
                torch.bfloat16 if precision == "bf16" else torch.float32)
        losses[precision] = [learner.step(step, lambda task: batch).mean_loss() for step in range(3)]
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in learner.raw_model.parameters())
        moments = [v for state in learner.optimizer.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor) and v.is_floating_point()]
        assert moments and all(m.dtype == torch.float32 for m in moments)
    assert losses["auto"] == losses["fp32"]
    assert losses["bf16"][0] != losses["fp32"][0]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=0.02)

    monkeypatch.setattr(learner_module, "cpu_bf16_speedup", lambda: 0.4)
    with caplog.at_level("WARNING", logger="mugato_ray.learner"):
        learner = fresh_learner(make_cfg(tmp_path, "train.precision=bf16"), seed=3)
    assert "train.precision=bf16" in caplog.text and "training in fp32" in caplog.text
    with learner.amp:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_cpu_bf16_speedup_is_a_positive_ratio_measured_once():
    from mugato_ray.learner import cpu_bf16_speedup

    first = cpu_bf16_speedup()
    assert first > 0 and math.isfinite(first)
    assert cpu_bf16_speedup() == first  # cached: one measurement per process
