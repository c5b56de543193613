"""Acting with the model: a batched, KV-cached policy over N environments stepping in lockstep.

Each env keeps its history of tokenized timesteps in the layout's per-field form (the same
``(E, T, C)`` arrays a training row holds). On :meth:`ModelPolicy.act` the N observations are
tokenized, observation tokens and the separator are appended to every env's sequence, and the
action tokens are sampled one at a time: logits at the last position, restricted to the legal ids of
that action token, greedy (temperature 0) or sampled with the env's own generator (seeded from its
episode seed, so a result does not depend on the batch slot), appended, next token.

Greedy on a continuous action (``continuous_actions="mean"``, the default) takes the value bin nearest
the distribution's expected value, not its most likely bin. The model learns a distribution over 1,024
ordered bins; its mode jumps between bins that are nearly as likely, its mean does not. On the suite's
InvertedPendulum (four snapshots, 32 held-out episodes each) the mode balanced for 0.22-0.98 of the
episode limit, the mean for 0.93-1.00 (bench/README.md, "Continuous actions: the mean, not the mode").
``"argmax"`` keeps the most likely bin.

Window: an env's history never holds more than ``layout.steps`` timesteps (prompt steps included),
the window the model was trained on. When the next step would not fit, the env drops its oldest
episode steps (the prompt stays first, as in training), keeping about half of the window, and the
cache is re-encoded from the kept steps: with no absolute positions, this is exactly a training
window that starts mid-episode (see ``mugato_ray.model``).

Cache: one KV cache for all N envs, filled in lockstep, holding only what attention needs (see
``KVCache``: only the valid keys of a row and their order matter, not their positions):

- Text pads are masked keys whose outputs nothing reads, so each step's new tokens are packed (valid
  tokens only, right-aligned so that the last position is every env's last token) before they enter
  the model: a BabyAI step of 83 tokens (a 64-token mission, mostly pad) costs about 40.
- Only envs whose window changed are re-encoded, from their own histories: an env that drops steps or
  resets with a prompt. An env that starts an unprompted episode just marks its entries invalid. The
  histories are also kept embedded, so a re-encode runs the blocks only (no patch ResNet again), and
  the re-encode computes keys and values only (``outputs=0``).
- Invalid entries (finished episodes, dropped windows, pads between rows) are reclaimed by compacting
  the cache, a gather with no recomputation, when the next step would not fit or when at least
  ``RECLAIM_FRACTION`` of it is holes: attention reads every entry up to the cache's length.
- The last action token of a step is appended together with the next observation, which saves one
  forward pass per step, and the last block computes outputs for the last position only.

``use_cache=False`` re-encodes the whole window from the token histories for every token: the
reference that the cached path must match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

import numpy as np
import torch

from mugato_ray.config import ContinuousActions
from mugato_ray.model import GatoModel, KVCache
from mugato_ray.sequence import LayoutField, SequenceLayout
from mugato_ray.tokenizer import (
    Modality,
    SpaceSpec,
    continuous_action_values,
    decode_actions,
    encode_observations,
    legal_action_mask,
)

CONTINUOUS_ACTIONS = get_args(ContinuousActions)
"""How a greedy policy picks a continuous action's bin: nearest the expected value, or the most likely."""

