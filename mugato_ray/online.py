"""Online experience: rollout actors run the current policy while training goes on, and what they collect
flows back into the store that training reads.

The parties (``train.train`` wires them when ``online.enabled``):

- **Rank 0 publishes** its weights through the object store every ``online.publish_every`` optimizer steps
  (and at its first step): ``weights.publish_weights`` puts a CPU copy of the state dict once and hands its
  reference to a ``weights.WeightBoard`` actor. Nothing is re-read from checkpoint files.
- **Online actors** (:class:`OnlineWorker`, ``online.num_actors`` of them on the CPUs that
  ``resources.plan_resources`` holds back for them) each run rounds: fetch the newest weights when the board
  has newer ones (between rounds, never inside an episode), then run ``online.episodes_per_round`` episodes of
  one task through ``rollout.RolloutWorker`` (the one rollout loop) and write them into
  ``<run_dir>/data/<task>/`` atomically, each recording the step of the weights that acted
  (``Episode.policy_step``, also part of its id).
- **What they collect.** ``online.mode: dagger``: :class:`DAggerPolicy`: each episode is driven by the
  model, or with probability ``beta`` (decided from the episode seed; ``online.beta`` decayed by
  ``online.beta_decay`` per published round) by the expert, and every visited state is labelled with the
  task's expert action (``source=dagger``). Scripted and RLlib experts are functions of the observation;
  the BabyAI bot replans from the action each env executed. ``self_imitation``: the model acts and its
  episodes are kept when their return reaches ``online.min_return_fraction`` of the way from the random to
  the expert reference (``source=policy``).
- **The driver** (:class:`OnlineLoop`, a thread beside ``TorchTrainer.fit``) hands rounds to idle actors,
  task after task, and enforces the retention bound (``online.keep_episodes`` per task: the oldest online
  files are deleted first).
- **Training** reads new files at every pass of a task's dataset (``data.StoreDatasource`` lists the store
  when a pass starts), and resamples online episodes to ``online.fraction`` of the task's episodes.

Ids are what an episode is (task, source, weights step, seed); seeds come from ``online.seed_offset`` up,
disjoint from collection and evaluation seeds, so a retried round never stores an episode twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from mugato_ray import experts
from mugato_ray.episodes import is_online_file, store_dir
from mugato_ray.learner import build_model
from mugato_ray.policy import ModelPolicy
from mugato_ray.resolve import ResolvedTask
from mugato_ray.rollout import FaultInjection, RolloutResult, RolloutWorker
from mugato_ray.tokenizer import make_text_tokenizer

if TYPE_CHECKING:
    import gymnasium as gym

    from mugato_ray.config import Config

log = logging.getLogger(__name__)

_DRIVER_SALT = 0xDA66E5
"""Mixed into the episode seed for DAgger's expert-or-model draw (not the env's or the policy's stream)."""


def online_source(cfg: Config) -> str:
    """The source online episodes are stored under: dagger (expert-labelled) or policy (self-imitation)."""
    return "dagger" if cfg.online.mode == "dagger" else "policy"


# ------------------------------------------------------------------------------------------- DAgger


class DAggerPolicy:
    """DAgger's acting policy (Ross et al., 2011) over N envs.

    Each episode is driven by ``learner`` or, with probability ``beta`` (drawn from the episode seed), by
    ``expert``; ``act`` returns the expert's actions, the labels episodes record, and sets ``executed`` to the
    actions the envs take. ``observe_executed`` forwards what was executed to the expert (the BabyAI bot
    replans from it).
    """

    def __init__(self, learner: Any, expert: Any, num_envs: int, beta: float):
        self.learner, self.expert, self.beta = learner, expert, float(beta)
        self.expert_drives = np.zeros(num_envs, bool)
        self.executed: np.ndarray | None = None

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        self.learner.reset(env_ids, seeds)
        self.expert.reset(env_ids, seeds)
        for i, seed in zip(env_ids, seeds, strict=True):
            self.expert_drives[i] = np.random.default_rng([int(seed), _DRIVER_SALT]).random() < self.beta

    def act(self, observations: Mapping[str, Any]) -> np.ndarray:
        labels = np.asarray(self.expert.act(observations))
        chosen = np.asarray(self.learner.act(observations)).astype(labels.dtype, copy=False)
        mask = self.expert_drives.reshape(-1, *([1] * (labels.ndim - 1)))
        self.executed = np.where(mask, labels, chosen)
        return labels

    def observe_executed(self, actions: np.ndarray) -> None:
        observe = getattr(self.expert, "observe_executed", None)
        if observe is not None:
            observe(actions)

    def take_failures(self) -> dict[int, str]:
        """Envs whose states the expert could not label (their episodes are lost)."""
        take = getattr(self.expert, "take_failures", None)
        return take() if take is not None else {}


