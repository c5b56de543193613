"""Training benchmark: ratios measured in ONE run (absolute numbers on a shared machine are noisy).

1. Ray Data pipeline: sequence rows/s of one task dataset (read -> tokenize/pad actors) with 2 actors
   over 1, 2 actors handing blocks on in the store's order (data.preserve_order) over in any order, and
   with 1 actor over the same WindowSampler called in a bare loop in this process; and the
   sampler's draws over one file of 200-step Pendulum episodes, tokenized once per call (what it does)
   over decoded, checked and tokenized again for every draw (what it did).
2. Training: real (non-pad) tokens/s through Ray Data + a 1-worker TorchTrainer over the same model, data and loop
   (mixture, accumulation, AdamW, clipping) in a bare torch loop in this process, same torch threads.
3. Model FLOP/s of that training over the machine's fp32 matmul rate, measured in the same run.

Run: .venv/bin/python bench/train.py [--steps 10] [--preset small] [--context 256] [--quick]
"""

from __future__ import annotations

import argparse  # noqa: E402
import dataclasses
import os
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from mugato_ray.config import TaskEntry, load_config  # noqa: E402
from mugato_ray.data import (  # noqa: E402
    WINDOW_SEED_KEY,
    WindowSampler,
    step_tasks,
    synthetic_episodes,
    task_dataset,
    task_layouts,
)
from mugato_ray.episodes import episode_to_row, store_dir, write_episodes  # noqa: E402
from mugato_ray.learner import lr_at, make_optimizer, touch_all  # noqa: E402
from mugato_ray.model import GatoModel, count_flops_per_token  # noqa: E402
from mugato_ray.resources import plan_resources  # noqa: E402
from mugato_ray.sequence import STEP_MASK_KEY  # noqa: E402
from mugato_ray.store_check import store_files  # noqa: E402
from mugato_ray.train import train  # noqa: E402

TASKS = ["text-arith", "BabyAI-GoToRedBall-v0", "Pendulum-v1"]
PIPELINE_TASK = "BabyAI-GoToRedBall-v0"  # images: the heaviest rows


def make_store(cfg, files: int, per_file: int, length: tuple[int, int]) -> None:
    specs, _ = task_layouts(cfg)
    for i, (task, spec) in enumerate(specs.items()):
        for f in range(files):
            eps = synthetic_episodes(task, spec, per_file, seed=1000 * i + f, length=length)
            write_episodes(store_dir(cfg, task), eps, name=f"part-{f:03d}.parquet", spec=spec)


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of the values (np.asarray would stack equal-length lists into 2-D)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def file_batches(cfg, task: str) -> list[dict[str, np.ndarray]]:
    """The store rows of each file as one numpy batch (what Ray Data hands an actor)."""
    out = []
    for i, path in enumerate(store_files(cfg, task)):
        table = pq.read_table(path)
        batch = {c: object_array(table.column(c).to_pylist()) for c in table.column_names}
        batch[WINDOW_SEED_KEY] = np.full(len(table), (i + 1) / 1000)
        out.append(batch)
    return out


# ---------------------------------------------------------------------------------------------
# 1. the pipeline


def pipeline_rate(ds) -> tuple[float, float, int]:
    """rows/s of one whole pass (actor start included: every pass pays it) and after its first batch."""
    t0, t_first, rows, first_rows = time.perf_counter(), None, 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch[STEP_MASK_KEY])
        if t_first is None:
            t_first, first_rows = time.perf_counter(), n
        rows += n
    t1 = time.perf_counter()
    return rows / (t1 - t0), (rows - first_rows) / (t1 - t_first), rows


