"""Evaluation at scale: a policy's expert-normalized score on every task of a config.

Env tasks: ``eval.episodes`` seeds per task, ``eval.seed_offset + i``, run on a pool of the same
``RolloutActor``s that collect data (``rollout.run_on_pool``), each stepping ``rollout.envs_per_actor``
envs in lockstep with one batched (KV-cached, for the model) ``act`` per step. An episode's result
depends only on its seed, so any number of actors gives the same per-episode results. Episodes run to the
task's own step limit: the reference returns were measured there, and a cap would bias the normalized
score (``rollout.max_episode_steps`` applies to collection only).

Dataset tasks (text, VQA): held-out episodes are generated from the evaluation seeds and the policy
answers each prompt; ``datasets.score_text_answer`` scores the answer exactly, so the mean return is the
accuracy, with references 1.0 (the data's own answers) and 0.0 (random text). The model answers
greedily; "expert" replays the stored answer, "random" draws uniform text ids.

Per task: episodes, mean return with a bootstrap 95% CI, success rate (where the task defines success),
GATO's normalized score ``(score - random) / (expert - random)`` from the resolved task's references
(``references.yaml``, or those imported with the task's data: ``resolve.task_references``; each task's
``reference_origin`` says which), and
extras (failed episodes and their errors, mean length, env steps/s, per-episode results). Across tasks:
the interquartile mean of the normalized scores (Agarwal et al., 2021), as JAT reports per domain.

``write_report`` writes ``eval.json``, ``eval.md`` and ``normalized_scores.png`` under ``<run_dir>/eval/``,
each atomically (temp file + rename), and, when the report has a "training" section, ``loss_curves.png``
(per-task training losses by step) and ``score_curves.png`` (the snapshots' scores during training).
``write_eval_metrics`` adds the scores to the run's ``eval`` metrics (``eval/...``, ``mugato_ray.metric_log``).

Watching the agent: with ``eval.video_episodes: K`` the rollout actors render the first K episodes (the K
lowest evaluation seeds) of each env task to ``<run_dir>/eval/videos/<task>/seed-<s>.mp4`` (GIF where no MP4
encoder is installed; ``mugato_ray.video``), and eval.md links them. eval.md also shows the first items of each
text and VQA task: prompt, answer and reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mugato_ray.checkpoints import TOKENIZER_FILE, checkpoint_layout, find_model_file, saved_config_file
from mugato_ray.collect import collect
from mugato_ray.config import Config, TaskEntry, load_config
from mugato_ray.console import eta
from mugato_ray.datasets import generate_episodes, problem_type, prompt_and_answer, resolve, score_text_answer
from mugato_ray.episodes import store_dir
from mugato_ray.metric_log import open_metric_log, score_metrics
from mugato_ray.metrics import bootstrap_ci, iqm, normalized_score
from mugato_ray.resolve import ResolvedTask, resolve_tasks, task_spec
from mugato_ray.rollout import FaultInjection, PolicySpec, RolloutResult, run_on_pool, split_seeds
from mugato_ray.sequence import make_layout
from mugato_ray.tokenizer import Modality, decode_text, encode_text, make_text_tokenizer
from mugato_ray.video import VideoRequest, encoder_note, remove_videos, task_folder_name, video_format

if TYPE_CHECKING:
    from mugato_ray.tasks import TaskInfo

DATASET_REFERENCES = (1.0, 0.0)
"""(expert, random) accuracy of a scorable dataset task: its answers are right by construction; random text is not."""

SOURCES = {"expert": "expert", "random": "random", "model": "policy"}
"""The episodes' source column (episodes.SOURCES) for each policy kind, as in collection."""



class EvaluationError(RuntimeError):
    """An evaluation could not produce a number for a task; the message names the task and the cause."""


# ------------------------------------------------------------------------------------------- seeds


def eval_seeds(cfg: Config) -> list[int]:
    """The evaluation seeds of every task: ``eval.seed_offset + i`` for ``i < eval.episodes``."""
    return [cfg.eval.seed_offset + i for i in range(cfg.eval.episodes)]


def held_out_seeds(cfg: Config, n: int, seed_offset: int | None = None) -> list[int]:
    """``n`` evaluation seeds from ``seed_offset`` (default ``eval.seed_offset``), for a tool that picks its own
    number of episodes; ValueError (from :func:`check_seeds_disjoint`) when they overlap collection seeds."""
    offset = cfg.eval.seed_offset if seed_offset is None else seed_offset
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes=n, seed_offset=offset))
    check_seeds_disjoint(cfg)
    return eval_seeds(cfg)


def check_seeds_disjoint(cfg: Config) -> None:
    """Evaluation seeds must not be collection seeds (``rollout.seed + i``): a policy is scored on held-out episodes.

    Raises ValueError naming both ranges and the keys that set them.
    """
    n_collect = max((t.episodes for t in cfg.tasks), default=0)
    ranges = {
        "collection seeds (rollout.seed, tasks[].episodes)": (cfg.rollout.seed, cfg.rollout.seed + n_collect),
        "evaluation seeds (eval.seed_offset, eval.episodes)": (cfg.eval.seed_offset,
                                                               cfg.eval.seed_offset + cfg.eval.episodes),
    }
    if cfg.train.eval_every > 0:
        lo = cfg.eval.validation_seed_offset
        ranges["validation seeds (eval.validation_seed_offset, train.eval_episodes)"] = (lo, lo + cfg.train.eval_episodes)
    items = list(ranges.items())
    for i, (a, (a_lo, a_hi)) in enumerate(items):  # [lo, hi) ranges
        for b, (b_lo, b_hi) in items[i + 1:]:
            if a_lo < b_hi and b_lo < a_hi:
                raise ValueError(f"{b} [{b_lo}, {b_hi}) overlap the {a} [{a_lo}, {a_hi}); move the offset past "
                                 f"{a_hi - 1}")