# ------------------------------------------------------------------------------------------- actors


@dataclass
class RoundResult:
    """What one round of one actor produced."""

    task: str
    policy_step: int
    rollout: RolloutResult


class OnlineWorker:
    """An online rollout actor: the current weights acting in the envs of the run's tasks (one
    ``RolloutWorker`` per task, built on first use), in rounds."""

    def __init__(self, cfg: Config, tasks: Mapping[str, ResolvedTask], board: Any,
                 faults: FaultInjection | None = None):
        self.faults = faults  # test hook: a hard exit at a seed (rollout.FaultInjection)
        torch.set_num_threads(1)  # beside training: one core's worth at most
        # Modules hold no device: the model acts on a GPU only when Ray gave this actor one.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg, self.tasks, self.board = cfg, dict(tasks), board
        self.model = build_model(cfg, next(iter(self.tasks.values())).spec.vocab).to(self.device).eval()
        self.text_tokenizer = make_text_tokenizer(cfg.tokenizer)
        self.step: int | None = None
        self.workers: dict[str, RolloutWorker] = {}

    def _refresh(self, timeout_s: float) -> int:
        """Load the board's newest weights when they are newer than ours (waits for the first publish)."""
        deadline = time.monotonic() + timeout_s
        while True:
            step, refs = ray.get(self.board.latest.remote())
            if step is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no weights published within {timeout_s:g} s")
            time.sleep(0.2)
        if step != self.step:
            self.model.load_state_dict(ray.get(refs[0]))
            self.step = step
        return self.step

    def _worker(self, name: str) -> RolloutWorker:
        if name not in self.workers:
            self.workers[name] = RolloutWorker(self.tasks[name], self._policy_factory(name), self.cfg,
                                               self.cfg.online.envs_per_actor, faults=self.faults)
        return self.workers[name]

    def _policy_factory(self, name: str) -> Callable[[Sequence[gym.Env]], Any]:
        task = self.tasks[name]

        def build(envs: Sequence[gym.Env]) -> Any:
            model = ModelPolicy(self.model, task.spec, task.layout, self.text_tokenizer, len(envs),
                                temperature=self.cfg.task_temperature(name), device=self.device,
                                continuous_actions=self.cfg.rollout.continuous_actions)
            if self.cfg.online.mode != "dagger":
                return model
            return DAggerPolicy(model, experts.make_expert(task.info, envs), len(envs), self.cfg.online.beta)

        return build

    def run_round(self, name: str, seeds: Sequence[int], beta: float, timeout_s: float = 600.0) -> RoundResult:
        """One round: the newest weights, ``seeds`` episodes of task ``name``, stored under its store."""
        step = self._refresh(timeout_s)
        worker = self._worker(name)
        if isinstance(worker.policy, DAggerPolicy):
            worker.policy.beta = beta
        task, source = self.tasks[name], online_source(self.cfg)
        threshold = None
        if source == "policy":
            threshold = task.min_return(self.cfg.online.min_return_fraction)
        result = worker.sample(list(seeds), source=source, store_dir=str(store_dir(self.cfg, name)),
                               min_return=threshold, return_episodes=False, policy_step=step)
        return RoundResult(name, step, result)


# ------------------------------------------------------------------------------------------- driver


def env_tasks(tasks: Mapping[str, ResolvedTask]) -> list[str]:
    """The tasks online actors can act in: environment tasks with weight > 0 (and, for DAgger, an expert)."""
    return [n for n, t in tasks.items() if t.info.has_env and (t.entry is None or t.entry.weight > 0)]


def retain(folder: Path, keep: int) -> list[tuple[Path, int]]:
    """Delete the oldest online files (by modification time, then name) of ``folder`` until at most ``keep``
    online episodes remain; demonstrations are never touched. Returns the deleted files with their episode
    counts."""
    files = [f for f in folder.glob("*.parquet") if is_online_file(f)] if folder.is_dir() else []
    files.sort(key=lambda f: (f.stat().st_mtime, f.name))
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    deleted, total = [], sum(counts)
    for f, n in zip(files, counts):
        if total <= keep:
            break
        f.unlink(missing_ok=True)
        deleted.append((f, n))
        total -= n
    return deleted


