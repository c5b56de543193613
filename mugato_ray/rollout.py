"""Rollout actors: one class runs a policy in N lockstepped Gymnasium envs and returns Episodes.

The same ``RolloutWorker`` serves expert collection, online experience, evaluation and measuring returns
(``measure_returns``: reference returns, the PPO job's check, snapshot scores); RLlib's EnvRunner is the
model. Only its policy differs (a ``PolicySpec``, or in process a ready policy object). ``sample(seeds)``
runs exactly one episode per seed:

- the N envs step in lockstep and ``policy.act`` is called once per step on all N observations, so a model
  policy decodes one batch per step;
- an env whose episode ends takes the next seed at once (autoreset style) and ``policy.reset([i], [seed])``
  is called for it; an episode's data therefore depends only on its seed, not on its slot or actor;
- when no seeds are left, a slot keeps running a throw-away episode so that stateful experts (the BabyAI
  bot) always act on a live env; its data is discarded;
- an env that raises in ``reset`` or ``step`` loses that episode (reported in ``failed``), is rebuilt, and
  the slot goes on with the next seed;
- kept episodes can be written atomically as ONE Parquet file per call, so a crashed call leaves nothing;
- the episodes of a ``video.VideoRequest``'s seeds are rendered (their slots rebuilt with
  ``render_mode="rgb_array"``) and written as videos, one file each, by the actor itself; rendering only reads
  the env, so an episode is the same with or without its video.

``RolloutActor`` is the Ray actor of the same class: Ray restarts it when its process dies and retries the
call, which is safe because a call's output depends only on its seeds and is written once at the end.
``run_on_pool`` runs chunks of seeds on a pool of them, sized to the free CPUs; collection and evaluation
both use it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import gymnasium as gym
import numpy as np
import ray

from mugato_ray import envs, experts, sequence, tokenizer, video
from mugato_ray.checkpoints import checkpoint_layout
from mugato_ray.episodes import Episode, env_episode_id, read_episodes, store_dir, stored_ids, write_episodes
from mugato_ray.resolve import ResolvedTask, resolve_task

if TYPE_CHECKING:
    from mugato_ray.config import Config
    from mugato_ray.tasks import TaskInfo

POLICY_KINDS = ("expert", "random", "model")
ACTOR_MAX_RESTARTS = 3
"""How often Ray restarts a dead rollout actor (and retries its call) before the call fails."""
CHUNK_ENVS = 4
"""A chunk (one ``sample`` call) holds up to this many episodes per env: enough to amortize its idle tail."""


class Policy(Protocol):
    """Acts in N envs at once; per-env randomness is seeded from the episode seed given to ``reset``."""

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None: ...

    def act(self, observations: dict[str, np.ndarray | list[str]]) -> np.ndarray: ...


PolicyFactory = Callable[[Sequence[gym.Env]], Policy]
"""Builds a policy over a worker's envs (for policies that need the env objects, like the BabyAI bot)."""


@dataclass(frozen=True)
class PolicySpec:
    """A picklable recipe for the policy an actor builds for itself (see ``make_policy``)."""

    kind: Literal["expert", "random", "model"]
    """"expert": the task's expert; "random": uniform actions; "model": a GATO checkpoint."""
    checkpoint: str | None = None
    """Model checkpoint file (kind="model" only)."""
    temperature: float = 0.0
    """Sampling temperature of the model policy (0: greedy)."""
    prompt: bool = False
    """Prompt the model with a successful expert demonstration from the task's store."""

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"PolicySpec.kind must be one of {POLICY_KINDS}, got {self.kind!r}")
        if self.kind == "model" and not self.checkpoint:
            raise ValueError("PolicySpec(kind='model') needs a checkpoint path")
        if self.temperature < 0:
            raise ValueError(f"PolicySpec.temperature must be non-negative, got {self.temperature}")


@dataclass(frozen=True)
class FaultInjection:
    """A test hook that kills the actor process on purpose (env errors: the "crash_at_step" wrapper)."""

    exit_seed: int | None = None
    """The process hard-exits when it starts this seed."""
    exit_marker: str | None = None
    """File created just before the exit; when it exists the exit is not repeated, so the retried call
    succeeds. None: exit on every attempt (a crash that no retry fixes)."""