RECLAIM_FRACTION = 0.25
"""Compact the cache once at least this fraction of its length can be reclaimed."""


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
        continuous_actions: ContinuousActions = "mean",
    ):
        if temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {temperature}")
        if continuous_actions not in CONTINUOUS_ACTIONS:
            raise ValueError(f"rollout.continuous_actions must be one of {CONTINUOUS_ACTIONS}, got {continuous_actions!r}")
        self.model = model.to(device).eval()
        self.spec, self.layout, self.text_tokenizer = spec, layout, text_tokenizer
        self.num_envs, self.temperature, self.use_cache = num_envs, temperature, use_cache
        self.device = torch.device(device)
        self.vocab = spec.vocab
        self.act_field = acting_field(spec, layout)
        self.pre_fields = layout.fields[:-1]  # observations and the separator
        self.act_offset = layout.offsets()[self.act_field.key]
        self.legal_AxV = torch.from_numpy(legal_mask(spec, self.act_field, layout.task)).to(self.device)
        # Greedy continuous actions by their expected value: the env value of every id, per action token.
        greedy_mean = continuous_actions == "mean" and temperature == 0
        values = continuous_action_values(spec) if greedy_mean and self.act_field.modality is Modality.CONTINUOUS else None
        self.values_AxV = None if values is None else torch.from_numpy(values).float().to(self.device)
        self._init_histories(num_envs, prompt_tokens)

    def _init_histories(self, num_envs: int, prompt_tokens: Mapping[str, np.ndarray] | None) -> None:
        layout = self.layout
        N, E = num_envs, layout.steps
        # Histories in the row format: (N, steps, T, C) per field; env i's first n[i] steps are real.
        self.hist = {
            f.key: np.zeros((N, E, f.tokens, f.channels), np.uint8)
            if f.is_image
            else np.full((N, E, f.tokens, f.channels), self.vocab.pad, np.int32)
            for f in layout.fields
        }
        if self.use_cache:
            # The same histories embedded (N, steps, step_tokens, D) and token validity: a re-encode reads
            # these instead of embedding its window again. The reference path re-embeds the tokens.
            S, D = layout.step_tokens, self.model.n_embd
            self.emb_hist = self.model.tok_emb.weight.new_zeros((N, E, S, D))
            self.emb_valid = torch.zeros((N, E, S), dtype=torch.bool, device=self.device)
        self.prompt_steps = 0
        if prompt_tokens is not None:
            self._set_prompt(prompt_tokens)
        self.n = np.full(N, self.prompt_steps, np.int64)
        self.generators = [torch.Generator().manual_seed(i) for i in range(N)]
        self.cache: KVCache | None = None
        self.fresh = np.ones(N, bool)  # envs whose cache rows must be re-encoded from their histories
        # The embedded last action token of every env's previous step, not yet in the cache.
        self.pending_NxD = self.model.tok_emb.weight.new_zeros((N, self.model.n_embd))
        self.pending_valid_N = torch.zeros(N, dtype=torch.bool, device=self.device)
        # Its local position: the action field's last, the same for every env (a constant, read by RoPE).
        self.pending_pos_N = torch.full((N,), self.act_offset + self.act_field.tokens - 1, device=self.device)
        self.current: list[Piece] = []  # this step's pieces (reference path)

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
        if self.use_cache:
            with torch.no_grad():
                x, valid = self.model.embed(
                    self._torch({k: v[:1, :P] for k, v in self.hist.items()}), self.layout.fields
                )[:2]
            self.emb_hist[:, :P] = x.view(P, *self.emb_hist.shape[2:])
            self.emb_valid[:, :P] = valid.view(P, -1)
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
            self.fresh[ids] = True  # the prompt must be encoded again for these envs

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
        cur = self._step_tokens(observations)
        self._make_room()
        self.current = []
        # Histories keep embeddings without the step-in-window encoding (their steps move when the window
        # slides); every piece that enters the transformer gets it added: this step's index is n.
        self.step_NxD = self.model.step_embedding(torch.from_numpy(self.n).to(self.device)[:, None])[:, 0]
        pre_x, pre_valid, _, pre_pos = self.model.embed(self._torch(cur, add_step=True), self.pre_fields)
        pieces = [(pre_x + self.step_NxD, pre_valid, pre_pos)]
        if self.use_cache:
            self._refresh_cache()
            if self.pending_valid_N.any():
                pieces.insert(0, (self.pending_NxD[:, None], self.pending_valid_N[:, None], self.pending_pos_N[:, None]))
            pieces = [pack_valid(*(torch.cat(t, dim=1) for t in zip(*pieces)))]
            if self.cache.length + pieces[0][0].shape[1] + A - 1 > self.cache.capacity:
                self.cache.compact()
        ids_NxA = torch.empty((N, A), dtype=torch.long, device=self.device)
        logits_NxAxV = torch.empty((N, A, self.vocab.size), device=self.device)
        for k in range(A):
            if k:
                pieces = [self._embed_action(ids_NxA[:, k - 1], k - 1)]
            logits_NxV = self._next_logits(pieces)
            logits_NxAxV[:, k] = logits_NxV
            ids_NxA[:, k] = self._choose(logits_NxV, k)
        ids = ids_NxA.cpu().numpy()
        rows = np.arange(N)
        if self.use_cache:
            act_x, act_valid = self.model.embed(
                {self.act_field.key: ids_NxA.view(N, 1, A, 1)}, [self.act_field], pos0=self.act_offset
            )[:2]
            rows_t, n_t = torch.from_numpy(rows).to(self.device), torch.from_numpy(self.n).to(self.device)
            self.emb_hist[rows_t, n_t] = torch.cat([pre_x, act_x], dim=1)
            self.emb_valid[rows_t, n_t] = torch.cat([pre_valid, act_valid], dim=1)
            # The last action token enters the cache with the next observation (one pass saved).
            self.pending_NxD, self.pending_valid_N = (act_x + self.step_NxD)[:, -1], act_valid[:, -1]
        for key, v in cur.items():
            self.hist[key][rows, self.n] = v
        self.hist[self.act_field.key][rows, self.n] = ids[..., None]
        self.n += 1
        return decode_actions(self.spec, ids), ids, logits_NxAxV.cpu().numpy()

    @torch.no_grad()
    def answer(self, observations: Mapping[str, np.ndarray | list[str]], prefixes: Sequence[Sequence[int]],
               max_new: Sequence[int], seeds: Sequence[int]) -> list[np.ndarray]:
        """Text answers of N one-step examples of a dataset task (text, VQA), with the cache and token loop of
        :meth:`act`.

        Every row starts a fresh episode (``seeds`` seed its sampling); the observations (VQA: image and
        question; none for a text task) and the separator come first, then the text action field, which
        starts with ``prefixes[i]`` (a text task's prompt is the start of that field; VQA: empty) and goes on
        with up to ``max_new[i]`` ids chosen as in :meth:`act` (text ids or eos; greedy, or sampled), within
        the field. Returns each row's chosen ids.
        """
        N, A = self.num_envs, self.act_field.tokens
        if not len(prefixes) == len(max_new) == len(seeds) == N:
            raise ValueError(f"answer: expected {N} prefixes, budgets and seeds")
        length_N = np.asarray([len(p) for p in prefixes], np.int64)
        if (not self.pre_fields and (length_N < 1).any()) or (length_N >= A).any():
            raise ValueError(f"task {self.layout.task!r}: each prompt needs 1 to {A - 1} tokens "
                             f"(lengths {length_N.tolist()})")
        budget_N = np.minimum(np.asarray(max_new, np.int64), A - length_N)
        self.cache, self.current = None, []  # one-step episodes: every call starts from an empty cache
        self.reset(range(N), seeds)
        self.step_NxD = self.model.step_embedding(torch.zeros((N, 1), dtype=torch.long, device=self.device))[:, 0]
        # One pass over the observations, the separator and every row's prompt (right-padded: pads are
        # masked keys and positions are local, so a gap changes nothing), packed so that the last column
        # is each row's last real token; then one token per pass, each row at its own local position.
        pieces = [self._prompt_piece(observations, prefixes, length_N)]
        steps = int(budget_N.max()) if N else 0
        if self.use_cache:  # room for the longest prompt and the longest answer (rows past theirs go on, ignored)
            self.cache = self.model.new_cache(N, pieces[0][0].shape[1] + steps)
            self._refresh_cache()
        ids_NxS = torch.full((N, steps), self.vocab.pad, dtype=torch.long, device=self.device)
        for s in range(steps):
            ids_NxS[:, s] = self._choose(self._next_logits(pieces), 0)  # a text field: every token, one mask
            pieces = [self._embed_action_rows(ids_NxS[:, s], np.minimum(length_N + s, A - 1))]
        ids = ids_NxS.cpu().numpy()
        return [ids[i, : budget_N[i]] for i in range(N)]

    def _prompt_piece(self, observations: Mapping[str, np.ndarray | list[str]], prefixes: Sequence[Sequence[int]],
                      length_N: np.ndarray) -> Piece:
        """Observations and separator (VQA) and the prompts' tokens in the action field, embedded and packed."""
        N, parts = self.num_envs, []
        if self.pre_fields:
            pre_x, pre_valid, _, pre_pos = self.model.embed(
                self._torch(self._step_tokens(observations), add_step=True), self.pre_fields)
            parts.append((pre_x + self.step_NxD, pre_valid, pre_pos))
        width = int(length_N.max()) if N else 0
        if width:
            prompt_NxW = np.full((N, width), self.vocab.pad, np.int64)
            for i, p in enumerate(prefixes):
                prompt_NxW[i, : len(p)] = p
            tokens = {self.act_field.key: torch.from_numpy(prompt_NxW).to(self.device).view(N, 1, width, 1)}
            x, valid, _, pos = self.model.embed(tokens, [self.act_field], pos0=self.act_offset)
            parts.append((x + self.step_NxD, valid, pos))
        return pack_valid(*(torch.cat(t, dim=1) for t in zip(*parts)), keep_last=False, align=True)

    def _embed_action_rows(self, ids_N: torch.Tensor, k_N: np.ndarray) -> Piece:
        """Action token ``k_N[i]`` of every env i as a (N, 1, D) piece, each at its own local position."""
        x = self.model.tok_emb.weight.new_empty((ids_N.shape[0], 1, self.model.n_embd))
        valid = torch.ones((ids_N.shape[0], 1), dtype=torch.bool, device=self.device)
        for k in np.unique(k_N):  # rows at the same position embed together
            rows = torch.from_numpy(np.flatnonzero(k_N == k)).to(self.device)
            tokens = {self.act_field.key: ids_N[rows].view(-1, 1, 1, 1)}
            x[rows] = self.model.embed(tokens, [self.act_field], pos0=self.act_offset + int(k))[0] + self.step_NxD[rows]
        return x, valid, torch.from_numpy(self.act_offset + k_N).to(self.device)[:, None]

    # -- internals --------------------------------------------------------------------------------

    def _step_tokens(self, observations: Mapping[str, np.ndarray | list[str]]) -> dict[str, np.ndarray]:
        """One timestep's observation tokens of all N envs, and the separator: layout key -> (N, T, C)."""
        N = self.num_envs
        obs = encode_observations(self.spec, observations, self.text_tokenizer)
        cur = {f"obs/{k}": v for k, v in obs.items()}
        for k, v in cur.items():
            if v.shape[0] != N:
                raise ValueError(f"observation {k[4:]!r}: expected {N} envs in the leading dimension, got {v.shape[0]}")
        if "sep" in self.hist:
            cur["sep"] = np.full((N, 1, 1), self.vocab.separator, np.int64)
        return cur

    def _torch(self, tokens: Mapping[str, np.ndarray], add_step: bool = False) -> dict[str, torch.Tensor]:
        """numpy (N, [E,] T, C) -> torch on the device; ``add_step`` inserts E = 1."""
        return {
            k: torch.from_numpy(np.ascontiguousarray(v[:, None] if add_step else v)).to(self.device)
            for k, v in tokens.items()
        }

    def _embed_action(self, ids_N: torch.Tensor, k: int) -> Piece:
        """Action token k of every env as a (N, 1, D) piece at its local position."""
        tokens = {self.act_field.key: ids_N.view(-1, 1, 1, 1)}
        x, valid, _, pos = self.model.embed(tokens, [self.act_field], pos0=self.act_offset + k)
        return x + self.step_NxD, valid, pos

    def _window(self) -> Piece | None:
        """Every env's kept history embedded from its tokens: (N, E_max * step_tokens, D), padded steps invalid."""
        e_max = int(self.n.max())
        if e_max == 0:
            return None
        tokens = self._torch({k: v[:, :e_max] for k, v in self.hist.items()})
        step_mask = torch.from_numpy(np.arange(e_max)[None, :] < self.n[:, None]).to(self.device)
        steps = self.model.window_steps(step_mask)
        x, valid, _, pos = self.model.embed(tokens, self.layout.fields, step_mask, step_index_BxE=steps)
        return x, valid, pos

    def _embedded_window(self, rows: np.ndarray) -> Piece | None:
        """:meth:`_window` of envs ``rows`` from the embedded histories: (R, E_max * step_tokens, D), (R, ...)."""
        n = self.n[rows]
        e_max = int(n.max()) if n.size else 0
        if e_max == 0:
            return None
        rows_t = torch.from_numpy(rows).to(self.device)
        step_mask = torch.from_numpy(np.arange(e_max)[None, :] < n[:, None]).to(self.device)
        x = self.emb_hist[rows_t, :e_max] + self.model.step_embedding(self.model.window_steps(step_mask))
        valid = self.emb_valid[rows_t, :e_max] & step_mask[:, :, None]
        pos = torch.arange(self.layout.step_tokens, device=self.device).repeat(e_max).expand(rows.size, -1)
        return x.reshape(rows.size, -1, x.shape[-1]), valid.reshape(rows.size, -1), pos

    def _make_room(self) -> None:
        """Envs whose next step would not fit the window drop their oldest episode steps (about half)."""
        P, E = self.prompt_steps, self.layout.steps
        full = np.flatnonzero(self.n + 1 > E)
        if not full.size:
            return
        keep = (E - P) // 2
        # Env i keeps its steps [n_i - keep, n_i), moved to [P, P + keep); the right side is a copy.
        dst_FxK = (full[:, None], P + np.arange(keep)[None, :])
        src_FxK = (full[:, None], (self.n[full] - keep)[:, None] + np.arange(keep)[None, :])
        for a in self.hist.values():
            a[dst_FxK] = a[src_FxK]
        if self.use_cache:
            dst_t, src_t = (tuple(torch.from_numpy(i).to(self.device) for i in ix) for ix in (dst_FxK, src_FxK))
            for t in (self.emb_hist, self.emb_valid):
                t[dst_t] = t[src_t]
        self.n[full] = P + keep
        self.fresh[full] = True

    def _refresh_cache(self) -> None:
        """Re-encode the envs whose window changed (each from its own history), reclaim holes when cheap."""
        if self.cache is None:
            self.cache = self.model.new_cache(self.num_envs, self.layout.steps * self.layout.step_tokens)
        rows = np.flatnonzero(self.fresh)
        if rows.size:
            rows_t = torch.from_numpy(rows).to(self.device)
            self.cache.valid[rows_t] = False
            self.pending_valid_N[rows_t] = False  # the histories already hold the last action tokens
            window = self._embedded_window(rows)
            x, valid, pos = pack_valid(*window, keep_last=False) if window is not None else (None, None, None)
            if x is not None and x.shape[1]:
                encoded = self.model.new_cache(rows.size, x.shape[1])
                self.model.prefill(x, valid, encoded, outputs=0, pos_BxL=pos)  # keys/values only
                self.cache.place(rows_t, encoded)
            self.fresh[:] = False
        # Attention reads every entry up to length; a compaction costs about one read and write of the
        # cache, which a step's attention over that many more keys already exceeds.
        if self.cache.length and int(self.cache.valid.sum(dim=1).max()) <= (1 - RECLAIM_FRACTION) * self.cache.length:
            self.cache.compact()

    def _next_logits(self, pieces: list[Piece]) -> torch.Tensor:
        """Logits (N, V) after appending ``pieces``."""
        x, valid, pos = (torch.cat(t, dim=1) for t in zip(*pieces))
        if self.use_cache:
            hidden = self.model.extend(x, valid, self.cache, outputs=1, pos_BxL=pos)
        else:
            # Reference: the whole window and the current step so far, recomputed from scratch.
            self.current.append((x, valid, pos))
            window = self._window()
            parts = ([window] if window is not None else []) + self.current
            x, valid, pos = (torch.cat(t, dim=1) for t in zip(*parts))
            hidden = self.model.trunk(x, valid, pos_BxL=pos)
        return self.model.logits(hidden[:, -1]).float()

    def _choose(self, logits_NxV: torch.Tensor, k: int) -> torch.Tensor:
        """Legal id for action token k: greedy, or Gumbel-max sampling with each env's generator."""
        masked = logits_NxV.masked_fill(~self.legal_AxV[k], float("-inf"))
        if self.values_AxV is not None:
            return self._nearest_to_mean(masked, k)
        if self.temperature == 0:
            return masked.argmax(dim=-1)
        # One draw per env from its own generator: the sample depends on the env's seed, not its slot.
        u = torch.stack([torch.rand(masked.shape[-1], generator=g) for g in self.generators]).to(self.device)
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))
        return (masked / self.temperature + gumbel).argmax(dim=-1)

    def _nearest_to_mean(self, masked_NxV: torch.Tensor, k: int) -> torch.Tensor:
        """The legal id whose value is nearest the expected value of action token k's distribution."""
        values_V = self.values_AxV[k]
        mean_N = torch.softmax(masked_NxV.float(), dim=-1) @ values_V
        distance_NxV = (values_V[None, :] - mean_N[:, None]).abs().masked_fill(~self.legal_AxV[k], float("inf"))
        return distance_NxV.argmin(dim=-1)