# ------------------------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A model file, a training checkpoint directory (``model.pt``) or an export directory (``model.safetensors``,
    ``mugato_ray.export``) -> the model file."""
    return find_model_file(path)


def checkpoint_config(cfg: Config, model_file: Path, log: Callable[[str], None] = print) -> Config:
    """``cfg`` with the tokenizer section the model was trained with, when its checkpoint holds the run's config
    (``config.yaml``, or an export's ``config.json``); a BPE tokenizer is read from the checkpoint's own copy
    (``tokenizer.json``), so a checkpoint evaluates after the original BPE file is gone.

    Observations must become the ids the model learned; the evaluated config may describe another run.
    """
    saved = saved_config_file(model_file.parent)
    if saved is None:
        return cfg
    tokenizer = load_config(saved).tokenizer
    own = model_file.parent / TOKENIZER_FILE
    if tokenizer.text == "bpe" and own.is_file():
        tokenizer = dataclasses.replace(tokenizer, bpe_path=str(own))
    if tokenizer != cfg.tokenizer:
        log(f"evaluate: using the tokenizer section of {saved} (the model was trained with it)")
    return dataclasses.replace(cfg, tokenizer=tokenizer)


def policy_label(policy: PolicySpec) -> str:
    """The report's "checkpoint" field: the model file, or "policy:expert" / "policy:random"."""
    return str(policy.checkpoint) if policy.kind == "model" else f"policy:{policy.kind}"


# ------------------------------------------------------------------------------------------- the job


def evaluate(cfg: Config, policy: PolicySpec, *, log: Callable[[str], None] = print,
             faults: FaultInjection | None = None, resolved: Mapping[str, ResolvedTask] | None = None) -> dict:
    """Evaluate ``policy`` on every task of ``cfg.tasks``; returns the report (the eval.json dict). Needs Ray.

    A model checkpoint may be a file or a checkpoint directory. ``cfg.eval.prompt`` prompts the model with a
    successful expert demonstration from the store (collected first if the store has none). ``resolved``:
    the run's tasks (default: resolved here, under the tokenizer the checkpoint was trained with).
    """
    t0, given = time.perf_counter(), cfg
    check_seeds_disjoint(cfg)
    if policy.kind == "model":
        model_file = resolve_checkpoint(policy.checkpoint)
        cfg = checkpoint_config(cfg, model_file, log)
        policy = dataclasses.replace(policy, checkpoint=str(model_file))
    # Evaluation runs to each task's own limit, where the references were measured (module doc).
    if cfg.rollout.max_episode_steps is not None:
        log(f"evaluate: episodes run to each task's own step limit; rollout.max_episode_steps="
            f"{cfg.rollout.max_episode_steps} applies to collection only")
    run_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_episode_steps=None))
    if resolved is None or cfg.tokenizer != given.tokenizer:  # the model's tokenizer decides the specs
        resolved = resolve_tasks(cfg)
    tasks, skipped = {}, {}
    for entry in cfg.tasks:
        task = resolved[entry.name]
        reason = _skip_reason(task.info, policy)
        if reason is not None:
            skipped[entry.name] = reason
            log(f"eval {entry.name}: skipped ({reason})")
            continue
        if task.info.has_env:
            prompted = policy.kind == "model" and cfg.eval.prompt and ensure_demonstration(run_cfg, task.info, log)
            task_policy = dataclasses.replace(policy, prompt=bool(prompted))
            tasks[entry.name] = _evaluate_env_task(run_cfg, task, task_policy, faults, log)
            tasks[entry.name]["prompted"] = bool(prompted)
        else:
            tasks[entry.name] = _evaluate_dataset_task(run_cfg, task, policy, log)
        tasks[entry.name]["reference_origin"] = reference_origin(task)
        temperature = run_cfg.task_temperature(entry.name, policy.temperature) if policy.kind == "model" else None
        tasks[entry.name]["temperature"] = temperature
        # How a greedy model picked a continuous action's bin (rollout.continuous_actions); None otherwise.
        continuous = task.spec.action[0].modality is Modality.CONTINUOUS
        tasks[entry.name]["continuous_actions"] = (run_cfg.rollout.continuous_actions
                                                   if temperature == 0 and continuous else None)
    scores = [t["normalized_score"] for t in tasks.values()]
    return {
        "checkpoint": policy_label(policy),
        "tasks": tasks,
        "iqm_normalized_score": iqm(scores),
        "policy": {"kind": policy.kind, "temperature": policy.temperature, "prompt": bool(cfg.eval.prompt)},
        "seeds": {"offset": cfg.eval.seed_offset, "episodes": cfg.eval.episodes},
        "video_episodes": cfg.eval.video_episodes,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
    }


