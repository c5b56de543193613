"""The main job: collect expert data, train the model, evaluate it, report.

Each stage is the library function its own job calls (``collect``, ``train``, ``evaluate``), so the main
job is the three jobs in a row over one run directory. Re-running it resumes: chunks already in the store
are kept, and training continues from its latest checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mugato_ray.config import Config, save_config


@dataclass
class MainResult:
    checkpoint: str
    """The checkpoint that was evaluated."""
    report: dict
    """The eval.json content."""
    paths: dict[str, Path]
    """Report files written under <run_dir>/eval/."""
    seconds: dict[str, float]
    """Wall time of each stage."""


def run_main(cfg: Config, log: Callable[[str], None] = print) -> MainResult:
    """Collect -> train -> evaluate -> report, on a connected Ray (``cli.init_ray``)."""
    # Lazy: the stages import torch and gymnasium; jobs/main.py imports this module before its config is checked.
    from mugato_ray.collect import collect
    from mugato_ray.evaluate import eval_dir, evaluate, summary_lines, write_eval_metrics, write_report
    from mugato_ray.resolve import resolve_tasks
    from mugato_ray.rollout import PolicySpec
    from mugato_ray.train import train

    save_config(cfg)
    seconds = {}
    resolved = resolve_tasks(cfg)  # once: every stage receives the same resolved tasks

    t0 = time.perf_counter()
    log(f"== collect: {len(cfg.tasks)} tasks into {Path(cfg.run_dir) / 'data'}")
    collect(cfg, resume=True, resolved=resolved, log=log)
    seconds["collect"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"== train: {cfg.train.steps} steps, model preset {cfg.model.preset}")
    result = train(cfg, resolved=resolved)
    seconds["train"] = time.perf_counter() - t0
    if result.checkpoint_path is None:
        raise RuntimeError(f"training under {cfg.run_dir} produced no checkpoint (train.steps={cfg.train.steps})")
    log(f"trained {result.final_step} steps; checkpoint: {result.checkpoint_path}")

    t0 = time.perf_counter()
    checkpoint, training = choose_checkpoint(cfg, result, log)
    log(f"== evaluate: {cfg.eval.episodes} episodes per task")
    policy = PolicySpec("model", checkpoint, temperature=cfg.rollout.temperature)
    report = evaluate(cfg, policy, log=log, resolved=resolved)
    write_eval_metrics(cfg, report, training.get("chosen_step", result.final_step))
    if training.get("history") or training.get("evaluations"):
        report["training"] = training
    if result.skipped_files:
        report["skipped_store_files"] = result.skipped_files
    if result.online is not None:
        report["online"] = online_summary(result.online, result.history)
    paths = write_report(report, eval_dir(cfg))
    seconds["evaluate"] = time.perf_counter() - t0

    log("== report")
    for line in summary_lines(report):
        log(line)
    for path in paths.values():
        log(f"wrote {path}")
    log("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return MainResult(checkpoint, report, paths, seconds)


def loss_history(cfg: Config) -> list[dict]:
    """The training losses of the whole run by step (``loss``, ``loss/<task>``), from ``metrics/train.csv``:
    every attempt's, where ``TrainResult.history`` holds only the last one's. Empty without a CSV logger."""
    from mugato_ray.metric_log import metrics_dir, read_metrics  # lazy: as in run_main

    rows = read_metrics(metrics_dir(cfg) / "train.csv") if "csv" in cfg.train.loggers else []
    return [{k: v for k, v in row.items() if k == "step" or k == "loss" or k.startswith("loss/")} for row in rows]


def choose_checkpoint(cfg: Config, result, log: Callable[[str], None]) -> tuple[str, dict]:
    """The weights to evaluate: the snapshot with the best IQM during training, or the latest within
    ``train.select_margin`` of it, when snapshots were scored (``train.eval_every``), else the final
    checkpoint; and the report's "training" section: the loss history (:func:`loss_history`) and, with
    snapshots, their scores and which was chosen."""
    from mugato_ray.train_eval import best_snapshot  # lazy: as in run_main

    training: dict = {"history": loss_history(cfg)}
    if not result.evaluations:
        return result.checkpoint_path, training
    margin = cfg.train.select_margin
    best = best_snapshot(result.evaluations, margin)
    training |= {"evaluations": [{k: v for k, v in r.items() if k != "model_file"} for r in result.evaluations],
                 "episodes": cfg.train.eval_episodes}
    if best is None:
        log("no snapshot has an IQM (no task has reference returns): evaluating the final checkpoint")
        return result.checkpoint_path, training
    iqms = ", ".join(f"{r['step']}: {r['iqm']:.3f}" for r in result.evaluations if r.get("iqm") is not None)
    log(f"snapshot IQMs during training (step: IQM) {iqms}")
    which = (f"the latest within {margin:g} of the best IQM" if margin > 0 else "the best") + \
        f" of {len(result.evaluations)}"
    log(f"evaluating the snapshot of step {best['step']} (IQM {best['iqm']:.3f}), {which}: {best['model_file']}")
    training |= {"chosen_step": best["step"], "chosen_iqm": best["iqm"], "select_margin": margin}
    return best["model_file"], training


def online_summary(stats, history: list[dict]) -> dict:
    """The report's "online" section: what the online actors stored and what training read of it."""
    last = history[-1] if history else {}
    return {
        "rounds": stats.rounds,
        "episodes": stats.episodes,
        "kept": {t: n - stats.evicted.get(t, 0) for t, n in stats.episodes.items()},
        "mean_return": {t: (sum(r) / len(r) if r else None) for t, r in stats.returns.items()},
        "weight_steps": {t: sorted(set(s)) for t, s in stats.steps.items()},
        "failed_episodes": stats.failed,
        "deleted_files": stats.deleted_files,
        "errors": stats.errors[:10],
        "online_rows_read": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("online_rows/")},
    }