def bench_pipeline(cfg, specs, args) -> None:
    task, windows = PIPELINE_TASK, args.windows
    files = store_files(cfg, task)
    # Bare loop: the same callable on the same batches, in this process (the Parquet decoding to numpy
    # is timed too: the actors do it).
    t = time.perf_counter()
    sampler = WindowSampler(task, specs[task], cfg, seed=0, windows=windows)
    bare_rows = sum(len(out[STEP_MASK_KEY]) for b in file_batches(cfg, task) for out in sampler(b))
    bare = bare_rows / (time.perf_counter() - t)
    rates = {}
    # (actors, blocks in the store's order: what training asks for with data.preserve_order, the default)
    for actors, ordered in [(1, False), (2, False), (2, True)] * 2:  # interleaved: the machine's load drifts
        ds = task_dataset(task, files, specs[task], cfg, windows=windows, actors=actors, actor_cpus=0.5)
        ds.context.execution_options.preserve_order = ordered
        whole, steady, rows = pipeline_rate(ds)
        assert rows == bare_rows, (rows, bare_rows)
        rates.setdefault((actors, ordered), []).append((whole, steady))
    (one, one_s), (two, two_s), (two_o, two_os) = (max(rates[k]) for k in ((1, False), (2, False), (2, True)))
    print(f"pipeline {task}: {len(files)} files, {bare_rows} rows/pass ({windows} windows/episode); rows/s of a "
          "whole pass (after its first batch)")
    print(f"  bare loop          {bare:7.0f}")
    print(f"  Ray Data, 1 actor  {one:7.0f} ({one_s:5.0f})   / bare = {one / bare:.2f} ({one_s / bare:.2f})")
    print(f"  Ray Data, 2 actors {two:7.0f} ({two_s:5.0f})   / 1 actor = {two / one:.2f} ({two_s / one_s:.2f})"
          "   (goal >= 1.7 with free CPUs)")
    print(f"  2 actors, in order {two_o:7.0f} ({two_os:5.0f})   / any order = {two_o / two:.2f} ({two_os / two_s:.2f})")


def bench_sampler(cfg, specs, draws: int) -> None:
    """Rows/s of WindowSampler's draws (episodes decoded, checked and tokenized once per call) over the
    same draws each decoding, checking and tokenizing its windows again, on one batch of 32 Pendulum
    episodes of 200 steps (a 1-step window: the Markov tasks' per-row cost is all overhead)."""
    task = "Pendulum-v1"
    c = dataclasses.replace(cfg, tasks=[TaskEntry(task, window=1)])
    eps = synthetic_episodes(task, specs[task], 32, seed=7, length=(200, 200))
    table = pa.Table.from_pylist([episode_to_row(e) for e in eps])
    batch = {col: object_array(table.column(col).to_pylist()) for col in table.column_names}
    batch[WINDOW_SEED_KEY] = np.full(len(eps), 0.5)
    sampler = WindowSampler(task, specs[task], c, seed=0, windows=draws)
    rates = {}
    for name in ("shared", "per draw", "shared", "per draw"):  # interleaved: the machine's load drifts
        t0 = time.perf_counter()
        if name == "shared":
            rows = sum(len(out[STEP_MASK_KEY]) for out in sampler(batch))
        else:
            rows = 0
            for draw in range(draws):
                sampler.builder.seed = draw
                rows += len(sampler.builder(batch)[STEP_MASK_KEY])
        rates.setdefault(name, []).append(rows / (time.perf_counter() - t0))
    shared, per_draw = max(rates["shared"]), max(rates["per draw"])
    print(f"sampler {task}: 32 episodes x 200 steps, {draws} draws of 1-step windows; rows/s")
    print(f"  tokenized per draw   {per_draw:8.0f}")
    print(f"  tokenized once       {shared:8.0f}   / per draw = {shared / per_draw:.1f}")


# ---------------------------------------------------------------------------------------------
# 2. training


