"""Learning benchmark: the GATO model against a plain behaviour-cloning baseline on the same store.

    python bench/learning.py --config configs/demo.yaml [--tasks CartPole-v1 ...] [--seeds 0 1]
        [--eval-every 100] [--baseline-steps 2000] [--out runs/learning] [key=value ...]

The store must exist (``python jobs/collect.py --config ...``). For each training seed:

- the model: trained multi-task on every task of the config, with the library's model, sequence builder,
  task mixture, optimizer and schedule, in this process (no Ray: this measures learning, not the
  pipeline, whose overhead bench/train.py measures);
- the baseline (``mugato_ray.baseline``): one small network per environment task, trained alone.

Both are evaluated along the way by the evaluation harness's own pieces (``RolloutWorker.sample`` for
environment tasks, ``score_dataset_chunk`` for dataset tasks) on the evaluation seeds, which collection
never uses. Writes ``learning.csv`` (one row per evaluation) and ``learning.png`` (normalized score
against training wall seconds), and prints per task the final scores and the key ratio: the model's wall
time to reach 0.9 of the baseline's final score, over the baseline's wall time to its final score.
With ``--keep-models`` each seed's last model stays in ``<out>/model-seed<S>/``, for ``jobs/evaluate.py
--checkpoint`` on more episodes or other seeds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mugato_ray.baseline import BaselinePolicy, train_baseline
from mugato_ray.config import load_config
from mugato_ray.data import EpisodeFilter, save_layouts, task_batch_size, task_layouts
from mugato_ray.episodes import read_episodes, store_dir
from mugato_ray.evaluate import check_seeds_disjoint, eval_seeds
from mugato_ray.learner import Learner, make_optimizer
from mugato_ray.model import GatoModel, save_model
from mugato_ray.rollout import PolicySpec
from mugato_ray.sequence import SequenceBuilder
from mugato_ray.tasks import get_task
from mugato_ray.train_eval import score_policy

WARMUP_UPDATES = 20
"""Untimed baseline updates before each baseline's timed training."""

FIELDS = ["learner", "seed", "task", "step", "wall_s", "mean_return", "normalized", "success_rate"]


def with_eval_episodes(cfg, episodes: int):
    """``cfg`` evaluating ``episodes`` held-out seeds (``eval.seed_offset + i``): ``--eval-episodes`` decides,
    whatever ``eval.episodes`` the config sets."""
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes=episodes))


def evaluate_policy(cfg, task: str, policy, episodes: int) -> dict:
    """Mean return, normalized score and success rate of ``policy`` on the first ``episodes`` evaluation seeds."""
    eval_cfg = with_eval_episodes(cfg, episodes)
    return score_policy(eval_cfg, task, policy, eval_seeds(eval_cfg))


