"""Hyperparameter sweeps: Ray Tune over the training config, each trial a whole training run and its evaluation.

``run_sweep(cfg)`` draws ``sweep.num_samples`` points of ``sweep.space`` (dotted config keys, e.g.
``train.lr: {loguniform: [1.0e-4, 3.0e-3]}``) and runs each as a Tune trial, at most
``sweep.max_concurrent_trials`` at once. A trial (:func:`run_trial`, a Tune function trainable) is the base
config with its point applied through the same ``key=value`` override path as the command line
(``config.apply_overrides``), and:

- writes under its own run directory ``<run_dir>/sweep/<trial_id>/`` (config.yaml, checkpoints/ with a Ray
  Train run named ``<trial_id>``, snapshots/, metrics/, eval/);
- reads the base run's episode store in place: ``data.store_root`` points at ``<run_dir>/data`` (or the base's
  own ``data.store_root``). A config key rather than a symlink, so every store user goes through
  ``episodes.store_dir`` as before, and a trial's config.yaml (and ``best.yaml``) says where its data is. Trials
  never write to the store: ``online.enabled`` and ``eval.prompt`` without stored expert demonstrations (which
  evaluation would collect) are refused;
- trains with the TorchTrainer (``train.train``, its ``fit()`` inside the trial: Ray Train V2's way of running
  under Tune), evaluates the chosen weights with the evaluation harness (``evaluate.evaluate``,
  ``eval.episodes`` per task on the evaluation seeds; with ``train.eval_every`` the snapshot of the best
  validation IQM, as the main job does), and reports ``iqm`` (the normalized scores' IQM), ``score/<task>``,
  ``validation_iqm`` (the evaluated snapshot's, with ``train.eval_every``) and ``step`` with ``ray.tune.report``.

``sweep.metric`` (``iqm`` or ``validation_iqm``, higher is better) ranks the trials; ``sweep.scheduler: asha``
stops trials whose validation IQM lags, from the snapshot scores reported while they train.
:func:`write_results` writes ``<run_dir>/sweep/results.csv`` (one row per trial, best first) and
``<run_dir>/sweep/best.yaml`` (the best trial's config: ``jobs/train.py --config .../best.yaml run_dir=...``
trains with it on the same store).

Resource accounting (``resources.plan_trial``). With C CPUs (G GPUs) in the cluster and
k = ``sweep.max_concurrent_trials``, each trial is sized on C/k CPUs (G/k GPUs):

- its final evaluation's rollout actors, ``rollout.num_actors * rollout.actor_cpus`` (and ``actor_gpus``),
  come off first; the trial's Ray Tune placement group holds them, plus the snapshot evaluator's CPUs
  (``train.eval_every``), for the trial's whole life: Tune captures the actors the trial starts into that
  group. The trainable itself reserves nothing (an empty head bundle), like a job's driver;
- ``resources.plan_resources`` splits the rest, C/k - evaluation, between the TorchTrainer's workers (their
  own placement group, outside the trial's), the tokenize actors and read tasks of every task dataset (at most
  half of it), and the snapshot evaluator, by its usual rules.

So k trials together reserve at most C CPUs, and no trial's train workers can take the CPUs of another
trial's data pipeline. A sweep whose trial cannot be planned this way (too many concurrent trials, a swept
value such as ``train.num_workers`` that does not fit) is an error naming the keys, before Tune starts.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mugato_ray.config import SECTION_SEEDS, Config, ConfigError, apply_overrides, config_to_dict, sweep_bounds
from mugato_ray.resources import TrialPlan, plan_trial

SWEEP_DIR = "sweep"
RESULTS_FILE = "results.csv"
BEST_FILE = "best.yaml"
FIXED_KEYS = ("run_dir", "data.store_root", "tasks", "sweep", "online")
"""Keys a sweep may not vary: where a trial writes and reads, the task set (the base store holds it), the
sweep itself, and online experience (it writes to the shared store)."""
POLL_S = 1.0
"""How often a trial looks for new snapshot scores to report (``sweep.scheduler: asha``)."""


def sweep_dir(cfg: Config) -> Path:
    """``<run_dir>/sweep``, absolute."""
    return Path(cfg.run_dir).resolve() / SWEEP_DIR


# ---------------------------------------------------------------------------------------------
# The space and the trials' configs


def override(key: str, value: Any) -> str:
    """``key=value`` as the command line writes it (JSON is YAML, so strings stay strings)."""
    return f"{key}={json.dumps(value)}"


def candidate_values(dist: Mapping[str, list]) -> list[Any]:
    """The values of one key that are checked before Tune starts: every listed one, or both bounds."""
    (name, values), = dist.items()
    return list(sweep_bounds(values)) if name in ("uniform", "loguniform") else list(values)


def base_data(cfg: Config) -> dict:
    """``cfg`` as plain data for :func:`trial_config`, its derived section seeds unset again, so that a swept
    ``seed`` moves them as on the command line (a section seed equal to the root seed counts as derived)."""
    data = config_to_dict(cfg)
    for name in SECTION_SEEDS:
        if data[name]["seed"] == cfg.seed:
            data[name]["seed"] = None
    return data


def trial_config(data: dict, params: Mapping[str, Any], run_dir: str | Path, store_root: str | Path) -> Config:
    """The config of one trial: the base ``data`` with ``params`` (dotted key -> value) applied through the
    override path, writing under ``run_dir`` and reading the store under ``store_root``."""
    overrides = [override(k, v) for k, v in params.items()]
    overrides += [override("run_dir", str(run_dir)), override("data.store_root", str(store_root))]
    return apply_overrides(data, overrides, f"sweep trial {dict(params)}")


def sweep_problems(cfg: Config) -> list[str]:
    """What makes a sweep impossible, found before Ray starts: an empty space, a fixed key in it, a value its key
    does not accept (each through the override path, named ``sweep.space.<key>``), or a trial that would write
    to the shared store."""
    if not cfg.sweep.space:
        return ["sweep.space is empty: give at least one key, e.g. sweep.space={train.lr: {choice: [1.0e-3, 3.0e-3]}}"]
    problems, data = [], base_data(cfg)
    for key, dist in cfg.sweep.space.items():
        fixed = next((f for f in FIXED_KEYS if key == f or key.startswith(f + ".")), None)
        if fixed is not None:
            problems.append(f"sweep.space.{key}: '{fixed}' is fixed in a sweep (trials share the base run's "
                            "store and tasks, and write under their own run_dir)")
            continue
        for value in candidate_values(dist):
            try:
                trial_config(data, {key: value}, cfg.run_dir, cfg.store_root())
            except ConfigError as e:
                problems.append(f"sweep.space.{key}: value {value!r}: {e}")
                break
    if cfg.online.enabled:
        problems.append("online.enabled: a sweep's trials read the base run's store and must not write to it; "
                        "set online.enabled=false")
    if cfg.eval.prompt:
        missing = [t.name for t in cfg.tasks if not any((cfg.store_root() / t.name).glob("expert-*.parquet"))]
        if missing:
            problems.append(f"eval.prompt: the store has no expert demonstrations of {missing} to prompt with, and "
                            "trials must not collect into the shared store; collect them first or set eval.prompt=false")
    return problems


def check_plans(cfg: Config, cluster: Mapping[str, float]) -> TrialPlan:
    """The base trial's plan; ValueError naming the keys when it, or the base with any one checked value of the
    space (``train.num_workers: {choice: [1, 4]}`` changes the plan), does not fit its share of ``cluster``."""
    concurrent, data = cfg.sweep.max_concurrent_trials, base_data(cfg)
    base = plan_trial(cfg, cluster, concurrent)
    for key, dist in cfg.sweep.space.items():
        for value in candidate_values(dist):
            try:
                plan_trial(trial_config(data, {key: value}, cfg.run_dir, cfg.store_root()), cluster, concurrent)
            except ValueError as e:
                raise ValueError(f"sweep.space.{key}={value!r}: {e}") from e
    return base


def tune_space(space: Mapping[str, Mapping[str, list]]) -> dict[str, Any]:
    """``sweep.space`` as Ray Tune's param_space (keys stay dotted)."""
    import ray.tune

    out = {}
    for key, dist in space.items():
        (name, values), = dist.items()
        if name == "choice":
            out[key] = ray.tune.choice(list(values))
        elif name == "grid":
            out[key] = ray.tune.grid_search(list(values))
        else:
            low, high = sweep_bounds(values)
            out[key] = (ray.tune.uniform if name == "uniform" else ray.tune.loguniform)(low, high)
    return out