def bare_training(cfg, specs, layouts, threads: int, steps: int) -> tuple[float, float]:
    """The training loop without Ray: (tokens/s after the first step, loss-token fraction)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tasks = [t.name for t in cfg.tasks]
    pools = {}
    for task in tasks:  # sequences made in-process by the same callable, collated into batches
        sampler = WindowSampler(task, specs[task], cfg, seed=0, windows=4)
        rows = [out for b in file_batches(cfg, task) for out in sampler(b)]
        cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        n = len(cat[STEP_MASK_KEY]) // cfg.data.batch_size * cfg.data.batch_size
        pools[task] = [{k: torch.from_numpy(v[i:i + cfg.data.batch_size]) for k, v in cat.items()}
                       for i in range(0, n, cfg.data.batch_size)]
    vocab = next(iter(specs.values())).vocab
    model = GatoModel(cfg.model, vocab, patch_size=cfg.tokenizer.patch_size, mu=cfg.tokenizer.mu, M=cfg.tokenizer.M)
    opt = make_optimizer(model, cfg.train)
    tokens, loss_tokens, t0 = 0, 0, None
    model.train()
    for step in range(steps):
        if step == 1:
            tokens, loss_tokens, t0 = 0, 0, time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train)
        opt.zero_grad(set_to_none=True)
        tasks_of_step = step_tasks(cfg, step)
        m = len(tasks_of_step)
        for i, k in enumerate(tasks_of_step):
            task = tasks[k]
            batch = pools[task][(step * m + i) % len(pools[task])]
            out = model(batch, layouts[task])
            (out.loss / m + touch_all(model)).backward()
            tokens += int(out.num_tokens)  # real tokens, as the Ray loop counts them (pads are not work)
            loss_tokens += int(out.num_loss_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
    return tokens / (time.perf_counter() - t0), loss_tokens / tokens


def matmul_rate(threads: int, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(7):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def bench_training(cfg, specs, layouts, args) -> None:
    plan = plan_resources(cfg, ray.cluster_resources())
    threads = plan.torch_threads
    result = train(cfg, plan)
    windows = [h["tokens_per_s"] for h in result.history[1:]]  # the first window waits for the data
    ray_rate = statistics.mean(windows)
    bare_rate, loss_fraction = bare_training(cfg, specs, layouts, threads, cfg.train.steps)
    model = GatoModel(cfg.model, next(iter(specs.values())).vocab, patch_size=cfg.tokenizer.patch_size,
                      mu=cfg.tokenizer.mu, M=cfg.tokenizer.M)
    seq_len = statistics.mean(layouts[t.name].seq_len for t in cfg.tasks)
    flops_per_token = count_flops_per_token(model, int(seq_len), loss_fraction)
    mm = matmul_rate(threads)
    print(f"training: {cfg.model.preset} preset ({model.num_params() / 1e6:.2f}M params), context "
          f"{cfg.model.context}, batch {cfg.data.batch_size}, {len(cfg.tasks)} tasks/step, {threads} torch thread(s)")
    print(f"  bare torch loop         {bare_rate:8.0f} tokens/s")
    print(f"  Ray Data + Ray Train    {ray_rate:8.0f} tokens/s   / bare = {ray_rate / bare_rate:.2f}   (goal >= 0.9)")
    print(f"  model FLOP/s (Ray)      {flops_per_token * ray_rate / 1e9:8.1f} GFLOP/s  "
          f"({flops_per_token / 1e6:.1f} MFLOP/token, {loss_fraction:.1%} of positions get logits)")
    print(f"  matmul 2048^3 fp32      {mm / 1e9:8.1f} GFLOP/s  -> utilization {flops_per_token * ray_rate / mm:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each training run")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--files", type=int, default=16, help="store files (= blocks) per task")
    parser.add_argument("--windows", type=int, default=32, help="windows per episode in the pipeline bench")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.preset, args.files, args.windows = 4, "tiny", 4, 2
    with tempfile.TemporaryDirectory() as run_dir:
        names = ", ".join(f"{{name: {t}}}" for t in TASKS)
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs/smoke.yaml", [
            f"run_dir={run_dir}", f"tasks=[{names}]", f"model.preset={args.preset}",
            f"model.context={args.context}", f"data.batch_size={args.batch}", f"train.steps={args.steps}",
            "train.log_every=2", f"train.checkpoint_every={args.steps}", f"train.warmup_steps={max(1, args.steps // 5)}",
            "data.one_block_mib=0",  # a block per file, so that two actors have blocks to share
        ])
        make_store(cfg, args.files, 16, (20, 60))
        specs, layouts = task_layouts(cfg)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"torch={torch.__version__} ray={ray.__version__} cpus={os.cpu_count()}")
        bench_pipeline(cfg, specs, args)
        bench_sampler(cfg, specs, 4 if args.quick else 64)
        bench_training(cfg, specs, layouts, args)
        ray.shutdown()


if __name__ == "__main__":
    main()