def train_model(cfg, seed: int, eval_every: int, eval_episodes: int, out: Path, log) -> list[dict]:
    """The model, multi-task, as jobs/train.py trains it (without Ray); evaluated every ``eval_every`` steps."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tasks = [t.name for t in cfg.tasks]
    specs, layouts = task_layouts(cfg)
    episodes = {t: EpisodeFilter.from_config(cfg, t).apply(read_episodes(store_dir(cfg, t))) for t in tasks}
    builders = {t: SequenceBuilder(t, specs[t], cfg, seed=seed * 1000 + i) for i, t in enumerate(tasks)}
    model = GatoModel(cfg.model, next(iter(specs.values())).vocab, patch_size=cfg.tokenizer.patch_size,
                      mu=cfg.tokenizer.mu, M=cfg.tokenizer.M)
    optimizer = make_optimizer(model, cfg.train, len(cfg.tasks), [t.lr_scale for t in cfg.tasks])
    learner = Learner(model, optimizer, cfg, layouts)
    rng = np.random.default_rng(seed)
    rows, wall = [], 0.0
    ckpt = out / f"model-seed{seed}" / "model.pt"

    def next_batch(task: str) -> dict[str, torch.Tensor]:
        eps = episodes[task]
        batch = builders[task].build([eps[i] for i in rng.integers(0, len(eps), size=task_batch_size(cfg, task))])
        return {key: torch.from_numpy(v) for key, v in batch.items()}

    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        model.train()
        learner.step(step, next_batch)
        wall += time.perf_counter() - t0
        done = step + 1
        if done % eval_every == 0 or done == cfg.train.steps:
            save_model(learner.acting_model, ckpt)
            save_layouts(ckpt.parent / "layouts.json", specs, layouts)
            for task in tasks:
                r = evaluate_policy(cfg, task, PolicySpec("model", str(ckpt)), eval_episodes)
                rows.append({"learner": "model", "seed": seed, "task": task, "step": done, "wall_s": wall, **r})
                log(f"model seed {seed} step {done} ({wall:.0f}s) {task}: return {r['mean_return']:.2f} "
                    f"normalized {r['normalized']:.3f}")
    return rows


def train_baselines(cfg, seed: int, steps: int, eval_every: int, eval_episodes: int, log) -> list[dict]:
    """One baseline per environment task, each trained alone on its store."""
    specs, _ = task_layouts(cfg)
    rows = []
    for task in (t.name for t in cfg.tasks):
        if not get_task(task).has_env:
            log(f"baseline: {task} is a dataset task; no plain baseline (the model's score stands alone)")
            continue
        episodes = EpisodeFilter.from_config(cfg, task).apply(read_episodes(store_dir(cfg, task)))
        # Untimed: the process's first training pays torch's one-time costs (measured: 1.3 s for the first
        # seed's first 50 CartPole updates, 0.1 s for every later seed's), which would flatter the ratio.
        train_baseline(specs[task], episodes, steps=WARMUP_UPDATES, seed=seed)
        clock = {"wall": 0.0, "t0": time.perf_counter()}

        def on_step(step, net, task=task, clock=clock):
            if step % eval_every and step != steps:
                return
            clock["wall"] += time.perf_counter() - clock["t0"]
            r = evaluate_policy(cfg, task, BaselinePolicy(net), eval_episodes)
            net.train()
            rows.append({"learner": "baseline", "seed": seed, "task": task, "step": step, "wall_s": clock["wall"], **r})
            log(f"baseline seed {seed} step {step} ({clock['wall']:.1f}s) {task}: return {r['mean_return']:.2f} "
                f"normalized {r['normalized']:.3f}")
            clock["t0"] = time.perf_counter()

        train_baseline(specs[task], episodes, steps=steps, seed=seed, on_step=on_step)
    return rows


def key_ratios(rows: list[dict]) -> dict[str, dict]:
    """Per task: final scores (mean over seeds) and the model's time to 0.9 of the baseline's final score."""
    out = {}
    for task in sorted({r["task"] for r in rows}):
        summary = {}
        for learner in ("model", "baseline"):
            rs = [r for r in rows if r["task"] == task and r["learner"] == learner]
            if not rs:
                continue
            seeds = sorted({r["seed"] for r in rs})
            finals = [max((r for r in rs if r["seed"] == s), key=lambda r: r["step"]) for s in seeds]
            summary[learner] = {"final": float(np.mean([r["normalized"] for r in finals])),
                                "finals": [round(r["normalized"], 3) for r in finals],
                                "wall_s": float(np.mean([r["wall_s"] for r in finals]))}
        if "model" in summary and "baseline" in summary:
            goal = 0.9 * summary["baseline"]["final"]
            for learner in ("model", "baseline"):
                times = []
                for s in sorted({r["seed"] for r in rows if r["task"] == task and r["learner"] == learner}):
                    hit = [r["wall_s"] for r in rows if r["task"] == task and r["learner"] == learner
                           and r["seed"] == s and r["normalized"] >= goal]
                    times.append(min(hit) if hit else float("inf"))
                summary[f"{learner}_time_to_goal_s"] = float(np.mean(times))
            # The ratio: the model's time to 0.9 of the baseline's final score over the baseline's
            # training time; the baseline's own time to that score is printed beside it (a stricter ratio).
            summary["ratio"] = summary["model_time_to_goal_s"] / max(summary["baseline"]["wall_s"], 1e-9)
            summary["ratio_to_baseline_goal"] = summary["model_time_to_goal_s"] / max(
                summary["baseline_time_to_goal_s"], 1e-9)
        out[task] = summary
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (learner, seed) in sorted({(r["learner"], r["seed"]) for r in rows if r["task"] == task}):
            rs = sorted((r for r in rows if r["task"] == task and r["learner"] == learner and r["seed"] == seed),
                        key=lambda r: r["step"])
            ax.plot([r["wall_s"] for r in rs], [r["normalized"] for r in rs], marker="o", ms=3,
                    color="C0" if learner == "model" else "C1", label=f"{learner} seed {seed}")
        ax.set_title(task)
        ax.set_xlabel("training wall seconds")
        ax.set_ylabel("normalized score")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tasks", nargs="*", help="a subset of the config's tasks (default: all)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--eval-every", type=int, default=100, help="model steps between evaluations")
    ap.add_argument("--eval-episodes", type=int, default=16)
    ap.add_argument("--baseline-steps", type=int, default=2000)
    ap.add_argument("--baseline-eval-every", type=int, default=250)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (default: <run_dir>/learning)")
    ap.add_argument("--keep-models", action="store_true",
                    help="keep each seed's last model in <out>/model-seed<S>/ (for jobs/evaluate.py --checkpoint)")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if args.tasks:
        unknown = set(args.tasks) - {t.name for t in cfg.tasks}
        if unknown:
            sys.exit(f"--tasks: {sorted(unknown)} are not tasks of {args.config}")
        cfg = dataclasses.replace(cfg, tasks=[t for t in cfg.tasks if t.name in args.tasks])
    try:  # before any training: more evaluation seeds must not reach the collection seeds
        check_seeds_disjoint(with_eval_episodes(cfg, args.eval_episodes))
    except ValueError as e:
        sys.exit(f"--eval-episodes {args.eval_episodes}: {e}")
    out = Path(args.out or Path(cfg.run_dir) / "learning")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows: list[dict] = []
    for seed in args.seeds:
        if not args.no_baseline:
            rows += train_baselines(cfg, seed, args.baseline_steps, args.baseline_eval_every, args.eval_episodes, print)
        if not args.no_model:
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            if args.keep_models:
                rows += train_model(run_cfg, seed, args.eval_every, args.eval_episodes, out, print)
                continue
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                rows += train_model(run_cfg, seed, args.eval_every, args.eval_episodes, Path(tmp), print)
    with open(out / "learning.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")  # score_policy reports more
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "learning.png")
    nan = float("nan")
    print(f"\n{'task':24s} {'model':>6s} {'base':>6s} {'model s':>8s} {'base s':>7s} {'model to goal':>13s} "
          f"{'base to goal':>12s} {'ratio':>6s} {'strict':>7s}   (goal: 0.9 x the baseline's final score)")
    for task, s in key_ratios(rows).items():
        m, b = s.get("model", {}), s.get("baseline", {})
        print(f"{task:24s} {m.get('final', nan):6.3f} {b.get('final', nan):6.3f} {m.get('wall_s', nan):8.1f} "
              f"{b.get('wall_s', nan):7.1f} {s.get('model_time_to_goal_s', nan):13.1f} "
              f"{s.get('baseline_time_to_goal_s', nan):12.1f} {s.get('ratio', nan):6.1f} "
              f"{s.get('ratio_to_baseline_goal', nan):7.1f}   per seed: model {m.get('finals')} baseline {b.get('finals')}")
    print(f"wrote {out / 'learning.csv'} and {out / 'learning.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