# ---------------------------------------------------------------------------------------------
# One trial


class ValidationReporter:
    """Reports each snapshot score of a training run to Tune as it lands (``validation_iqm`` at its ``step``),
    from a thread, so that ASHA can stop a lagging trial while its ``fit()`` runs."""

    def __init__(self, cfg: Config):
        self.cfg, self.seen = cfg, set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ValidationReporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        # Lazy: Tune and the snapshot scores (which import gymnasium's rollouts) only in a trial's process.
        import ray.tune

        from mugato_ray.train_eval import read_scores

        while not self.done.wait(POLL_S):
            for record in sorted(read_scores(self.cfg), key=lambda r: r["step"]):
                if record["step"] not in self.seen and record.get("iqm") is not None:
                    self.seen.add(record["step"])
                    ray.tune.report({"validation_iqm": record["iqm"], "step": record["step"]})


def trial_metrics(report: dict, training: dict, final_step: int) -> dict[str, float]:
    """What a trial reports at its end: ``iqm`` and ``score/<task>`` of its evaluation (NaN where there is no
    number), the evaluated snapshot's ``validation_iqm`` (the best, or the latest within ``train.select_margin``
    of it; NaN without snapshots) and the training ``step``."""
    def number(x: Any) -> float:
        return float(x) if x is not None else math.nan

    scores = {f"score/{t}": number(r.get("normalized_score")) for t, r in report["tasks"].items()}
    return {"iqm": number(report.get("iqm_normalized_score")), "validation_iqm": number(training.get("chosen_iqm")),
            "step": final_step, **scores}