@dataclass
class RolloutResult:
    """What one ``sample`` call produced."""

    episodes: list[Episode]
    """Kept episodes, in the order of the requested seeds (empty when not asked to return them)."""
    returns: list[float]
    """Returns of the kept episodes, in the same order (always filled)."""
    failed: list[dict]
    """One ``{"seed": int, "error": str}`` per episode lost to an env error."""
    env_steps: int
    """Env steps of finished episodes (kept and filtered); throw-away steps of idle slots are not counted."""
    seconds: float
    """Wall time of the call."""
    filtered: int = 0
    """Finished episodes dropped by the return filter (min_return)."""
    files: list[str] = field(default_factory=list)
    """Parquet files holding the kept episodes: the one written, or those of an earlier attempt."""
    outcomes: list[dict] = field(default_factory=list)
    """One ``{"seed", "return", "length", "success"}`` per finished episode (kept and filtered), in seed order:
    what evaluation needs, without shipping observations through the object store."""
    videos: list[dict] = field(default_factory=list)
    """One ``{"seed", "file", "format", "frames", "fps", "shape"}`` per recorded episode (see ``video``)."""
    video_errors: list[dict] = field(default_factory=list)
    """One ``{"seed", "error"}`` per requested video that could not be rendered or written (the episode
    itself is kept: rendering never changes it)."""


def chunk_file_name(source: str, seeds: Sequence[int], policy_step: int | None = None) -> str:
    """The file one ``sample`` call writes: its source and the first and last seed it newly stores (online
    episodes: with the weights step, as in their ids). What it holds, never which actor wrote it: a store
    read as one block concatenates its files in name order, so names that depended on which actor took which
    chunk gave one seed's training other batches in another run. Unique: the first seed is newly stored,
    and every file's first seed is stored."""
    step = "" if policy_step is None else f"p{int(policy_step)}-"
    return f"{source}-{step}{seeds[0]}-{seeds[-1]}.parquet"


# ------------------------------------------------------------------------------------------- policies


def make_policy(spec: PolicySpec, task: ResolvedTask, envs: Sequence[gym.Env], cfg: Config) -> Policy:
    """Build the policy of ``spec`` for ``envs`` (imports are lazy: an expert actor never loads torch)."""
    if spec.kind == "expert":
        return experts.make_expert(task.info, envs)
    if spec.kind == "random":
        return experts.RandomPolicy(envs[0].action_space, len(envs))

    # Lazy: torch and the model stay out of expert and random actors.
    import torch

    from mugato_ray.model import load_model
    from mugato_ray.policy import ModelPolicy

    model = load_model(spec.checkpoint)
    space = task.spec
    layout = checkpoint_layout(spec.checkpoint, task.name, space)
    if layout is None:
        # The checkpoint's own context decides the acting window; cfg.model may describe another model.
        context = getattr(getattr(model, "cfg", None), "context", cfg.model.context)
        entry = task.entry
        layout = sequence.make_layout(task.name, space, context, entry.window if entry else None)
    text_tokenizer = tokenizer.make_text_tokenizer(cfg.tokenizer)
    prompt = demonstration_prompt(task.name, space, layout, text_tokenizer, cfg) if spec.prompt else None
    # Modules hold no device: this actor places the model on a GPU only when Ray gave it one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ModelPolicy(model, space, layout, text_tokenizer, len(envs),
                       temperature=cfg.task_temperature(task.name, spec.temperature), device=device,
                       prompt_tokens=prompt, continuous_actions=cfg.rollout.continuous_actions)


