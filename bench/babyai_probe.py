"""What the BabyAI bench tools share: which of a config's tasks they may measure, and a policy whose first-action
probabilities they can read (a model checkpoint, or the plain baseline trained on the store).

Used by ``bench/babyai_failures.py``, ``bench/mission_sensitivity.py`` and ``bench/babyai_front.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mugato_ray.baseline import BaselineNet, observation_tensors, train_baseline
from mugato_ray.config import Config
from mugato_ray.data import EpisodeFilter
from mugato_ray.episodes import read_episodes, store_dir
from mugato_ray.resolve import resolve_task
from mugato_ray.rollout import PolicySpec, make_policy
from mugato_ray.tasks import get_task

TEXT_KEY = "mission"
OBJECTS = ("key", "ball", "box")
"""The objects a BabyAI level places, which block ``forward``."""


def babyai_tasks(cfg: Config, requested: Sequence[str] | None, config_path: str) -> list[str]:
    """``requested`` (default: every BabyAI task of ``cfg``), refused with a ValueError naming the ones that are
    not BabyAI tasks of the config at ``config_path``."""
    babyai = [t.name for t in cfg.tasks if get_task(t.name).domain == "babyai"]
    tasks = list(requested or babyai)
    if unknown := sorted(set(tasks) - set(babyai)):
        raise ValueError(f"--tasks: {unknown} are not BabyAI tasks of {config_path}")
    return tasks


class BaselineLogits:
    """A trained :class:`BaselineNet` with the model policy's ``reset`` / ``act_with_logits`` (it keeps no
    history, so a reset does nothing); its logits are the discrete action's, shaped ``(N, 1, n)``."""

    def __init__(self, net: BaselineNet):
        self.net = net.eval()

    def reset(self, env_ids, seeds) -> None:
        pass

    @torch.no_grad()
    def act_with_logits(self, observations):
        logits = self.net(observation_tensors(self.net.spec, observations)).numpy()[:, None, :]
        return logits.argmax(-1), logits.argmax(-1), logits


def probe_policy(cfg: Config, task: str, env, checkpoint: str | None, baseline_steps: int | None):
    """``(policy, action_ids)``: the model at ``checkpoint`` acting in 2 envs, or the plain baseline trained
    ``baseline_steps`` updates on the task's store; ``action_ids`` are the env's actions among its logits."""
    resolved = resolve_task(task, cfg)
    n_actions = int(env.action_space.n)
    if checkpoint:
        policy = make_policy(PolicySpec("model", checkpoint), resolved, [env, env], cfg)
        return policy, [policy.model.vocab.value_offset + a for a in range(n_actions)]
    episodes = EpisodeFilter.from_config(cfg, task).apply(read_episodes(store_dir(cfg, task)))
    return BaselineLogits(train_baseline(resolved.spec, episodes, steps=baseline_steps)), list(range(n_actions))


def first_action_probs(policy, observations: Sequence[dict]) -> np.ndarray:
    """(len(observations), V) first-token action probabilities of ``policy`` (built for as many envs), each
    observation the first step of a fresh episode."""
    n = len(observations)
    policy.reset(list(range(n)), list(range(n)))
    batch = {k: [o[k] for o in observations] if k == TEXT_KEY else np.stack([np.asarray(o[k]) for o in observations])
             for k in observations[0]}
    _, _, logits = policy.act_with_logits(batch)
    z = np.asarray(logits[:, 0], dtype=np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)