def _skip_reason(info: Any, policy: PolicySpec) -> str | None:
    if info.has_env:
        if policy.kind == "expert" and info.expert == "none":
            return "the task has no expert"
        return None
    if not resolve(info.name).scorable:
        return f"dataset {info.dataset!r} has no exact answers to score"
    return None


def ensure_demonstration(cfg: Config, info: TaskInfo, log: Callable[[str], None] = print) -> bool:
    """Make sure the store holds expert episodes of a task to prompt with; collect a few if it holds none.

    They come from collection seeds (``rollout.seed + i``), never from evaluation seeds. Returns False (and
    says so) when the store has none and the task has no expert to collect them: the task is then evaluated
    without a prompt, and its report entry says ``"prompted": false``.
    """
    folder = store_dir(cfg, info.name)
    if folder.is_dir() and any(folder.glob("expert-*.parquet")):
        return True
    if info.expert == "none":
        log(f"eval {info.name}: no expert demonstration in {folder} and no expert to collect one; not prompted")
        return False
    n = max(4, cfg.rollout.envs_per_actor)
    log(f"eval {info.name}: no expert demonstration in {folder}; collecting {n} expert episodes to prompt with")
    collect(dataclasses.replace(cfg, tasks=[TaskEntry(info.name, episodes=n)]), log=log)
    return True


# ------------------------------------------------------------------------------------------- env tasks


def _evaluate_env_task(cfg: Config, resolved: ResolvedTask, policy: PolicySpec, faults: FaultInjection | None,
                       log: Callable[[str], None]) -> dict:
    """``eval.episodes`` episodes on the actor pool. The actors get the resolved task itself, so a task
    registered in this process only (``resolve.register_task``) runs too."""
    t0, task = time.perf_counter(), resolved.name
    seeds = eval_seeds(cfg)
    outcomes, failed, steps, videos, video_errors = [], [], [0], [], []
    request = prepare_videos(cfg, task)

    def on_result(chunk: list[int], result: RolloutResult) -> None:
        outcomes.extend(result.outcomes)
        failed.extend(result.failed)
        steps[0] += result.env_steps
        videos.extend(result.videos)
        video_errors.extend(result.video_errors)
        _progress(log, task, outcomes, failed, len(seeds), steps[0], time.perf_counter() - t0)

    def on_error(chunk: list[int], err: Exception) -> None:
        # A call whose actor died past its restarts (an env that kills its process, a checkpoint the actor
        # cannot load) loses its episodes, counted as failed; the pool replaced the actor and goes on.
        # Any other error is a bug and stops the evaluation.
        import ray

        if not isinstance(err, ray.exceptions.RayActorError):
            raise err
        failed.extend({"seed": s, "error": f"{type(err).__name__}: {err}"} for s in chunk)
        _progress(log, task, outcomes, failed, len(seeds), steps[0], time.perf_counter() - t0)

    run_on_pool(resolved, policy, cfg, split_seeds(seeds, cfg.rollout.num_actors, cfg.rollout.envs_per_actor),
                on_result, sample_kwargs={"source": SOURCES[policy.kind], "return_episodes": False,
                                          "video_request": request}, faults=faults, on_error=on_error, log=log)
    summary = summarize_task(cfg, task, outcomes, failed, steps[0], time.perf_counter() - t0, resolved.references)
    if request is not None:
        summary.update(video_entries(cfg, task, request, videos, video_errors, log))
    return summary


def video_dir(cfg: Config, task: str) -> Path:
    """``<run_dir>/eval/videos/<task>``, the task's name made one path component (``ALE/Pong-v5`` -> ``ALE_Pong-v5``)."""
    return eval_dir(cfg) / "videos" / task_folder_name(task)


def prepare_videos(cfg: Config, task: str) -> VideoRequest | None:
    """The videos an evaluation of ``task`` records: its ``eval.video_episodes`` lowest evaluation seeds, whichever
    actor runs them (None: none). Videos of earlier evaluations in the folder are removed first, so the folder
    holds what this evaluation's report lists."""
    k = cfg.eval.video_episodes
    if k == 0:
        return None
    folder = video_dir(cfg, task)
    remove_videos(folder)
    return VideoRequest(str(folder), tuple(eval_seeds(cfg)[:k]), video_format())


def video_entries(cfg: Config, task: str, request: VideoRequest, videos: Sequence[dict], errors: Sequence[dict],
                  log: Callable[[str], None]) -> dict:
    """A task's ``videos`` (``{"seed", "file"`` relative to eval/, ``"format", "frames", "fps", "shape"}``, by
    seed) and ``video_errors`` (``"seed <s>: <why>"``) for its report entry.

    Every file is checked from the driver: actors on other nodes write to ``run_dir``, which must then be
    storage every node reads; a video the driver cannot see is an error, not a broken link."""
    remove_videos(request.folder, finished=False)  # the pool is gone: a temporary file left is a dead actor's
    base, listed, problems = eval_dir(cfg), [], [f"seed {e['seed']}: {e['error']}" for e in errors]
    for v in sorted(videos, key=lambda v: v["seed"]):
        rel = (Path(request.folder) / Path(v["file"]).name).relative_to(base).as_posix()
        if (base / rel).is_file():
            listed.append({**v, "file": rel})
        else:
            problems.append(f"seed {v['seed']}: {v['file']} was written by an actor but is not visible here "
                            "(on a cluster, run_dir must be on storage every node can read)")
    note = encoder_note(listed[0]["format"]) if listed else None
    log(f"eval {task}: {len(listed)} of {len(request.seeds)} videos in {request.folder}" + (f"; {note}" if note else ""))
    for problem in sorted(problems):
        log(f"eval {task}: no video of {problem}")
    return {"videos": listed, "video_errors": sorted(problems)}


