"""A plain behaviour-cloning baseline: the yardstick the GATO model is measured against.

One small network per task, trained on the same episode store, with no tokens: every observation field
is fed in its natural form and every action predicted directly.

- continuous fields: standardized floats (mean and std of the store);
- discrete fields: one-hot per component;
- images: a small CNN (two strided convolutions) on the uint8 frame;
- text (a BabyAI mission): a bag of words, hashed into ``TEXT_BUCKETS`` buckets;

concatenated into an MLP. A discrete action is a softmax per component (cross-entropy), a continuous
action a regression onto its bounds scaled to [-1, 1] (tanh output, mean squared error).

:class:`BaselinePolicy` follows the rollout Policy protocol (``reset``, ``act``), so the evaluation
harness scores it exactly as it scores the model. ``bench/learning.py`` trains both on one store.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mugato_ray.episodes import Episode
from mugato_ray.tokenizer import FieldSpec, Modality, SpaceSpec

TEXT_BUCKETS = 256
"""Hashed bag-of-words size for text observations."""


def _words_to_bag(texts: Sequence[str]) -> np.ndarray:
    """(N,) strings -> (N, TEXT_BUCKETS) float32 word counts (crc32 buckets: stable across processes)."""
    out = np.zeros((len(texts), TEXT_BUCKETS), np.float32)
    for i, text in enumerate(texts):
        for word in str(text).lower().split():
            out[i, zlib.crc32(word.encode("utf-8")) % TEXT_BUCKETS] += 1.0
    return out


class _FieldEncoder(nn.Module):
    """One observation field in its natural form -> (N, width) features."""

    def __init__(self, f: FieldSpec, mean: np.ndarray | None, std: np.ndarray | None, width: int):
        super().__init__()
        self.f = f
        if f.modality is Modality.IMAGE:
            c = f.shape[-1]
            self.net = nn.Sequential(
                nn.Conv2d(c, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, width), nn.ReLU(),
            )
        elif f.modality is Modality.TEXT:
            self.net = nn.Sequential(nn.Linear(TEXT_BUCKETS, width), nn.ReLU())
        elif f.modality is Modality.DISCRETE:
            self.nvec = [int(n) for n in f.nvec]
            self.net = nn.Identity()
        else:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            self.net = nn.Identity()

    @property
    def width(self) -> int | None:
        if self.f.modality is Modality.DISCRETE:
            return sum(self.nvec)
        if self.f.modality is Modality.CONTINUOUS:
            return int(np.prod(self.f.shape))
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.f
        if f.modality is Modality.IMAGE:
            return self.net(x.float().div(255.0).permute(0, 3, 1, 2).contiguous())
        if f.modality is Modality.TEXT:
            return self.net(x)
        if f.modality is Modality.DISCRETE:
            x = x.reshape(x.shape[0], -1).long() - torch.as_tensor(np.asarray(f.start).reshape(-1), device=x.device)
            return torch.cat([F.one_hot(x[:, i].clamp(0, n - 1), n).float() for i, n in enumerate(self.nvec)], dim=1)
        return (x.reshape(x.shape[0], -1).float() - self.mean) / self.std


class BaselineNet(nn.Module):
    """Observation fields -> action: logits per discrete component, or a tanh mean in [-1, 1]."""

    def __init__(self, spec: SpaceSpec, stats: Mapping[str, tuple[np.ndarray, np.ndarray]], hidden: int = 64):
        super().__init__()
        if len(spec.action) != 1 or spec.action[0].modality not in (Modality.DISCRETE, Modality.CONTINUOUS):
            raise ValueError(f"the baseline needs one discrete or continuous action field, got {spec.action}")
        self.spec, self.act = spec, spec.action[0]
        self.encoders = nn.ModuleDict()
        width = 0
        for f in spec.observation:
            enc = _FieldEncoder(f, *stats.get(f.key, (None, None)), width=hidden)
            self.encoders[f.key.replace("/", "|")] = enc
            width += enc.width or hidden
        if self.act.modality is Modality.DISCRETE:
            self.nvec = [int(n) for n in self.act.nvec]
            out = sum(self.nvec)
        else:
            out = int(np.prod(self.act.shape))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out))

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([enc(obs[enc.f.key]) for enc in self.encoders.values()], dim=1)
        return self.mlp(h)

    def loss(self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        out = self(obs)
        if self.act.modality is Modality.CONTINUOUS:
            return F.mse_loss(torch.tanh(out), self._scale(actions))
        a = actions.reshape(actions.shape[0], -1).long() - torch.as_tensor(np.asarray(self.act.start).reshape(-1))
        parts = out.split(self.nvec, dim=1)
        return sum(F.cross_entropy(p, a[:, i]) for i, p in enumerate(parts)) / len(parts)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(np.asarray(self.act.low, np.float32).reshape(-1)),
                torch.as_tensor(np.asarray(self.act.high, np.float32).reshape(-1)))

    def _scale(self, actions: torch.Tensor) -> torch.Tensor:
        low, high = self._bounds()
        return (actions.reshape(actions.shape[0], -1).float() - low) / (high - low) * 2.0 - 1.0

    @torch.no_grad()
    def predict(self, obs: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Greedy actions (N, *action_shape) in the action space's dtype."""
        out = self(obs)
        if self.act.modality is Modality.CONTINUOUS:
            low, high = self._bounds()
            a = (torch.tanh(out) + 1.0) / 2.0 * (high - low) + low
        else:
            start = torch.as_tensor(np.asarray(self.act.start).reshape(-1))
            a = torch.stack([p.argmax(dim=1) for p in out.split(self.nvec, dim=1)], dim=1) + start
        return a.numpy().reshape(out.shape[0], *self.act.shape).astype(self.act.dtype)