def run_trial(params: dict, data: dict, settings: dict) -> None:
    """A Tune function trainable: train one point of the space in its own run directory, evaluate it, report."""
    # Lazy: the trial's stages import torch and gymnasium; the sweep's driver does not need them.
    import ray.tune

    from mugato_ray.config import save_config
    from mugato_ray.evaluate import eval_dir, evaluate, write_eval_metrics, write_report
    from mugato_ray.pipeline import choose_checkpoint
    from mugato_ray.resolve import resolve_tasks
    from mugato_ray.rollout import PolicySpec
    from mugato_ray.train import train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(data, params, Path(settings["sweep_dir"]) / trial_id, settings["store_root"])

    def say(line: str) -> None:
        print(f"sweep trial {trial_id}: {line}", flush=True)

    save_config(cfg)
    resolved = resolve_tasks(cfg)
    plan = plan_trial(cfg, settings["cluster"], cfg.sweep.max_concurrent_trials).plan
    say(f"{params} in {cfg.run_dir}")
    with ValidationReporter(cfg) if settings["asha"] else contextlib.nullcontext():
        result = train(cfg, plan=plan, resolved=resolved)
    checkpoint, training = choose_checkpoint(cfg, result, say)
    report = evaluate(cfg, PolicySpec("model", checkpoint, temperature=cfg.rollout.temperature), log=say,
                      resolved=resolved)
    write_eval_metrics(cfg, report, training.get("chosen_step", result.final_step))
    report["training"] = training
    write_report(report, eval_dir(cfg))
    metrics = trial_metrics(report, training, result.final_step)
    say(f"IQM {metrics['iqm']:.3f}")
    ray.tune.report(metrics)


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepResult:
    rows: list[dict]
    """One row per trial, best first (:func:`result_rows`)."""
    results_file: Path
    """``<run_dir>/sweep/results.csv``."""
    best_file: Path | None
    """``<run_dir>/sweep/best.yaml``: the best trial's config (None when no trial has a number)."""