def _progress(log, task, outcomes, failed, total, steps, seconds, unit="env steps") -> None:
    mean = f"{np.mean([o['return'] for o in outcomes]):.3f}" if outcomes else "n/a"
    done = len(outcomes) + len(failed)
    left = eta(done, total, seconds)
    log(f"eval {task}: {done}/{total} episodes (failed {len(failed)}), "
        f"mean return {mean}, {steps / max(seconds, 1e-9):.1f} {unit}/s" + (f", {left}" if left else ""))


def summarize_task(cfg: Config, task: str, outcomes: Sequence[dict], failed: Sequence[dict], env_steps: int,
                   seconds: float, references: tuple[float | None, float | None]) -> dict:
    """One task's entry of the report from per-episode outcomes ``{"seed", "return", "length", "success"}``
    and the task's ``(expert, random)`` references.

    Raises EvaluationError when no episode finished (there is no number to report).
    """
    outcomes = sorted(outcomes, key=lambda o: o["seed"])
    if not outcomes:
        first = failed[0]["error"] if failed else "no episodes were run"
        raise EvaluationError(f"eval {task}: none of {len(failed)} episodes finished; first error: {first}")
    returns = np.asarray([o["return"] for o in outcomes], np.float64)
    expert, random = references
    mean = float(returns.mean())
    lo, hi = bootstrap_ci(returns, samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    norm_ci = [normalized_score(b, expert, random) for b in (lo, hi)]
    successes = [o["success"] for o in outcomes if o["success"] is not None]
    return {
        "episodes": len(outcomes),
        "mean_return": mean,
        "ci95": [lo, hi],
        "success_rate": float(np.mean(successes)) if successes else None,
        "normalized_score": normalized_score(mean, expert, random),
        "expert_return": expert,
        "random_return": random,
        "normalized_ci95": None if None in norm_ci else sorted(norm_ci),
        "failed": len(failed),
        "errors": [f"seed {f['seed']}: {f['error']}" for f in failed],
        "mean_length": float(np.mean([o["length"] for o in outcomes])),
        "env_steps": int(env_steps),
        "env_steps_per_s": env_steps / seconds if seconds > 0 else None,
        "seconds": seconds,
        **({"by_type": by_type} if (by_type := exact_by_type(outcomes)) else {}),
        "per_episode": outcomes,
    }


def exact_by_type(outcomes: Sequence[dict]) -> dict[str, dict]:
    """Per problem type of a dataset task's outcomes (their ``"type"``): ``{type: {"items", "right", "exact"}}``,
    types in name order; empty when the outcomes carry no type (environment tasks, untyped datasets)."""
    out: dict[str, dict] = {}
    for o in outcomes:
        if "type" in o:
            t = out.setdefault(o["type"], {"items": 0, "right": 0})
            t["items"] += 1
            t["right"] += int(bool(o["success"]))
    return {k: {**v, "exact": v["right"] / v["items"]} for k, v in sorted(out.items())}


def by_type_text(by_type: dict[str, dict]) -> str:
    """``"addition 2 of 37 (0.05), reversal 24 of 27 (0.89)"``."""
    return ", ".join(f"{k} {v['right']} of {v['items']} ({v['exact']:.2f})" for k, v in by_type.items())


# ------------------------------------------------------------------------------------------- dataset tasks


def _evaluate_dataset_task(cfg: Config, resolved: ResolvedTask, policy: PolicySpec,
                           log: Callable[[str], None]) -> dict:
    """Answers for held-out prompts, scored exactly, in Ray tasks of ``rollout.actor_cpus`` each (one per chunk)."""
    import ray

    t0, task = time.perf_counter(), resolved.name
    seeds = eval_seeds(cfg)
    chunks = split_seeds(seeds, cfg.rollout.num_actors, cfg.rollout.envs_per_actor)
    score = ray.remote(score_dataset_chunk).options(num_cpus=cfg.rollout.actor_cpus)
    refs = [score.remote(cfg, resolved.name, policy, chunk) for chunk in chunks]
    outcomes, failed = [], []
    while refs:
        (ref,), refs = ray.wait(refs, num_returns=1)
        outcomes.extend(ray.get(ref))
        _progress(log, task, outcomes, failed, len(seeds), len(outcomes), time.perf_counter() - t0, "answers")
    return summarize_task(cfg, task, outcomes, failed, len(outcomes), time.perf_counter() - t0,
                          dataset_references(resolved))


def reference_origin(task: ResolvedTask) -> str | None:
    """Where the task's report normalizes from: ``task.reference_origin`` ("references.yaml", or the data the
    references were imported with), or for a scorable dataset task without measured references its answers."""
    if task.reference_origin is None and not task.info.has_env:
        return "exact answers (1.0 right, 0.0 random)"
    return task.reference_origin


def dataset_references(task: ResolvedTask) -> tuple[float, float]:
    """A dataset task's (expert, random) accuracy: the measured references, else ``DATASET_REFERENCES``."""
    expert, random = task.references
    return (DATASET_REFERENCES[0] if expert is None else expert, DATASET_REFERENCES[1] if random is None else random)


def score_dataset_chunk(cfg: Config, task: str, policy: PolicySpec, seeds: Sequence[int]) -> list[dict]:
    """Generate the held-out episodes of ``seeds``, answer every prompt with ``policy``, score each exactly.

    Returns one outcome per seed: ``{"seed", "return" (1.0 right / 0.0 wrong), "length": 1, "success",
    "prompt", "answer", "expected"}`` (a VQA prompt is the question; the image is not repeated). Consecutive
    seeds are generated in one call (an episode depends on its seed only).
    """
    seeds = [int(s) for s in seeds]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"score_dataset_chunk({task!r}): seeds must be consecutive, got {seeds}")
    model, layout = None, None
    if policy.kind == "model":
        from mugato_ray.model import load_model  # lazy: torch stays out of the driver

        model = load_model(policy.checkpoint).eval()
        # Dataset texts fill the model's own window (a text episode is one step of model.context tokens).
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, context=model.cfg.context))
        layout = checkpoint_layout(policy.checkpoint, task, task_spec(task, cfg))
    episodes = generate_episodes(task, len(seeds), seeds[0], cfg)
    pairs = [prompt_and_answer(task, ep) for ep in episodes]
    if policy.kind == "expert":
        answers = [a for _, a in pairs]
    else:
        tok = make_text_tokenizer(cfg.tokenizer)
        answers = generate_answers(task, cfg, episodes, [p for p, _ in pairs], tok, model=model, layout=layout,
                                   max_new=[len(tok.encode(a)) + 2 for _, a in pairs],
                                   temperature=cfg.task_temperature(task, policy.temperature))
    out = []
    for ep, (prompt, expected), answer in zip(episodes, pairs, answers):
        ok = score_text_answer(task, prompt, answer, expected)
        kind = problem_type(task, prompt)
        out.append({"seed": ep.seed, "return": float(ok), "length": 1, "success": ok,
                    "prompt": prompt, "answer": answer, "expected": expected, **({"type": kind} if kind else {})})
    return out