Piece = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Tokens on their way into the transformer: embeddings (N, L, D), validity (N, L), local positions (N, L)."""


def acting_field(spec: SpaceSpec, layout: SequenceLayout) -> LayoutField:
    """The layout's one action field, checked to be last in the timestep and to follow the spec's observations."""
    task, keys = layout.task, [f.key for f in layout.fields]
    act = [f for f in layout.fields if f.role == "action"]
    if len(act) != 1 or layout.fields[-1] is not act[0]:
        raise ValueError(f"task {task!r}: acting needs one action field, last in the timestep; got fields {keys}")
    obs_keys = [f.key for f in layout.fields[:-1] if f.role == "observation"]
    spec_keys = [f"obs/{f.key}" for f in spec.observation]
    if obs_keys != spec_keys:
        raise ValueError(f"task {task!r}: layout observation fields {obs_keys} differ from the spec's {spec_keys}")
    return act[0]


def legal_mask(spec: SpaceSpec, act_field: LayoutField, task: str) -> np.ndarray:
    """``(action tokens, V)``: the ids each action token may take. A text action (a dataset task's answer)
    may take any text id or eos; an env action the ids of its values (``tokenizer.legal_action_mask``)."""
    if act_field.modality is Modality.TEXT:
        legal_V = np.zeros(spec.vocab.size, bool)
        legal_V[: spec.vocab.text_size] = True
        legal_V[spec.vocab.eos] = True
        return np.broadcast_to(legal_V, (act_field.tokens, spec.vocab.size)).copy()
    legal = legal_action_mask(spec)
    if legal.shape[0] != act_field.tokens:
        raise ValueError(f"task {task!r}: the spec has {legal.shape[0]} action tokens, the layout "
                         f"{act_field.tokens}")
    return legal


def pack_valid(
    x_BxLxD: torch.Tensor, valid_BxL: torch.Tensor, pos_BxL: torch.Tensor, keep_last: bool = True,
    align: bool = False,
) -> Piece:
    """Drop each row's invalid tokens and right-align the rest: (B, W, D), (B, W), (B, W) with W the largest
    count (``pos``: the tokens' local positions, moved with them).

    Exact for everything acting reads: an invalid token is masked as a key, and its own output is only
    read when it is the last token (kept with ``keep_last``: the logits come from there). Shorter rows
    are padded on the left with invalid entries. ``align``: rows whose last token is invalid (right-padded
    prompts) are always right-aligned, so that the last column is each row's last valid token.
    """
    B, L, D = x_BxLxD.shape
    keep_BxL = valid_BxL.clone()
    if keep_last:
        keep_BxL[:, -1] = True
    count_B = keep_BxL.sum(dim=1)
    W = int(count_B.max())
    if W == L and not (align and not bool(keep_BxL[:, -1].all())):
        # some row keeps every token and every row ends with a kept token: the unpacked rows are exact
        return x_BxLxD, valid_BxL, pos_BxL
    # Kept positions first, in order; output slot j of row b takes kept token j - (W - count_b).
    order_BxL = torch.sort((~keep_BxL).to(torch.uint8), dim=1, stable=True).indices
    slot_BxW = torch.arange(W, device=x_BxLxD.device)[None, :] - (W - count_B)[:, None]
    src_BxW = order_BxL.gather(1, slot_BxW.clamp(min=0))
    valid_out = (slot_BxW >= 0) & valid_BxL.gather(1, src_BxW)
    return x_BxLxD.gather(1, src_BxW[..., None].expand(B, W, D)), valid_out, pos_BxL.gather(1, src_BxW)