@dataclass
class OnlineStats:
    """What the online loop did during one training run."""

    rounds: int = 0
    episodes: dict[str, int] = field(default_factory=dict)
    """task -> online episodes stored."""
    returns: dict[str, list[float]] = field(default_factory=dict)
    """task -> returns of the episodes run (kept or not), in completion order."""
    steps: dict[str, list[int]] = field(default_factory=dict)
    """task -> the weights step of each round."""
    evicted: dict[str, int] = field(default_factory=dict)
    """task -> online episodes the retention bound removed again (``episodes - evicted`` are in the store)."""
    failed: int = 0
    deleted_files: int = 0
    errors: list[str] = field(default_factory=list)


class OnlineLoop:
    """Runs online rounds on a pool of :class:`OnlineWorker` actors in a driver thread until stopped."""

    def __init__(self, cfg: Config, tasks: Mapping[str, ResolvedTask], board: Any,
                 log_line: Callable[[str], None] = print):
        self.cfg, self.board, self.log = cfg, board, log_line
        self.tasks = {n: tasks[n] for n in env_tasks(tasks)}
        if not self.tasks:
            raise ValueError("online.enabled needs at least one environment task of weight > 0 in 'tasks'")
        if cfg.online.mode == "dagger":
            missing = [n for n, t in self.tasks.items() if t.info.expert == "none"]
            if missing:
                raise ValueError(f"online.mode=dagger needs an expert to label states; tasks {missing} have none "
                                 "(use online.mode=self_imitation or remove them)")
        self.stats = OnlineStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._actors: list = []
        self._next_seed = {n: cfg.online.seed_offset for n in self.tasks}

    def start(self) -> OnlineLoop:
        o = self.cfg.online
        remote = ray.remote(OnlineWorker).options(num_cpus=o.actor_cpus, num_gpus=o.actor_gpus, max_restarts=3,
                                                  max_task_retries=3)
        self._actors = [remote.remote(self.cfg, self.tasks, self.board) for _ in range(o.num_actors)]
        self._thread = threading.Thread(target=self._run, name="online-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120.0) -> OnlineStats:
        """Stop handing out rounds, wait for those in flight (up to ``timeout_s``), kill the actors."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for actor in self._actors:
            ray.kill(actor)
        return self.stats

    def _beta(self, step: int) -> float:
        rounds = step // self.cfg.online.publish_every
        return self.cfg.online.beta * self.cfg.online.beta_decay ** rounds

    def _submit(self, k: int, order: list[str], counter: list[int], running: dict) -> None:
        name = order[counter[0] % len(order)]
        counter[0] += 1
        n = self.cfg.online.episodes_per_round
        seeds = list(range(self._next_seed[name], self._next_seed[name] + n))
        self._next_seed[name] += n
        step, _ = ray.get(self.board.latest.remote())
        beta = self._beta(step or 0)
        running[self._actors[k].run_round.remote(name, seeds, beta)] = (k, name)

    def _run(self) -> None:
        order, counter, running = list(self.tasks), [0], {}
        try:
            for k in range(len(self._actors)):
                self._submit(k, order, counter, running)
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in done:
                    k, name = running.pop(ref)
                    self._record(name, ref)
                    if not self._stop.is_set():
                        self._submit(k, order, counter, running)
        except Exception as e:  # noqa: BLE001 - the loop must not take training down; the report says why
            self.stats.errors.append(f"{type(e).__name__}: {e}")
            log.exception("online loop stopped")

    def _record(self, name: str, ref: Any) -> None:
        s = self.stats
        try:
            r: RoundResult = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a lost round is counted; the next one goes on
            s.failed += self.cfg.online.episodes_per_round
            s.errors.append(f"{name}: {type(e).__name__}: {e}")
            return
        s.rounds += 1
        s.episodes[name] = s.episodes.get(name, 0) + len(r.rollout.returns)
        s.returns.setdefault(name, []).extend(o["return"] for o in r.rollout.outcomes)
        s.steps.setdefault(name, []).append(r.policy_step)
        s.failed += len(r.rollout.failed)
        deleted = retain(store_dir(self.cfg, name), self.cfg.online.keep_episodes)
        s.deleted_files += len(deleted)
        s.evicted[name] = s.evicted.get(name, 0) + sum(n for _, n in deleted)
        mean = np.mean([o["return"] for o in r.rollout.outcomes]) if r.rollout.outcomes else float("nan")
        self.log(f"online {name}: round with the weights of step {r.policy_step}: {len(r.rollout.outcomes)} "
                 f"episodes, mean return {mean:.3g}, {len(r.rollout.returns)} stored "
                 f"({s.episodes[name]} in all)")