def generate_answers(task: str, cfg: Config, episodes: Sequence[Any], prompts: Sequence[str], text_tokenizer: Any,
                     *, model: Any = None, max_new: Sequence[int], layout: Any = None,
                     temperature: float = 0.0) -> list[str]:
    """Text completions of B prompts: by ``model`` through the acting policy (``ModelPolicy.answer``: the same
    KV cache and token loop as environment actions), or uniform legal ids (seeded by episode) without one.

    Text tasks: the prompt is the start of the one text field and generation continues it. VQA: the image
    and question are the observation of one step, then the separator; the answer is generated into the
    action field. ``layout``: the model's layout of the task (default: the task resolved under ``cfg``).
    """
    spec = task_spec(task, cfg)
    layout = layout if layout is not None else make_layout(task, spec, cfg.model.context)  # a text task's one step
    vocab, act = spec.vocab, layout.fields[-1]
    if spec.observation:  # VQA: the answer field is generated after the observation and separator
        first = episodes[0].observations
        obs = {k: [ep.observations[k][0] for ep in episodes] if isinstance(v, list)
               else np.concatenate([ep.observations[k] for ep in episodes]) for k, v in first.items()}
        prefixes = [[] for _ in episodes]
    else:  # text: the prompt is the start of the text field itself
        ids_BxT = encode_text(prompts, text_tokenizer, vocab, act.tokens)
        obs, prefixes = {}, [row[row != vocab.pad] for row in ids_BxT]
    if model is None:
        ids = _random_answers(vocab, episodes, [len(p) for p in prefixes], max_new, act.tokens)
    else:
        from mugato_ray.policy import ModelPolicy  # lazy: torch stays out of the driver

        policy = ModelPolicy(model, spec, layout, text_tokenizer, len(episodes), temperature=temperature)
        ids = policy.answer(obs, prefixes, max_new, seeds=[int(ep.seed) for ep in episodes])
    return [decode_text(x, text_tokenizer, vocab) for x in ids]


def _random_answers(vocab: Any, episodes: Sequence[Any], lengths: Sequence[int], max_new: Sequence[int],
                    field_tokens: int) -> list[np.ndarray]:
    """Uniform text ids or eos, as many as each answer may have, drawn from each episode's seed."""
    legal_ids = np.concatenate([np.arange(vocab.text_size), [vocab.eos]])
    out = []
    for ep, length, budget in zip(episodes, lengths, max_new):
        rng = np.random.default_rng(int(ep.seed))
        out.append(rng.choice(legal_ids, size=int(min(budget, field_tokens - length))))
    return out