def demonstration_prompt(task: str, space: Any, layout: Any, text_tokenizer: Any, cfg: Config) -> dict:
    """The last ``layout.steps // 2`` tokenized steps of the best successful expert episode in the store.

    GATO prompts with a demonstration of the same task; the end of an episode shows the goal being reached.
    The choice is deterministic (highest return, then episode_id), so every actor uses the same prompt.
    Raises FileNotFoundError naming the store when it holds no suitable expert episode.
    """
    folder = store_dir(cfg, task)
    best = None
    for file in sorted(folder.glob("expert-*.parquet")) if folder.is_dir() else []:
        for ep in read_episodes(file):
            if ep.success is False:
                continue
            key = (ep.episode_return, ep.episode_id)
            if best is None or key > (best.episode_return, best.episode_id):
                best = ep
    if best is None:
        raise FileNotFoundError(f"prompting needs a successful expert episode of task {task!r} in {folder}; "
                                "run jobs/collect.py first")
    keep = layout.steps // 2  # as in training, a prompt fills at most half the window
    if keep < 1:
        raise ValueError(f"task {task!r}: a window of {layout.steps} step(s) leaves no room for a prompt; "
                         "raise model.context or act without prompt")
    tokens = sequence.tokenize_episode(best, space, text_tokenizer)
    return {key: arr[-keep:] for key, arr in tokens.items()}


# ------------------------------------------------------------------------------------------- envs


class _EnvSlot(gym.Wrapper):
    """A stable handle on slot i's env. Policies keep this object; ``rebuild`` swaps the env inside,
    so an expert that reads ``env.unwrapped`` sees the new env after its next ``reset``.

    ``make(render_mode)`` builds the env; a slot is rebuilt with ``render_mode="rgb_array"`` when it starts an
    episode to record. An episode depends only on its seed, so the rebuilt env runs the same episode."""

    def __init__(self, make: Callable[[str | None], gym.Env]):
        self._make = make
        super().__init__(make(None))

    def rebuild(self, render_mode: str | None = None) -> None:
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - a broken env may fail to close; it is dropped either way
            pass
        self.env = self._make(render_mode)


def perturb(action: np.ndarray, space: gym.Space, rng: np.random.Generator, noise: float) -> np.ndarray:
    """The action an env executes under DART noise ``noise`` (see ``TaskEntry.expert_noise``): a Box action
    plus Gaussian noise of std ``noise`` times its half-range, clipped to the bounds; a Discrete action
    replaced by a uniformly random one with probability ``noise``."""
    if isinstance(space, gym.spaces.Box):
        half = (space.high - space.low) / 2.0
        return np.clip(action + rng.normal(size=space.shape) * noise * half, space.low, space.high).astype(space.dtype)
    if isinstance(space, gym.spaces.Discrete):
        if rng.random() < noise:
            return np.asarray(space.start + rng.integers(space.n), dtype=space.dtype)
        return action
    raise ValueError(f"expert_noise supports Box and Discrete action spaces, not {space}")


class _Trajectory:
    """Steps of one running episode: flat observations, actions (the labels), executed actions and rewards."""

    def __init__(self, seed: int):
        self.seed, self.obs, self.actions, self.executed, self.rewards = seed, [], [], [], []
        # The episode's own noise stream: a result does not depend on the slot or the batch.
        self.rng = np.random.default_rng([seed, 0xDA127])

    def add(self, obs: dict, action: np.ndarray, reward: float, executed: np.ndarray) -> None:
        # Copy: some env wrappers return views of a buffer they overwrite on the next step.
        self.obs.append({k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in obs.items()})
        self.actions.append(action)
        self.executed.append(executed)
        self.rewards.append(reward)


# ------------------------------------------------------------------------------------------- worker


