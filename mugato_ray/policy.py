"""Acting with the model: a batched, KV-cached policy over N environments stepping in lockstep.

Each env keeps its history of tokenized timesteps in the layout's per-field form (the same
``(E, T, C)`` arrays a training row holds). On :meth:`ModelPolicy.act` the N observations are
tokenized, observation tokens and the separator are appended to every env's sequence, and the
action tokens are sampled one at a time: logits at the last position, restricted to the legal ids of
that action token, greedy (temperature 0) or sampled with the env's own generator (seeded from its
episode seed, so a result does not depend on the batch slot), appended, next token.

Window: an env's history never holds more than ``layout.steps`` timesteps (prompt steps included),
the window the model was trained on. When the next step would not fit, the env drops its oldest
episode steps (the prompt stays first, as in training), keeping about half of the window, and the
cache is re-encoded from the kept steps: with no absolute positions, this is exactly a training
window that starts mid-episode (see ``mugato_ray.model``).

Cache: one KV cache for all N envs, filled in lockstep. An env that starts a new episode marks its
cache entries invalid (they are masked as keys) instead of re-encoding anything; the cache is
re-encoded from the histories only when an env drops steps, a prompt must be inserted, or the cache
is full. The last action token of a step is appended together with the next observation, which
saves one forward pass per step. ``use_cache=False`` re-encodes the whole window for every token:
the reference that the cached path must match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mugato_ray.model import GatoModel, KVCache
from mugato_ray.sequence import SequenceLayout
from mugato_ray.tokenizer import SpaceSpec, decode_actions, encode_observations, legal_action_mask


class ModelPolicy:
    """The Policy protocol (``reset(env_ids, seeds)``, ``act(observations)``) for a :class:`GatoModel`.

    ``prompt_tokens``: an optional tokenized demonstration, layout key -> (P, T, C) arrays with
    ``P < layout.steps``, placed at the start of every env's history at reset.
    """

    def __init__(
        self,
        model: GatoModel,
        spec: SpaceSpec,
        layout: SequenceLayout,
        text_tokenizer: Any,
        num_envs: int,
        *,
        temperature: float = 0.0,
        use_cache: bool = True,
        device: str | torch.device = "cpu",
        prompt_tokens: Mapping[str, np.ndarray] | None = None,
    ):
        if temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {temperature}")
        self.model = model.to(device).eval()
        self.spec, self.layout, self.text_tokenizer = spec, layout, text_tokenizer
        self.num_envs, self.temperature, self.use_cache = num_envs, temperature, use_cache
        self.device = torch.device(device)
        self.vocab = spec.vocab
        task, keys = layout.task, [f.key for f in layout.fields]
        act = [f for f in layout.fields if f.role == "action"]
        if len(act) != 1 or layout.fields[-1] is not act[0]:
            raise ValueError(f"task {task!r}: acting needs one action field, last in the timestep; got fields {keys}")
        self.act_field = act[0]
        self.pre_fields = layout.fields[:-1]  # observations and the separator
        obs_keys = [f.key for f in self.pre_fields if f.role == "observation"]
        spec_keys = [f"obs/{f.key}" for f in spec.observation]
        if obs_keys != spec_keys:
            raise ValueError(f"task {task!r}: layout observation fields {obs_keys} differ from the spec's {spec_keys}")
        self.act_offset = layout.offsets()[self.act_field.key]
        self.legal_AxV = torch.from_numpy(legal_action_mask(spec)).to(self.device)
        if self.legal_AxV.shape[0] != self.act_field.tokens:
            raise ValueError(
                f"task {task!r}: the spec has {self.legal_AxV.shape[0]} action tokens, the layout {self.act_field.tokens}"
            )

        N, E = num_envs, layout.steps
        # Histories in the row format: (N, steps, T, C) per field; env i's first n[i] steps are real.
        self.hist = {
            f.key: np.zeros((N, E, f.tokens, f.channels), np.uint8)
            if f.is_image
            else np.full((N, E, f.tokens, f.channels), self.vocab.pad, np.int32)
            for f in layout.fields
        }
        self.prompt_steps = 0
        if prompt_tokens is not None:
            self._set_prompt(prompt_tokens)
        self.n = np.full(N, self.prompt_steps, np.int64)
        self.generators = [torch.Generator().manual_seed(i) for i in range(N)]
        self.cache: KVCache | None = None
        self.stale = True  # the cache must be re-encoded from the histories before the next step
        self.pending_N = torch.full((N,), self.vocab.pad, dtype=torch.long, device=self.device)
        self.pending_valid_N = torch.zeros(N, dtype=torch.bool, device=self.device)
        self.current: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's pieces (reference path)

    def _set_prompt(self, prompt: Mapping[str, np.ndarray]) -> None:
        lengths = set()
        for f in self.layout.fields:
            if f.key not in prompt:
                raise KeyError(f"prompt_tokens: missing field {f.key!r} of task {self.layout.task!r}")
            p = np.asarray(prompt[f.key])
            if p.ndim != 3 or p.shape[1:] != (f.tokens, f.channels):
                raise ValueError(f"prompt_tokens[{f.key!r}]: expected (P, {f.tokens}, {f.channels}), got {p.shape}")
            lengths.add(p.shape[0])
        if len(lengths) != 1:
            raise ValueError(f"prompt_tokens: fields have different step counts {sorted(lengths)}")
        (P,) = lengths
        if P >= self.layout.steps:
            raise ValueError(f"prompt_tokens: {P} steps leave no room in a window of {self.layout.steps} steps")
        for f in self.layout.fields:
            self.hist[f.key][:, :P] = prompt[f.key]
        self.prompt_steps = P

    # -- the Policy protocol ----------------------------------------------------------------------

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        """Envs ``env_ids`` start new episodes with ``seeds``: clear their histories, reseed their sampling."""
        ids = np.asarray(env_ids, np.int64)
        for i, s in zip(ids.tolist(), seeds):
            self.generators[i].manual_seed(int(s))
        self.n[ids] = self.prompt_steps
        idx = torch.as_tensor(ids, device=self.device)
        self.pending_valid_N[idx] = False
        if self.cache is not None:
            self.cache.valid[idx] = False  # masked as keys: the env's old episode is gone
        if self.prompt_steps:
            self.stale = True  # the prompt must be encoded again for these envs

    @torch.no_grad()
    def act(self, observations: Mapping[str, np.ndarray | list[str]]) -> np.ndarray:
        """Observations of all N envs (key -> (N, *shape) or list[str]) -> actions (N, *action_shape)."""
        return self.act_with_logits(observations)[0]

    @torch.no_grad()
    def act_with_logits(
        self, observations: Mapping[str, np.ndarray | list[str]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`act`, also returning the action ids (N, A) and the raw logits (N, A, V) they were chosen from."""
        N, A = self.num_envs, self.act_field.tokens
        obs = encode_observations(self.spec, observations, self.text_tokenizer)
        cur = {f"obs/{k}": v for k, v in obs.items()}
        for k, v in cur.items():
            if v.shape[0] != N:
                raise ValueError(f"observation {k[4:]!r}: expected {N} envs in the leading dimension, got {v.shape[0]}")
        if "sep" in self.hist:
            cur["sep"] = np.full((N, 1, 1), self.vocab.separator, np.int64)
        self._make_room()
        self.current = []
        pieces = [self.model.embed(self._torch(cur, add_step=True), self.pre_fields)[:2]]
        if self.use_cache:
            if self.stale or self.cache is None or self.cache.length + self.layout.step_tokens > self.cache.capacity:
                self._reencode()
            elif self.pending_valid_N.any():
                pieces.insert(0, self._embed_action(self.pending_N, A - 1, self.pending_valid_N))
        ids_NxA = torch.empty((N, A), dtype=torch.long, device=self.device)
        logits_NxAxV = torch.empty((N, A, self.vocab.size), device=self.device)
        for k in range(A):
            if k:
                pieces = [self._embed_action(ids_NxA[:, k - 1], k - 1)]
            logits_NxV = self._next_logits(pieces)
            logits_NxAxV[:, k] = logits_NxV
            ids_NxA[:, k] = self._choose(logits_NxV, k)
        if self.use_cache:
            # The last action token enters the cache with the next observation (one pass saved).
            self.pending_N = ids_NxA[:, -1].clone()
            self.pending_valid_N = torch.ones(N, dtype=torch.bool, device=self.device)

        ids = ids_NxA.cpu().numpy()
        rows = np.arange(N)
        for key, v in cur.items():
            self.hist[key][rows, self.n] = v
        self.hist[self.act_field.key][rows, self.n] = ids[..., None]
        self.n += 1
        return decode_actions(self.spec, ids), ids, logits_NxAxV.cpu().numpy()

    # -- internals --------------------------------------------------------------------------------

    def _torch(self, tokens: Mapping[str, np.ndarray], add_step: bool = False) -> dict[str, torch.Tensor]:
        """numpy (N, [E,] T, C) -> torch on the device; ``add_step`` inserts E = 1."""
        return {
            k: torch.from_numpy(np.ascontiguousarray(v[:, None] if add_step else v)).to(self.device)
            for k, v in tokens.items()
        }

    def _embed_action(
        self, ids_N: torch.Tensor, k: int, valid_N: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Action token k of every env as a (N, 1, D) piece at its local position."""
        tokens = {self.act_field.key: ids_N.view(-1, 1, 1, 1)}
        step_mask = None if valid_N is None else valid_N[:, None]
        return self.model.embed(tokens, [self.act_field], step_mask, pos0=self.act_offset + k)[:2]

    def _window(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every env's kept history as one (N, E_max * step_tokens, D) piece (padded steps invalid)."""
        e_max = int(self.n.max())
        if e_max == 0:
            return None
        tokens = self._torch({k: v[:, :e_max] for k, v in self.hist.items()})
        step_mask = torch.from_numpy(np.arange(e_max)[None, :] < self.n[:, None]).to(self.device)
        return self.model.embed(tokens, self.layout.fields, step_mask)[:2]

    def _make_room(self) -> None:
        """Envs whose next step would not fit the window drop their oldest episode steps (about half)."""
        P, E = self.prompt_steps, self.layout.steps
        full = np.flatnonzero(self.n + 1 > E)
        if not full.size:
            return
        keep = (E - P) // 2
        for i in full:  # rare: once per half window per env
            for a in self.hist.values():
                a[i, P : P + keep] = a[i, self.n[i] - keep : self.n[i]].copy()
        self.n[full] = P + keep
        self.stale = True

    def _reencode(self) -> None:
        """Rebuild the cache from the histories (after a drop, a prompted reset, or when it is full)."""
        if self.cache is None:
            self.cache = self.model.new_cache(self.num_envs, self.layout.steps * self.layout.step_tokens)
        window = self._window()
        if window is None:
            self.cache.clear()
        else:
            self.model.prefill(*window, self.cache)
        self.pending_valid_N.zero_()  # the histories already hold the last action tokens
        self.stale = False

    def _next_logits(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits (N, V) after appending ``pieces`` (each (x (N, L, D), valid (N, L)))."""
        x, valid = (torch.cat(t, dim=1) for t in zip(*pieces))
        if self.use_cache:
            hidden = self.model.extend(x, valid, self.cache)
        else:
            # Reference: the whole window and the current step so far, recomputed from scratch.
            self.current.append((x, valid))
            window = self._window()
            parts = ([window] if window is not None else []) + self.current
            hidden = self.model.trunk(*(torch.cat(t, dim=1) for t in zip(*parts)))
        return self.model.logits(hidden[:, -1]).float()

    def _choose(self, logits_NxV: torch.Tensor, k: int) -> torch.Tensor:
        """Legal id for action token k: greedy, or Gumbel-max sampling with each env's generator."""
        masked = logits_NxV.masked_fill(~self.legal_AxV[k], float("-inf"))
        if self.temperature == 0:
            return masked.argmax(dim=-1)
        # One draw per env from its own generator: the sample depends on the env's seed, not its slot.
        u = torch.stack([torch.rand(masked.shape[-1], generator=g) for g in self.generators]).to(self.device)
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))
        return (masked / self.temperature + gumbel).argmax(dim=-1)