def run_sweep(cfg: Config, log: Callable[[str], None] = print) -> SweepResult:
    """Run the sweep of ``cfg.sweep`` on a connected Ray (``cli.init_ray``); see the module docstring.

    Raises ConfigError (the space) or ValueError (the resources) naming the keys before Tune starts.
    """
    import ray
    import ray.tune

    problems = sweep_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    cluster = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    plan = check_plans(cfg, cluster)
    s, out = cfg.sweep, sweep_dir(cfg)
    log(f"sweep: {s.num_samples} samples of {sorted(s.space)}, {s.max_concurrent_trials} at a time; each trial "
        f"reserves {plan.reserved_cpus:g} of {plan.share_cpus:g} CPUs; trials under {out}")
    data = base_data(cfg)
    settings = {"sweep_dir": str(out), "store_root": str(cfg.store_root().resolve()), "cluster": cluster,
                "asha": s.scheduler == "asha"}

    def resources(params: dict) -> Any:
        trial = plan_trial(trial_config(data, params, out, settings["store_root"]), cluster, s.max_concurrent_trials)
        # An empty head bundle: the trainable reserves nothing; the second holds the actors it starts itself.
        return ray.tune.PlacementGroupFactory([{}, trial.tune_bundle])

    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, data=data, settings=settings), resources)
    tuner = ray.tune.Tuner(
        trainable,
        param_space=tune_space(s.space),
        tune_config=ray.tune.TuneConfig(num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent_trials,
                                        scheduler=make_scheduler(cfg)),
        run_config=ray.tune.RunConfig(name="tune", storage_path=str(out), verbose=0),
    )
    grid = tuner.fit()
    rows = result_rows(grid, cfg)
    results_file, best_file = write_results(rows, cfg)
    return SweepResult(rows, results_file, best_file)


def make_scheduler(cfg: Config) -> Any:
    """ASHA on the snapshots' validation IQM by training step (``sweep.scheduler: asha``), else None (FIFO)."""
    if cfg.sweep.scheduler != "asha":
        return None
    # Only the sweep's driver builds a scheduler.
    from ray.tune.schedulers import ASHAScheduler

    grace = cfg.sweep.grace_steps or cfg.train.eval_every
    # ASHA stops a trial that reaches max_t: past the last step, so the snapshot of the last step never stops a
    # trial before its final evaluation.
    return ASHAScheduler(time_attr="step", metric="validation_iqm", mode="max", max_t=cfg.train.steps + 1,
                         grace_period=min(grace, cfg.train.steps))


def result_rows(grid: Any, cfg: Config) -> list[dict]:
    """One row per trial of a Tune ResultGrid: ``trial_id``, ``status`` (done, stopped: by the scheduler before
    its evaluation, error), its params, ``iqm``, ``validation_iqm``, ``step``, ``score/<task>``, ``run_dir``;
    sorted by ``sweep.metric``, best first (trials without a number last)."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        done = "iqm" in metrics
        status = "error" if result.error is not None else ("done" if done else "stopped")
        row = {"trial_id": trial_id, "status": status}
        row |= {k: result.config[k] for k in cfg.sweep.space}
        row |= {k: metrics.get(k, math.nan) for k in ("iqm", "validation_iqm", "step")}
        row |= {f"score/{t.name}": metrics.get(f"score/{t.name}", math.nan) for t in cfg.tasks}
        row["run_dir"] = str(sweep_dir(cfg) / trial_id)
        if result.error is not None:
            row["error"] = str(result.error).splitlines()[0][:300]
        rows.append(row)
    return sorted(rows, key=lambda r: _rank_key(r, cfg.sweep.metric))


def _rank_key(row: dict, metric: str) -> tuple[int, float]:
    value = row.get(metric, math.nan)
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    return (0, -value) if ok else (1, 0.0)


def write_results(rows: Sequence[dict], cfg: Config) -> tuple[Path, Path | None]:
    """``results.csv`` (every row, best first) and ``best.yaml`` (a copy of the best trial's config.yaml), both
    atomically under ``<run_dir>/sweep/``; the best file is removed when no trial has a number."""
    out = sweep_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    results = out / RESULTS_FILE

    def write_csv(fh: Any) -> None:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(results, write_csv)
    best_file = out / BEST_FILE
    best = rows[0] if rows and _rank_key(rows[0], cfg.sweep.metric)[0] == 0 else None
    if best is None:
        best_file.unlink(missing_ok=True)
        return results, None
    text = (Path(best["run_dir"]) / "config.yaml").read_text()
    _atomic_write(best_file, lambda fh: fh.write(text))
    return results, best_file


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as fh:
        write(fh)
    os.replace(tmp, path)


def table_lines(rows: Sequence[dict], cfg: Config) -> list[str]:
    """The trials as a text table, best first: rank, trial, status, params, IQM, validation IQM."""
    params = list(cfg.sweep.space)
    header = ["#", "trial", "status", *params, "iqm", "validation_iqm"]

    def fmt(x: Any) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    body = [[str(i + 1), r["trial_id"], r["status"], *(fmt(r[p]) for p in params), fmt(r["iqm"]),
             fmt(r["validation_iqm"])] for i, r in enumerate(rows)]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