class RolloutWorker:
    """N envs of one task and one policy; ``sample(seeds)`` runs one episode per seed (see module doc)."""

    def __init__(self, task: str | TaskInfo | ResolvedTask, policy: PolicySpec | Policy | PolicyFactory,
                 cfg: Config, num_envs: int | None = None, *, faults: FaultInjection | None = None):
        """``policy``: a ``PolicySpec``, built here over this worker's envs; a ready object of the Policy
        protocol that acts in ``num_envs`` envs, used as is (measuring a trained RLlib expert, a baseline, a
        test policy); or a factory called with this worker's envs (a policy that needs them, such as an
        online actor's DAgger policy around the BabyAI bot)."""
        # A resolved task (or a TaskInfo) lets a caller run a task registered in its own process only.
        self.task = resolve_task(task, cfg)
        self.info = self.task.info
        if self.info.env_id is None:
            raise ValueError(f"task {task!r} has no environment (dataset {self.info.dataset!r}); "
                             "its episodes come from mugato_ray.datasets, not from rollouts")
        self.cfg = cfg
        self.policy_spec = policy if isinstance(policy, PolicySpec) else None
        self.faults = faults or FaultInjection()
        self.num_envs = num_envs or cfg.rollout.envs_per_actor
        self.max_steps = cfg.rollout.max_episode_steps
        self.envs = [_EnvSlot(lambda mode: envs.make_env(self.info, mode)) for _ in range(self.num_envs)]
        self.spec = self.task.spec
        if self.policy_spec is not None:
            self.policy = make_policy(self.policy_spec, self.task, self.envs, cfg)
        else:
            self.policy = policy if hasattr(policy, "act") else policy(self.envs)
        self.policy_name = self.policy_spec.kind if self.policy_spec else type(policy).__name__
        entry = self.task.entry
        expert = self.policy_spec is not None and self.policy_spec.kind == "expert"
        self.noise = entry.expert_noise if entry is not None and expert else 0.0
        space = self.envs[0].action_space
        if self.noise and not isinstance(space, gym.spaces.Box | gym.spaces.Discrete):
            raise ValueError(f"task {self.info.name!r}: tasks[].expert_noise={self.noise} needs a Box or Discrete "
                             f"action space, not {space}; set it to 0 for this task")

    def _maybe_exit(self, seed: int) -> None:
        f = self.faults
        if f.exit_seed == seed and not (f.exit_marker and os.path.exists(f.exit_marker)):
            if f.exit_marker:
                Path(f.exit_marker).touch()
            os._exit(1)  # a hard crash: no cleanup, no exception for Ray to catch

    def sample(self, seeds: Sequence[int], *, source: str = "expert", store_dir: str | Path | None = None,
               min_return: float | None = None, return_episodes: bool = True,
               policy_step: int | None = None, video_request: video.VideoRequest | None = None) -> RolloutResult:
        """Run one episode per seed; keep those with return >= min_return; optionally write them to store_dir.

        ``return_episodes=False`` returns counts and returns only: a collector that stores the episodes
        need not ship them (images included) back through the object store. ``policy_step``: the optimizer
        step of the weights acting (online experience); episodes record it, and it is part of their ids.
        ``video_request``: the episodes of its seeds (those among ``seeds``) are rendered and written to its
        folder as ``seed-<s>.mp4`` (``.gif`` where no MP4 encoder is installed); see ``RolloutResult.videos``.
        """
        t0 = time.perf_counter()
        seeds = [int(s) for s in seeds]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"sample({self.info.name!r}): seeds must be distinct, got {seeds}")
        if not seeds:
            return RolloutResult(episodes=[], returns=[], failed=[], env_steps=0, seconds=0.0)
        run = _Lockstep(self, seeds, source, policy_step, video_request)
        run.run()
        done = [run.finished[s] for s in seeds if s in run.finished]
        kept = [ep for ep in done if min_return is None or ep.episode_return >= min_return]
        files = self._store(kept, source, store_dir) if store_dir is not None and kept else []
        return RolloutResult(episodes=kept if return_episodes else [], returns=[ep.episode_return for ep in kept],
                             failed=run.failed, env_steps=sum(ep.length for ep in done),
                             seconds=time.perf_counter() - t0, filtered=len(done) - len(kept), files=files,
                             outcomes=[{"seed": ep.seed, "return": ep.episode_return, "length": ep.length,
                                        "success": ep.success} for ep in done],
                             videos=sorted(run.videos, key=lambda v: v["seed"]), video_errors=run.video_errors)

    def _store(self, kept: list[Episode], source: str, store_dir: str | Path) -> list[str]:
        """Write the kept episodes not stored yet as one file; the files holding all of them."""
        # Idempotent by episode id: a retried call whose first attempt died after writing (perhaps on
        # another actor, under another file name) finds its episodes stored and writes nothing again.
        stored = stored_ids(store_dir)
        new = [ep for ep in kept if ep.episode_id not in stored]
        files = sorted({str(stored[ep.episode_id]) for ep in kept if ep.episode_id in stored})
        if new:
            name = chunk_file_name(source, [ep.seed for ep in new], new[0].policy_step)
            files += [str(p) for p in write_episodes(store_dir, new, name=name, spec=self.spec, stored=stored)]
        return files

    def _episode(self, traj: _Trajectory, source: str, terminated: bool, info: dict,
                 policy_step: int | None = None) -> Episode:
        rewards = np.asarray(traj.rewards, dtype=np.float32)
        ep_return = float(np.sum(rewards, dtype=np.float64))
        actions = np.stack(traj.actions)
        # Where a relabeling policy (DAgger) or DART noise executed other actions than the labels, the episode
        # keeps them: the observations that follow are what they did, so the episode replays (Episode.executed).
        executed = np.stack(traj.executed).astype(actions.dtype, copy=False)
        return Episode(
            task=self.info.name, episode_id=env_episode_id(self.info.name, source, traj.seed, policy_step),
            source=source, seed=traj.seed, observations=envs.stack_observations(traj.obs),
            actions=actions, rewards=rewards, terminated=terminated,
            success=envs.is_success(self.info, ep_return, terminated, info), policy_step=policy_step,
            executed=None if np.array_equal(executed, actions) else executed,
        ).validate(self.spec)

    def close(self) -> None:
        for env in self.envs:
            env.close()