def observation_tensors(spec: SpaceSpec, observations: Mapping[str, np.ndarray | list[str]]) -> dict[str, torch.Tensor]:
    """Observation fields (key -> (N, *shape), or N strings for text) -> the network's input tensors."""
    out = {}
    for f in spec.observation:
        x = observations[f.key]
        out[f.key] = torch.from_numpy(_words_to_bag(x)) if f.modality is Modality.TEXT else torch.as_tensor(np.asarray(x))
    return out


def _stats(spec: SpaceSpec, episodes: Sequence[Episode]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for f in spec.observation:
        if f.modality is Modality.CONTINUOUS:
            x = np.concatenate([np.asarray(ep.observations[f.key], np.float64).reshape(ep.length, -1)
                                for ep in episodes])
            out[f.key] = (x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6))
    return out


def _concat(spec: SpaceSpec, episodes: Sequence[Episode]) -> tuple[dict[str, np.ndarray | list[str]], np.ndarray]:
    obs: dict[str, np.ndarray | list[str]] = {}
    for f in spec.observation:
        parts = [ep.observations[f.key] for ep in episodes]
        obs[f.key] = [t for p in parts for t in p] if f.modality is Modality.TEXT else np.concatenate(parts)
    return obs, np.concatenate([np.asarray(ep.actions) for ep in episodes])


def train_baseline(spec: SpaceSpec, episodes: Sequence[Episode], *, steps: int = 2000, batch_size: int = 256,
                   lr: float = 1e-3, seed: int = 0, on_step=None) -> BaselineNet:
    """Behaviour cloning on every (observation, action) pair of ``episodes``: Adam, uniform minibatches.

    ``on_step(step, net)`` is called after each update (the benchmark evaluates from there).
    """
    if not episodes:
        raise ValueError("train_baseline: no episodes")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = BaselineNet(spec, _stats(spec, episodes))
    obs, actions = _concat(spec, episodes)
    inputs = observation_tensors(spec, obs)
    targets = torch.as_tensor(actions)
    n = len(targets)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, n, size=min(batch_size, n)))
        loss = net.loss({k: v[idx] for k, v in inputs.items()}, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1, net)
    return net


class BaselinePolicy:
    """A trained :class:`BaselineNet` as a rollout policy (greedy; it keeps no history)."""

    def __init__(self, net: BaselineNet):
        self.net = net.eval()

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        pass

    def act(self, observations: Mapping[str, np.ndarray | list[str]]) -> np.ndarray:
        return self.net.predict(observation_tensors(self.net.spec, observations))