# ------------------------------------------------------------------------------------------- reports


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Write via a temp file in the same folder and rename: a reader never sees a partial report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown_report(report: dict) -> str:
    """eval.md: one row per task, the IQM, and the skipped tasks with their reasons."""
    lines = [
        f"# Evaluation of `{report['checkpoint']}`",
        "",
        f"Seeds {report['seeds']['offset']}..{report['seeds']['offset'] + report['seeds']['episodes'] - 1} per task; "
        f"normalized score = (return - random) / (expert - random).",
        *acting_lines(report),
        "",
        "| task | episodes | mean return | 95% CI | success | normalized | normalized 95% CI | expert | random "
        "| failed | mean length | env steps/s |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in report["tasks"].items():
        nci = t.get("normalized_ci95")
        lines.append(
            f"| {name} | {t['episodes']} | {_fmt(t['mean_return'])} | [{_fmt(t['ci95'][0])}, {_fmt(t['ci95'][1])}] "
            f"| {_fmt(t['success_rate'], 2)} | {_fmt(t['normalized_score'])} "
            f"| {'n/a' if nci is None else f'[{_fmt(nci[0])}, {_fmt(nci[1])}]'} | {_fmt(t['expert_return'])} "
            f"| {_fmt(t['random_return'])} | {t.get('failed', 0)} | {_fmt(t.get('mean_length'), 1)} "
            f"| {_fmt(t.get('env_steps_per_s'), 0)} |"
        )
    lines += ["", f"IQM of normalized scores: {_fmt(report['iqm_normalized_score'])}"]
    lines += reference_lines(report)
    if report.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
    errors = [(k, e) for k, t in report["tasks"].items() for e in t.get("errors", [])]
    if errors:
        lines += ["", "Failed episodes:", ""] + [f"- {k}: {e}" for k, e in errors]
    if report.get("skipped_store_files"):
        lines += ["", "Store files and rows left out of training (data.on_bad_file: skip):", ""]
        lines += [f"- {task}: `{f}`: {why}" for task, bad in report["skipped_store_files"].items() for f, why in bad]
    lines += video_lines(report) + answer_lines(report)
    if report.get("training"):
        lines += training_lines(report["training"])
    if report.get("online"):
        lines += online_lines(report["online"])
    return "\n".join(lines) + "\n"


def acting_lines(report: dict) -> list[str]:
    """How the model chose its actions on each task: greedily, or sampled at a temperature (``tasks[].temperature``,
    else ``rollout.temperature``)."""
    temps = {name: t.get("temperature") for name, t in report["tasks"].items() if t.get("temperature") is not None}
    if not temps:
        return []
    sampled = {name: x for name, x in temps.items() if x > 0}
    if not sampled:
        lines = ["", "The model acted greedily on every task."]
    else:
        parts = [f"{md_text(name, 80)} at temperature {x:g}" for name, x in sampled.items()]
        rest = " and greedily on the others" if len(sampled) < len(temps) else ""
        lines = ["", f"The model's actions were sampled on {', '.join(parts)}{rest}."]
    decoded = {name: t["continuous_actions"] for name, t in report["tasks"].items() if t.get("continuous_actions")}
    how = {"mean": "the value bin nearest the expected value of the model's distribution",
           "argmax": "the most likely value bin"}
    for mode in sorted(set(decoded.values())):
        names = ", ".join(md_text(name, 80) for name, m in decoded.items() if m == mode)
        lines.append(f"Greedy continuous actions ({names}) took {how[mode]} (`rollout.continuous_actions: {mode}`).")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def video_lines(report: dict) -> list[str]:
    """eval.md's "Videos" section: links (relative to eval/) to each env task's recorded episodes."""
    tasks = {name: t for name, t in report["tasks"].items() if "videos" in t}
    if not tasks:
        return []
    formats = sorted({v["format"] for t in tasks.values() for v in t["videos"]})
    k = report.get("video_episodes")
    lines = ["", "## Videos", "", f"The first {_count(k, 'evaluation episode')} of each environment task, as the env "
             f"renders them at its own frame rate ({', '.join(f.upper() for f in formats) or 'none written'}).", ""]
    lines += [f"{note[0].upper()}{note[1:]}.\n" for note in filter(None, map(encoder_note, formats))]
    lines += ["| task | videos |", "| --- | --- |"]
    for name, t in tasks.items():
        results = {o["seed"]: o for o in t.get("per_episode", [])}
        links = [f"[seed {v['seed']}]({v['file']}) (return {_fmt(results.get(v['seed'], {}).get('return'))}, "
                 f"{v['frames']} frames)" for v in t["videos"]]
        lines.append(f"| {md_text(name, 80)} | {', '.join(links) or 'none'} |")
    errors = [(name, e) for name, t in tasks.items() for e in t.get("video_errors", [])]
    if errors:
        lines += ["", "Not recorded:", ""] + [f"- {md_text(name, 80)}: {md_text(e, 300)}" for name, e in errors]
    return lines


ANSWERS_SHOWN = 5
"""Items of each text and VQA task shown in eval.md when ``eval.video_episodes`` is 0."""
TEXT_SHOWN = 160
"""Characters of a prompt (its end), an answer or a reference (their start) shown in eval.md."""


def answer_lines(report: dict) -> list[str]:
    """eval.md's "Answers" section: the first items of each text and VQA task, prompt, answer and reference."""
    n = report.get("video_episodes") or ANSWERS_SHOWN
    tasks = {name: t for name, t in report["tasks"].items()
             if any("answer" in o for o in t.get("per_episode", []))}
    if not tasks:
        return []
    lines = ["", "## Answers", "", f"The first {_count(n, 'evaluation item')} of each text and VQA task: the prompt (its last "
             f"{TEXT_SHOWN} characters; a VQA prompt is the question, its image not shown), the policy's answer and "
             "the reference. Scored: the answer's first line against the reference."]
    for name, t in tasks.items():
        lines += ["", f"### {md_text(name, 80)}", ""]
        if t.get("by_type"):
            lines += [f"Exact by problem type, over all {t['episodes']} items: "
                      f"{md_text(by_type_text(t['by_type']), 400)}.", ""]
        lines += ["| seed | prompt | answer | reference | right |",
                  "| ---: | --- | --- | --- | :---: |"]
        for o in t["per_episode"][:n]:
            lines.append(f"| {o['seed']} | {md_text(o.get('prompt', ''), TEXT_SHOWN, tail=True)} "
                         f"| {md_text(o['answer'], TEXT_SHOWN)} | {md_text(o['expected'], TEXT_SHOWN)} "
                         f"| {'yes' if o['success'] else 'no'} |")
    return lines


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")
"""Characters with a meaning inside a Markdown line or table cell (``$``: GitHub's math); HTML is done apart."""


def md_text(text: str, limit: int, tail: bool = False) -> str:
    """``text`` as literal Markdown inline text (a table cell, a list item): at most ``limit`` characters (its
    start, or with ``tail`` its end, an ellipsis marking the cut); characters that are not printable (newlines,
    control bytes a random policy emits) written as Python escapes; HTML and Markdown syntax escaped; the empty
    string shown as *(empty)*."""
    if text == "":
        return "*(empty)*"
    if len(text) > limit:
        text = "…" + text[len(text) - limit:] if tail else text[:limit] + "…"
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return re.sub(r"^ | $| (?= )", "&nbsp;", text)  # spaces that Markdown would trim or collapse, kept


def reference_lines(report: dict) -> list[str]:
    """eval.md's list of where each task's expert and random references came from."""
    by_origin: dict[str, list[str]] = {}
    for name, t in report["tasks"].items():
        by_origin.setdefault(t.get("reference_origin") or "none (no normalized score)", []).append(name)
    if not by_origin:
        return []
    return ["", "Reference returns (expert, random) from:", ""] + [
        f"- {origin}: {', '.join(names)}" for origin, names in by_origin.items()]


def online_lines(online: dict) -> list[str]:
    """eval.md's "Online experience" section: what the online actors stored and training read, per task."""
    lines = ["", "## Online experience", "", f"{online['rounds']} rounds; failed episodes: {online['failed_episodes']}; "
             f"files removed by the retention bound: {online['deleted_files']}.", "",
             "| task | online episodes stored | still in the store | their mean return | weight steps "
             "| online rows read by training |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for task, n in online["episodes"].items():
        steps = online["weight_steps"].get(task, [])
        kept = online.get("kept", {}).get(task, n)
        lines.append(f"| {task} | {n} | {kept} | {_fmt(online['mean_return'].get(task))} | "
                     f"{', '.join(map(str, steps[:12]))}{' ...' if len(steps) > 12 else ''} | "
                     f"{online['online_rows_read'].get(task, 0)} |")
    lines += [f"- error: {e}" for e in online.get("errors", [])]
    return lines


def training_lines(training: dict) -> list[str]:
    """eval.md's "Training" section: the loss curves, then the snapshot scores by step and which was chosen."""
    lines = ["", "## Training", ""]
    if training.get("history"):
        lines += ["Training loss per task (from `metrics/train.csv`):", "", "![loss curves](loss_curves.png)", ""]
    evals = training.get("evaluations", [])
    if not evals:
        return lines
    tasks = sorted({t for r in evals for t in r["tasks"]})
    lines += ["### Evaluations during training", "", "![score curves](score_curves.png)", ""]
    if training.get("chosen_step") is not None:
        margin = training.get("select_margin") or 0
        rule = f"the latest within {margin:g} of the best IQM" if margin > 0 else "the best IQM"
        lines += [f"Evaluated above: the snapshot of step {training['chosen_step']} (IQM "
                  f"{_fmt(training.get('chosen_iqm'))}), {rule} of {len(evals)} snapshots scored on "
                  f"{training.get('episodes', '?')} validation episodes per task (seeds disjoint from the ones above).", ""]
    lines += ["| step | IQM | " + " | ".join(tasks) + " |", "| ---: | ---: |" + " ---: |" * len(tasks)]
    for r in evals:
        cells = [_fmt(r["tasks"].get(t, {}).get("normalized")) for t in tasks]
        lines.append(f"| {r['step']} | {_fmt(r['iqm'])} | " + " | ".join(cells) + " |")
    return lines


def _save_figure(draw: Callable[[Any], None], fh: Any, figsize: tuple[float, float] = (6.0, 3.6)) -> None:
    """One axes drawn by ``draw(ax)``, saved as PNG into the open file ``fh``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)


def plot_losses(history: Sequence[dict], fh: Any) -> None:
    """Training loss per task (``loss/<task>``) and overall (``loss``) against the step (PNG)."""

    def draw(ax: Any) -> None:
        for key in sorted({k for h in history for k in h if k.startswith("loss/")}):
            pts = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*pts), label=key[5:])
        pts = [(h["step"], h["loss"]) for h in history if "loss" in h and math.isfinite(h["loss"])]
        if pts:
            ax.plot(*zip(*pts), color="black", lw=2, label="mean")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")

    _save_figure(draw, fh)


def plot_score_curves(training: dict, fh: Any) -> None:
    """The snapshots' normalized scores per task and their IQM against the step (PNG)."""
    evals = training.get("evaluations", [])

    def draw(ax: Any) -> None:
        for task in sorted({t for r in evals for t in r["tasks"]}):
            pts = [(r["step"], r["tasks"][task]["normalized"]) for r in evals
                   if task in r["tasks"] and r["tasks"][task]["normalized"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=task)
        pts = [(r["step"], r["iqm"]) for r in evals if r["iqm"] is not None]
        if pts:
            ax.plot(*zip(*pts), color="black", lw=2, label="IQM")
        if training.get("chosen_step") is not None:
            ax.axvline(training["chosen_step"], color="gray", ls=":", lw=1)
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("normalized score (validation seeds)")

    _save_figure(draw, fh)


def summary_lines(report: dict) -> list[str]:
    """The console table of a report: one line per task, the skipped tasks, the IQM."""
    lines = [f"{'task':<28} {'episodes':>8} {'mean return':>11} {'95% CI':>21} {'success':>7} {'normalized':>10}"]
    for name, t in report["tasks"].items():
        ci = f"[{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}]"
        lines.append(
            f"{name:<28} {t['episodes']:>8} {t['mean_return']:>11.3f} {ci:>21} "
            f"{_fmt(t['success_rate'], 2):>7} {_fmt(t['normalized_score']):>10}"
        )
    lines += [f"{name:<28} by problem type: {by_type_text(t['by_type'])}"
              for name, t in report["tasks"].items() if t.get("by_type")]
    lines += [f"{name:<28} skipped: {reason}" for name, reason in report.get("skipped", {}).items()]
    lines.append(f"IQM normalized score: {_fmt(report['iqm_normalized_score'])}")
    return lines


def plot_scores(report: dict, fh: Any) -> None:
    """A bar chart of normalized scores with their 95% CI as error bars (PNG into the open file ``fh``)."""
    import matplotlib.pyplot as plt

    fig = score_figure(report)
    try:
        fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)


def score_figure(report: dict) -> Any:
    """The figure of :func:`plot_scores` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    rows = [(k, t) for k, t in report["tasks"].items() if t["normalized_score"] is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.5), layout="constrained")
    if rows:
        names = [k for k, _ in rows]
        score = np.asarray([t["normalized_score"] for _, t in rows])
        ci = np.asarray([t.get("normalized_ci95") or [s, s] for (_, t), s in zip(rows, score)])
        err = np.stack([score - ci[:, 0], ci[:, 1] - score]).clip(min=0)
        ax.bar(names, score, yerr=err, capsize=4, color="tab:blue")
        ax.tick_params(axis="x", labelrotation=30)
    else:
        ax.text(0.5, 0.5, "no task has reference returns", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("normalized score (expert = 1)")
    ax.set_title(score_title(report), fontsize=9, wrap=True)
    return fig


def score_title(report: dict) -> str:
    """The score chart's title: the IQM first, then the policy (a checkpoint as its last two path parts: the
    whole path is in eval.md, and at the top of a narrow chart it pushed the IQM out of the picture)."""
    label = report["checkpoint"]
    if "/" in label:
        label = "/".join(Path(label).parts[-2:])
    return f"IQM normalized score {_fmt(report['iqm_normalized_score'])}\n{label}"


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """eval.json, eval.md and normalized_scores.png under ``out_dir``, each written atomically; with a
    "training" section also loss_curves.png (when it has a loss history) and score_curves.png (when it has
    evaluations during training)."""
    out = Path(out_dir)
    paths = {
        "json": _atomic_write(out / "eval.json", lambda fh: json.dump(report, fh, indent=2, allow_nan=False)),
        "md": _atomic_write(out / "eval.md", lambda fh: fh.write(markdown_report(report))),
        "png": _atomic_write(out / "normalized_scores.png", lambda fh: plot_scores(report, fh), binary=True),
    }
    training = report.get("training") or {}
    if training.get("history"):
        paths["losses"] = _atomic_write(out / "loss_curves.png", lambda fh: plot_losses(training["history"], fh),
                                        binary=True)
    if training.get("evaluations"):
        paths["scores"] = _atomic_write(out / "score_curves.png", lambda fh: plot_score_curves(training, fh),
                                        binary=True)
    return paths


def write_eval_metrics(cfg: Config, report: dict, step: int) -> None:
    """The report's scores as ``eval/<task>/<key>`` and ``eval/iqm`` at training step ``step`` (of the evaluated
    checkpoint) into the run's ``eval`` metrics: ``<run_dir>/metrics/eval.csv`` and TensorBoard's ``tb/eval/``,
    beside the evaluations during training (``validation/...``)."""
    with open_metric_log(cfg, "eval") as metrics:
        metrics.write(step, score_metrics("eval", report["tasks"], report["iqm_normalized_score"]))


def eval_dir(cfg: Config) -> Path:
    """``<run_dir>/eval``."""
    return Path(cfg.run_dir) / "eval"