class _Lockstep:
    """One ``sample`` call: the worker's N envs step in lockstep through the seeds (see the module doc)."""

    def __init__(self, worker: RolloutWorker, seeds: list[int], source: str, policy_step: int | None = None,
                 video_request: video.VideoRequest | None = None):
        self.w, self.seeds, self.source, self.policy_step = worker, seeds, source, policy_step
        n = worker.num_envs
        self.queue: deque[int] = deque(seeds)
        self.finished: dict[int, Episode] = {}
        self.failed: list[dict] = []
        self.trajs: list[_Trajectory | None] = [None] * n  # None: the slot is idle (throw-away episode)
        self.obs: list[dict | None] = [None] * n
        self.resets: list[tuple[int, int]] = []
        self.record = set(video_request.seeds) & set(seeds) if video_request is not None else set()
        self.video_folder = Path(video_request.folder) if video_request is not None else None
        self.video_format = video.actor_format(video_request) if self.record else None
        self.recording: list[video.EpisodeVideo | None] = [None] * n
        self.videos: list[dict] = []
        self.video_errors: list[dict] = []

    def run(self) -> None:
        try:
            for i in range(self.w.num_envs):
                self.start(i)
            self.flush_resets()
            while any(t is not None for t in self.trajs):
                self.step()
                self.flush_resets()
        finally:  # a call that raises leaves no partial video behind
            for i in range(self.w.num_envs):
                self.drop_video(i)

    def fail(self, i: int, seed: int, err: Exception) -> None:
        self.failed.append({"seed": seed, "error": f"{type(err).__name__}: {err}"})
        self.drop_video(i)  # the episode is lost, and its video with it
        self.w.envs[i].rebuild()

    def finish(self, i: int, traj: _Trajectory, terminated: bool, info: dict) -> None:
        """Slot i's episode is over: keep it, and put its video in place."""
        self.finished[traj.seed] = self.w._episode(traj, self.source, terminated, info, self.policy_step)
        rec, self.recording[i] = self.recording[i], None
        if rec is not None:
            try:
                self.videos.append({"seed": traj.seed, **rec.close()})
            except Exception as e:  # noqa: BLE001 - a video that cannot be written loses only the video
                rec.abort()
                self.video_errors.append({"seed": traj.seed, "error": f"{type(e).__name__}: {e}"})

    def start(self, i: int) -> None:
        """Give slot i the next seed (or a throw-away episode when none is left)."""
        env = self.w.envs[i]
        while self.queue:
            seed = self.queue.popleft()
            self.w._maybe_exit(seed)
            record = seed in self.record and self.render_env(i, seed)
            try:
                raw, _ = env.reset(seed=seed)
            except Exception as e:  # noqa: BLE001 - any env error loses only this episode
                self.fail(i, seed, e)
                continue
            self.obs[i], self.trajs[i] = envs.flatten_observation(raw, env.observation_space), _Trajectory(seed)
            self.resets.append((i, seed))
            if record:
                self.start_video(i, seed)
            return
        self.trajs[i] = None
        idle_seed = self.seeds[-1]
        try:
            raw, _ = env.reset(seed=idle_seed)
        except Exception:  # noqa: BLE001 - one rebuild, then a persistent error is real
            env.rebuild()
            raw, _ = env.reset(seed=idle_seed)
        self.obs[i] = envs.flatten_observation(raw, env.observation_space)
        self.resets.append((i, idle_seed))

    # Rendering only reads the env (no step, no random draw): the episode is the same with or without video.
    # A frame that cannot be rendered or written drops that video, named in ``video_errors``; never the episode.

    def render_env(self, i: int, seed: int) -> bool:
        """Slot i's env made to render frames (``render_mode="rgb_array"``); False, with the reason, if it cannot."""
        env = self.w.envs[i]
        if env.render_mode == "rgb_array":
            return True
        try:
            env.rebuild("rgb_array")
            return True
        except Exception as e:  # noqa: BLE001 - see above; the episode runs in a plain env
            self.video_errors.append({"seed": seed, "error": f"{type(e).__name__}: {e}"})
            env.rebuild()
            return False

    def start_video(self, i: int, seed: int) -> None:
        env = self.w.envs[i]
        try:
            path = self.video_folder / video.video_file_name(seed, self.video_format)
            self.recording[i] = video.EpisodeVideo(path, video.env_fps(env), self.video_format)
        except Exception as e:  # noqa: BLE001 - see above
            self.video_errors.append({"seed": seed, "error": f"{type(e).__name__}: {e}"})
            return
        self.add_frame(i)

    def add_frame(self, i: int) -> None:
        rec = self.recording[i]
        if rec is None:
            return
        try:
            rec.add(self.w.envs[i].render())
        except Exception as e:  # noqa: BLE001 - see above
            self.drop_video(i)
            self.video_errors.append({"seed": self.trajs[i].seed, "error": f"{type(e).__name__}: {e}"})

    def drop_video(self, i: int) -> None:
        rec, self.recording[i] = self.recording[i], None
        if rec is not None:
            rec.abort()

    def flush_resets(self) -> None:
        if self.resets:
            self.w.policy.reset([i for i, _ in self.resets], [s for _, s in self.resets])
            self.resets.clear()

    def step(self) -> None:
        """One batched ``act`` and one step of every env.

        The policy's actions are what episodes record. A relabeling policy (DAgger) also sets ``executed``,
        the actions the envs take instead; DART noise perturbs what is executed. A policy with
        ``observe_executed`` is told what every env executed (the BabyAI bot replans from it); one with
        ``take_failures`` names the envs it could not act in: their episodes end there, truncated (lost when
        no step was recorded yet).
        """
        w, n = self.w, self.w.num_envs
        dtype = w.envs[0].action_space.dtype
        actions = np.asarray(w.policy.act(envs.stack_observations(self.obs)), dtype=dtype)
        chosen = getattr(w.policy, "executed", None)
        chosen = actions if chosen is None else np.asarray(chosen, dtype=dtype)
        if actions.shape[:1] != (n,) or chosen.shape != actions.shape:
            raise ValueError(f"policy {w.policy_name!r} of task {w.info.name!r} returned actions "
                             f"of shape {actions.shape} (executed {chosen.shape}), expected ({n}, ...)")
        taken = chosen.copy()
        take_failures = getattr(w.policy, "take_failures", None)
        failures = take_failures() if take_failures is not None else {}
        for i, env in enumerate(w.envs):
            traj = self.trajs[i]
            if i in failures:  # the policy cannot act here (it says why): the episode ends at its last label
                if traj is not None and traj.rewards:
                    self.finish(i, traj, False, {})
                elif traj is not None:
                    self.fail(i, traj.seed, RuntimeError(failures[i]))
                env.rebuild()  # the env was left mid-episode
                self.start(i)
                continue
            executed = chosen[i]
            if w.noise and traj is not None:  # DART: execute a perturbed action, record the expert's
                executed = perturb(chosen[i], env.action_space, traj.rng, w.noise)
            taken[i] = executed
            try:
                raw, reward, terminated, truncated, info = env.step(executed)
            except Exception as e:  # noqa: BLE001 - any env error loses only this episode
                if traj is not None:
                    self.fail(i, traj.seed, e)
                else:
                    env.rebuild()
                self.start(i)
                continue
            if traj is not None:
                traj.add(self.obs[i], actions[i], float(reward), np.asarray(executed, dtype=dtype))
                self.add_frame(i)
                truncated = truncated or (w.max_steps is not None and len(traj.rewards) >= w.max_steps)
                if terminated or truncated:
                    self.finish(i, traj, bool(terminated), info)
            if terminated or truncated:
                self.start(i)
            else:
                self.obs[i] = envs.flatten_observation(raw, env.observation_space)
        observe = getattr(w.policy, "observe_executed", None)
        if observe is not None:
            observe(taken)


RolloutActor = ray.remote(max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_RESTARTS)(RolloutWorker)
"""The Ray actor of RolloutWorker: restarted when its process dies, its pending call retried."""


# ------------------------------------------------------------------------------------------- returns


@dataclass
class EpisodeStats:
    """Per-seed results of :func:`measure_returns`, in the order of the seeds given."""

    seeds: np.ndarray
    returns: np.ndarray
    lengths: np.ndarray
    successes: list[bool | None]

    @property
    def mean_return(self) -> float:
        return float(self.returns.mean())


def measure_returns(task: str | TaskInfo | ResolvedTask, policy: PolicySpec | Policy, cfg: Config,
                    seeds: Sequence[int], *, num_envs: int | None = None, skip_failed: bool = False) -> EpisodeStats:
    """One episode per seed of ``policy`` (a PolicySpec, or a Policy object: see ``RolloutWorker``) on env task
    ``task``, in this process, on ``num_envs`` lockstepped envs (None: ``min(len(seeds),
    rollout.envs_per_actor)``). Episodes run to the task's own step limit, where the references were
    measured (``rollout.max_episode_steps`` is for collection). Reference returns (jobs/measure_references.py),
    the PPO job's final check and snapshot scoring (``train_eval.score_policy``) all measure with it.

    An episode lost to an env error raises RuntimeError naming its seed and error; with ``skip_failed`` it
    is left out instead (its seed is then missing from ``EpisodeStats.seeds``).
    """
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_episode_steps=None))
    seeds = [int(s) for s in seeds]
    worker = RolloutWorker(task, policy, cfg, num_envs or min(len(seeds), cfg.rollout.envs_per_actor) or None)
    try:
        result = worker.sample(seeds, source="policy", return_episodes=False)
    finally:
        worker.close()
    if result.failed and not skip_failed:
        errors = "; ".join(f"seed {f['seed']}: {f['error']}" for f in result.failed)
        raise RuntimeError(f"measuring {worker.info.name!r}: {len(result.failed)} episode(s) lost to env errors: "
                           f"{errors}")
    outcomes = result.outcomes
    return EpisodeStats(seeds=np.array([o["seed"] for o in outcomes], dtype=np.int64),
                        returns=np.array([o["return"] for o in outcomes], dtype=np.float64),
                        lengths=np.array([o["length"] for o in outcomes], dtype=np.int64),
                        successes=[o["success"] for o in outcomes])


# ------------------------------------------------------------------------------------------- pool


def split_seeds(seeds: Sequence[int], num_actors: int, envs_per_actor: int) -> list[list[int]]:
    """Seeds in consecutive chunks (one ``sample`` call each): at most ``envs_per_actor * CHUNK_ENVS`` long,
    and short enough that every one of ``num_actors`` actors gets work."""
    seeds = [int(s) for s in seeds]
    per_actor = math.ceil(len(seeds) / max(1, num_actors))
    size = max(1, min(envs_per_actor * CHUNK_ENVS, per_actor))
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def actor_count(cfg: Config, wanted: int, log: Callable[[str], None] = print) -> int:
    """Actors that fit in the free CPUs now (at least one), so a small machine runs fewer, never hangs."""
    need, total = cfg.rollout.actor_cpus, ray.cluster_resources().get("CPU", 0.0)
    if need > total:
        raise ValueError(f"rollout.actor_cpus={need} exceeds the cluster's {total} CPUs: no actor could start")
    if need <= 0:
        return wanted
    fit = int(ray.available_resources().get("CPU", 0.0) // need + 1e-9)
    n = max(1, min(wanted, fit))
    if n < wanted:
        log(f"rollout: {n} rollout actors instead of {wanted}: {fit} fit in the free CPUs "
            f"at rollout.actor_cpus={need}")
    return n


def kill_actors(actors: Sequence, cpus_each: float, timeout_s: float = 10.0) -> None:
    """Kill the actors and wait (briefly) until Ray shows their CPUs free again.

    ray.kill returns before the processes are gone; a pool started right after (the next task's) would
    otherwise see the CPUs still taken and start fewer actors.
    """
    if not actors:
        return
    target = ray.available_resources().get("CPU", 0.0) + len(actors) * cpus_each
    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) + 1e-9 < target and time.monotonic() < deadline:
        time.sleep(0.05)


def run_on_pool(task: str | TaskInfo | ResolvedTask, policy: PolicySpec, cfg: Config, chunks: Sequence[Sequence[int]],
                on_result: Callable[[list[int], RolloutResult], None], *, sample_kwargs: dict | None = None,
                faults: FaultInjection | None = None,
                on_error: Callable[[list[int], Exception], None] | None = None,
                log: Callable[[str], None] = print) -> None:
    """Run ``sample(chunk, **sample_kwargs)`` for every chunk on a pool of RolloutActors, then kill them.

    The pool has ``min(rollout.num_actors, len(chunks))`` actors (fewer when the free CPUs do not fit them),
    ``rollout.envs_per_actor`` envs each; an actor gets the next chunk as soon as it returns one, so a slow
    chunk never idles the others. ``on_result(chunk, result)`` runs in the driver in completion order (for
    progress lines). A call that raises goes to ``on_error(chunk, err)`` when given, else the error
    propagates; an actor that died past its restarts (e.g. an env that segfaults on one seed, every time)
    is replaced, so the other chunks still run.
    """
    todo = deque([list(c) for c in chunks])
    if not todo:
        return

    def new_actor():
        # Only a model policy uses a GPU; experts and random policies never load torch.
        gpus = cfg.rollout.actor_gpus if policy.kind == "model" else 0.0
        return RolloutActor.options(num_cpus=cfg.rollout.actor_cpus, num_gpus=gpus).remote(
            task, policy, cfg, cfg.rollout.envs_per_actor, faults=faults)

    actors = [new_actor() for _ in range(actor_count(cfg, min(cfg.rollout.num_actors, len(todo)), log))]
    running: dict[Any, tuple[int, list[int]]] = {}  # object ref -> (actor index, chunk)

    def submit(k: int) -> None:
        chunk = todo.popleft()
        running[actors[k].sample.remote(chunk, **(sample_kwargs or {}))] = (k, chunk)

    try:
        for k in range(len(actors)):
            submit(k)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            k, chunk = running.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a lost call is the caller's to count or raise
                if on_error is None:
                    raise
                if isinstance(e, ray.exceptions.RayActorError):
                    actors[k] = new_actor()  # the old one is gone for good; nothing of its chunk was written
                on_error(chunk, e)
            else:
                on_result(chunk, result)
            if todo:
                submit(k)
    finally:
        kill_actors(actors, cfg.rollout.actor_cpus)
