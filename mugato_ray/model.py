"""The GATO model: one causal transformer over mixed-modality token sequences.

Input is the sequence row format (see ``mugato_ray.sequence``): per layout field a ``(B, E, T, C)``
tensor, int ids (C = 1) or uint8 image patches (C = patch*patch*channels), plus ``step_mask`` and
``prompt_mask`` ``(B, E)``. Every field is embedded to ``(B, E, T, D)``, the fields are concatenated
along T in timestep order and the steps are flattened: ``(B, E * step_tokens, D)``.

Embeddings (arXiv 2205.06175, section 2.2 and appendix C):

- ids: one table (:class:`TokenEmbedding`) for text, values, separator, pad and eos; a value id's
  row also carries learned smooth features of its bin, so that neighbouring bins are alike;
- image patches: uint8 is normalized here, on the device (4x fewer bytes through the data pipeline
  than float32): ``x / 127.5 - 1`` puts each pixel in [-1, 1] with a fixed scale (no per-patch
  min/max, which would depend on the patch's content), then dividing by ``sqrt(patch) = 4`` gives
  GATO's [-1/4, 1/4]. One ResNet v2 block (pre-activation GroupNorm + GELU, two 3x3 convs, a 1x1
  projection on the residual path) and a linear map give D; learnable row and column encodings
  (``patch_position_bins`` bins of the normalized patch interval; a uniformly sampled bin while
  training, the rounded mean in eval) are added;
- every token gets a learnable *local* position encoding: its position within its timestep; with
  ``model.rotary`` attention also rotates queries and keys by that local position (RoPE), so that two
  tokens of one field see their relative offset directly (a text document's characters, a mission's
  words). :meth:`embed` returns the local positions beside the embeddings; they travel with the tokens
  through packing and acting, and keys enter the KV cache already rotated, so moving cache entries
  (compaction, placement) keeps acting exact;
- with ``model.token_shift`` a token's input also gets a learned linear map of the previous valid token
  of its timestep (:func:`previous_in_step`), so one attention layer can match a token and read its
  predecessor (the first half of an induction circuit comes for free). The KV cache keeps each row's
  last valid token for the next call, so cached acting stays exact.

Positions and acting past the context: a token knows where it is within its timestep (local
position), where a patch is in its image (patch position), and which timestep of the *window* it
belongs to (a learned step-in-window encoding, index 0 at the window's first real timestep, prompt
steps included). Without the last one the causal transformer sees the window's observations as a
bag, with nothing that marks the current observation: behaviour cloning on CartPole with 42-step
windows stayed at chance (loss ln 2) for the 300 steps tried, while 2-step windows learned within
150. With it, 42-step windows learned too (71-76% action accuracy after 600-800 steps at lr 3e-3).
A relative recency bias (e.g. ALiBi over timestep distance) may learn faster. Training windows start
at random whole-timestep boundaries, so the model is trained on histories that begin mid-episode,
numbered from 0. A policy whose history would exceed the window drops its oldest whole timesteps and
re-encodes the kept window, numbered from 0 again (cached keys and values of layer >= 1 depend on
the dropped tokens, so they cannot be reused): exactly the computation training saw, hence no
train/act mismatch. To amortize the re-encoding, the policy drops enough steps to free about half of
the window at once. The step encoding is part of a token's input embedding, not of the attention,
so moving cache entries (compaction) keeps them exact.

Validity: a token is valid when its step is real (``step_mask``) and its id is not ``vocab.pad``
(image patches of a real step are always valid). Invalid tokens are masked as attention keys, so pads
and padded steps never influence real tokens, wherever they sit (this also lets acting mark the
cache entries of a finished episode invalid instead of rebuilding the cache). Each token may always
attend to itself, so an invalid query never has an empty row (which would give NaN).

Packing (``model.pack``, training only): since pads never influence a real token, the training forward
moves the real tokens of its rows into as few rows as they fit (of the layout's length, or of the longest
row's real tokens where that computes fewer positions) and lets each attend only within its source row
(:mod:`mugato_ray.packing`). The loss is unchanged; the pads of short episodes, questions and padded text
fields, those inside each timestep included, are simply not computed.

Loss: cross-entropy (HL-Gauss soft targets for continuous actions, see :meth:`GatoModel.action_loss`)
on action-field tokens (the action of agent tasks, the text of text tasks) of real, non-prompt steps
whose id is not pad. The prediction for a loss position j comes from the hidden state at the previous
VALID position (a cummax over valid indices), so pads inside a timestep never feed a prediction; a loss
position with no valid token before it is skipped. Logits
are computed only at those positions: the head dominates the cost of small models.

The output head is tied to the token embedding: an id means the same thing in and out (observation
values and action values share the value range), and it saves ``vocab.size * D`` parameters, a large
share of small models.

One forward path: training (:meth:`GatoModel.forward`), :meth:`GatoModel.full_logits` and cached
acting (:meth:`GatoModel.prefill` / :meth:`GatoModel.extend`) all run :meth:`GatoModel.embed` and
the same :class:`Block` stack through :meth:`GatoModel.trunk`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mugato_ray.config import ModelConfig
from mugato_ray.packing import plan_packing
from mugato_ray.sequence import STEP_MASK_KEY, LayoutField, SequenceLayout, flatten_ids
from mugato_ray.tokenizer import Modality, VocabLayout, mu_law_decode, undiscretize

PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 4, 256),
    "small": (4, 256, 8, 1024),
    "gato-79m": (8, 768, 24, 3072),
    "gato-364m": (12, 1536, 12, 6144),
    "gato-1.18b": (24, 2048, 16, 8192),
}
"""preset -> (blocks, width, heads, feed-forward width), GATO's table 1 for the gato-* sizes."""

PATCH_CHANNELS = 8
"""Channels inside the patch ResNet block. Its output is flattened (PATCH_CHANNELS * patch * patch)
and mapped to D; 8 keeps that linear map small next to the blocks of the CPU presets."""

CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    """A model checkpoint is missing, corrupt or of an unknown format; the message names the file."""


def resolve_sizes(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """``(n_layer, n_embd, n_head, d_ff)``: the preset, overridden by the fields that are not None."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
    preset = PRESETS[cfg.preset]
    n_layer, n_embd, n_head, d_ff = (
        p if v is None else v for v, p in zip((cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.d_ff), preset)
    )
    if min(n_layer, n_embd, n_head, d_ff) < 1:
        raise ValueError(
            f"model sizes must be positive, got n_layer={n_layer} n_embd={n_embd} n_head={n_head} d_ff={d_ff}"
        )
    if n_embd % n_head:
        raise ValueError(f"model.n_embd={n_embd} must be a multiple of model.n_head={n_head}")
    return n_layer, n_embd, n_head, d_ff


@dataclass
class ModelOutput:
    loss: torch.Tensor
    """Scalar: mean cross-entropy over the loss tokens (0 with a graph when there are none)."""
    num_loss_tokens: torch.Tensor
    """Scalar int64: how many tokens the mean is over (to weight micro-batches)."""
    num_correct: torch.Tensor | None = None
    """Scalar int64: loss tokens whose argmax prediction equals the target (token accuracy)."""
    logits: torch.Tensor | None = None
    """(num_loss_tokens, V) logits at the loss positions, when requested."""
    targets: torch.Tensor | None = None
    """(num_loss_tokens,) the target ids at those positions, with the logits."""
    num_tokens: torch.Tensor | None = None
    """Scalar int64: valid (non-pad) tokens of the batch."""
    num_positions: int = 0
    """Positions the blocks computed: B * L, or fewer when the rows were packed (``model.pack``)."""


# ---------------------------------------------------------------------------------------------
# Image patches


def normalize_patches(patches: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 patches -> float in [-1/sqrt(patch), 1/sqrt(patch)] (GATO: [-1, 1] then / sqrt(16) = 4)."""
    return (patches.float() / 127.5 - 1.0) / math.sqrt(patch)


def patch_position_ids(
    grid: tuple[int, int], bins: int, batch_shape: Sequence[int], *, sample: bool, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column bins ``(*batch_shape, rows*cols)`` int64 of the patches of a ``(rows, cols)`` grid.

    Patch row r covers the normalized interval ``[r/rows, (r+1)/rows)``, quantized to bins ``[lo, hi)``
    with ``lo = floor(r * bins / rows)`` and ``hi = max(lo + 1, floor((r+1) * bins / rows))``. With
    ``sample`` (training) each patch of each sample gets a uniform bin in ``[lo, hi)``; otherwise the
    rounded mean ``(lo + hi - 1) // 2``, which always lies inside the interval. Same for columns.
    """
    out = []
    for axis, n in enumerate(grid):
        i = torch.arange(n, device=device)
        lo = (i * bins) // n
        hi = torch.maximum(lo + 1, ((i + 1) * bins) // n)
        # Patch p of the raster order sits in row p // cols and column p % cols.
        p = torch.arange(grid[0] * grid[1], device=device)
        idx = p // grid[1] if axis == 0 else p % grid[1]
        lo_P, hi_P = lo[idx], hi[idx]
        if sample:
            u = torch.rand((*batch_shape, lo_P.numel()), device=device)
            ids = lo_P + torch.minimum((u * (hi_P - lo_P)).long(), hi_P - lo_P - 1)
        else:
            ids = ((lo_P + hi_P - 1) // 2).expand(*batch_shape, -1)
        out.append(ids)
    return out[0], out[1]


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class PatchEmbedding(nn.Module):
    """One ResNet v2 block over each normalized patch, then a linear map to D.

    ``(..., patch*patch*C) uint8 -> (..., D)``; C = 1 patches are repeated to 3 channels.
    """

    def __init__(self, patch: int, n_embd: int, channels: int = PATCH_CHANNELS):
        super().__init__()
        self.patch = patch
        self.norm1 = nn.GroupNorm(_groups(3), 3)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = nn.Conv2d(3, channels, 1)
        self.out = nn.Linear(channels * patch * patch, n_embd)

    def forward(self, patches: torch.Tensor, image_channels: int) -> torch.Tensor:
        p = self.patch
        lead = patches.shape[:-1]
        # Patches are flattened as (patch, patch, C) in C order; convolutions want (C, patch, patch).
        x = normalize_patches(patches, p).reshape(-1, p, p, image_channels).permute(0, 3, 1, 2)
        # GroupNorm gets contiguous (N, C, H, W) inputs: its backward segfaults on a channels-last
        # (permuted) input in torch 2.13 CPU. The convolutions get channels-last ones, which the CPU's
        # 8-channel kernels run faster forward and backward (1.0-1.3x on a BabyAI micro-batch here:
        # bench/model.py, "patch embedding"); the result is the same up to float rounding, and the
        # flattening before `out` stays (C, patch, patch), so checkpoints are unchanged.
        x = x.expand(-1, 3, -1, -1).contiguous()
        h = self.conv1(_channels_last(F.gelu(self.norm1(x))))
        h = self.conv2(_channels_last(F.gelu(self.norm2(h.contiguous()))))
        h = h + self.skip(_channels_last(x))
        return self.out(h.contiguous().flatten(1)).reshape(*lead, -1)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Ids


ORDINAL_INIT_STD = 0.02
"""Init std of the ordinal weights, as every other table. 0.5 (features dominating a value token from the
start) looked slightly better on Pendulum but, tied to the head, starts value logits ~10 nats high and
stalled the memorization test of text and image batches (bench/README.md, "Learning")."""

VALUE_SCALES = (0.3, 1.0, 3.0, 10.0)
"""Scales s of the ``tanh(x / s)`` features of a value bin's decoded value x (see :func:`value_features`)."""


def value_features(vocab: VocabLayout, mu: float, M: float) -> torch.Tensor:
    """(V, F) smooth features of every id; zeros for text, separator, pad and eos.

    For value ids, with ``c`` the bin's centre in (-1, 1) and ``x = mu_law_decode(c)`` the value it
    stands for as an observation: ``[c, c^2, tanh(x / s) for s in VALUE_SCALES]``. ``c`` and ``c^2`` are
    smooth in the bin (actions are binned linearly, so they are what the logits need: see
    :class:`TokenEmbedding`). mu-law squeezes observations (with mu=100, [0.5, 1] is 35 of 1,024
    bins), and a network reading ``c`` alone must learn to undo that before a typical controller is
    simple in it: an MLP behaviour-cloned on mu-law inputs scored 0.24 on Pendulum where raw inputs
    score 0.98; the multi-scale ``tanh`` features of x, which are close to linear at each scale,
    restored 0.98 (bench/README.md, "Learning").
    """
    lo, hi = vocab.ranges()["value"]
    centres = undiscretize(np.arange(vocab.value_bins), vocab.value_bins).astype(np.float64)
    c, x = torch.from_numpy(centres), torch.from_numpy(mu_law_decode(centres, mu, M))
    feats = [c, c**2, *(torch.tanh(x / s) for s in VALUE_SCALES)]
    out_VxF = torch.zeros(vocab.size, len(feats), dtype=torch.float64)
    out_VxF[lo:hi] = torch.stack(feats, dim=1)
    return out_VxF.float()


class TokenEmbedding(nn.Module):
    """One ``(V, D)`` table for every id, in and out (the head is tied to it).

    With ``value_order`` a value id's row is its own learned vector plus a learned linear map of its
    smooth features (:func:`value_features`): ``E[id] = W[id] + feats[id] @ ordinal``. GATO gives each
    of the 1,024 bins a vector of its own, learned from scratch, so neighbouring bins share nothing and
    bins that training rarely sees stay random. The features place every bin on smooth curves from the
    first update. Tied to the head, the same term adds ``c * (h.u) + c^2 * (h.v) + ...`` to the logits
    of value ids: with the quadratic, a peak whose place and width the hidden state sets, i.e. a smooth
    (Gaussian-shaped) distribution over neighbouring bins, which continuous actions need.
    """

    def __init__(self, vocab: VocabLayout, n_embd: int, value_order: bool, mu: float, M: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab.size, n_embd))
        self.register_buffer("features", value_features(vocab, mu, M), persistent=False)
        n_feat = self.features.shape[1]
        self.ordinal = nn.Parameter(torch.empty(n_feat, n_embd)) if value_order else None

    def table(self) -> torch.Tensor:
        """(V, D): the embedding of every id."""
        if self.ordinal is None:
            return self.weight
        return self.weight + self.features.to(self.weight.dtype) @ self.ordinal

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) int ids -> (..., D): the rows of :meth:`table`, computed for the looked-up ids only (acting
        embeds a few tokens per call; the whole table would cost V x F x D each time)."""
        x = F.embedding(ids, self.weight)
        if self.ordinal is None:
            return x
        return x + F.embedding(ids, self.features.to(self.weight.dtype)) @ self.ordinal


# ---------------------------------------------------------------------------------------------
# Transformer


@dataclass
class KVCache:
    """Keys and values of every layer for B sequences that grow in lockstep.

    ``k[i], v[i]``: (B, H, capacity, hd); ``valid``: (B, capacity) key validity; ``length``: filled
    positions (the same for all B; ``valid`` is False from ``length`` on). Only the valid keys of a row
    and their order matter, not where they sit: with no absolute positions, a row restarts by marking
    its entries invalid, :meth:`compact` squeezes the invalid entries out, and :meth:`place` writes rows
    encoded elsewhere. None of these recompute anything.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor
    length: int = 0
    prev_x: torch.Tensor | None = None
    """``model.token_shift``: each row's last valid input embedding (B, D) so far, for the next token."""
    prev_pos: torch.Tensor | None = None
    """``model.token_shift``: that token's local position (B,), -1 when the row has none."""

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def clear(self) -> None:
        self.valid.zero_()
        self.length = 0
        if self.prev_pos is not None:
            self.prev_pos.fill_(-1)

    def update(self, layer: int, k_BxHxLxd: torch.Tensor, v_BxHxLxd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at ``[length, length + L)``; return all keys/values so far."""
        end = self.length + k_BxHxLxd.shape[2]
        self.k[layer][:, :, self.length : end] = k_BxHxLxd
        self.v[layer][:, :, self.length : end] = v_BxHxLxd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def compact(self) -> None:
        """Move every row's valid entries, in order, to the front; ``length`` becomes the largest count.

        A gather per layer (memory traffic, no FLOPs): it reclaims the entries of finished episodes and
        of dropped windows, so later steps attend over fewer keys.
        """
        L = self.length
        valid_BxL = self.valid[:, :L]
        count_B = valid_BxL.sum(dim=1)
        new_len = int(count_B.max()) if L else 0
        # Valid positions first, each group in its original order (stable sort of "invalid").
        src_BxN = torch.sort((~valid_BxL).to(torch.uint8), dim=1, stable=True).indices[:, :new_len]
        B, H, C, hd = self.k[0].shape
        # Rows of hd floats of the flattened (B * H * C, hd) tensor: index_select copies them whole, about
        # 4x faster than a gather along dim 2 with an expanded index.
        bh_BxH = torch.arange(B * H, device=src_BxN.device).view(B, H) * C
        flat = (bh_BxH[:, :, None] + src_BxN[:, None, :]).reshape(-1)
        for t in (*self.k, *self.v):
            t[:, :, :new_len] = t.view(-1, hd).index_select(0, flat).view(B, H, new_len, hd)
        self.valid.zero_()
        self.valid[:, :new_len] = torch.arange(new_len, device=count_B.device)[None, :] < count_B[:, None]
        self.length = new_len

    def place(self, rows_R: torch.Tensor, src: KVCache) -> None:
        """Write the R rows of ``src`` (all its ``src.length`` entries) into rows ``rows_R`` of this cache.

        They are right-aligned to end at ``length`` (which grows when ``src`` is longer), so every later
        token comes after them. The rows' own entries must already be invalid: they are overwritten or
        stay masked.
        """
        W = src.length
        end = max(self.length, W)
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: placing {W} entries, capacity {self.capacity}")
        for dst, s in zip((*self.k, *self.v), (*src.k, *src.v)):
            dst[rows_R, :, end - W : end] = s[:, :, :W]
        self.valid[rows_R, end - W : end] = src.valid[:, :W]
        self.length = end
        if self.prev_pos is not None:
            self.prev_x[rows_R], self.prev_pos[rows_R] = src.prev_x, src.prev_pos


def rotary(pos_BxL: torch.Tensor, head_dim: int, dtype: torch.dtype, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles for integer positions: ``cos, sin`` of shape (B, L, 1, 1, head_dim // 2), to broadcast
    over the (query, key) and head dimensions of :func:`rotate`."""
    inv_freq = base ** (-torch.arange(0, head_dim // 2, device=pos_BxL.device, dtype=torch.float32) / (head_dim // 2))
    angle = pos_BxL.to(torch.float32)[:, :, None, None, None] * inv_freq
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate(x_BxLx2xHxd: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs ``(x[i], x[i + d/2])`` of the queries and keys together by their position's angles
    (one pass over both: on a CPU the elementwise passes, not the FLOPs, are the cost)."""
    cos, sin = cos_sin
    x1, x2 = x_BxLx2xHxd.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def previous_in_step(
    x_BxLxD: torch.Tensor,
    valid_BxL: torch.Tensor,
    pos_BxL: torch.Tensor,
    prev_x_BxD: torch.Tensor | None = None,
    prev_pos_B: torch.Tensor | None = None,
    source_row_BxL: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's previous valid token of the same timestep: its input embedding (B, L, D), zero where
    there is none. Returns that and each row's last valid token after these L (embedding (B, D), local
    position (B,), -1 for none), which a KV cache keeps for the next call.

    A timestep's local positions start at 0 and grow, so the previous valid token belongs to the same
    timestep exactly when its local position is lower (and, in packed rows, its source row is the same).
    Invalid tokens are skipped, as attention skips them: the answer does not depend on where pads sit.
    ``prev_x_BxD, prev_pos_B``: the row's last valid token before these L (a cache's), or none.
    """
    B, L, D = x_BxLxD.shape
    if prev_x_BxD is None:
        prev_x_BxD = x_BxLxD.new_zeros((B, D))
        prev_pos_B = torch.full((B,), -1, dtype=pos_BxL.dtype, device=pos_BxL.device)
    x_all = torch.cat((prev_x_BxD[:, None].to(x_BxLxD.dtype), x_BxLxD), dim=1)
    pos_all = torch.cat((prev_pos_B[:, None].to(pos_BxL.dtype), pos_BxL), dim=1)
    # Index 0 (the carried token) counts as valid; its position -1 marks "none".
    valid_all = F.pad(valid_BxL, (1, 0), value=True)
    last_BxL1 = torch.where(valid_all, torch.arange(L + 1, device=x_BxLxD.device), 0).cummax(dim=1).values
    src_BxL = last_BxL1[:, :-1]  # token t sits at index t + 1 of the "all" tensors: the last valid before it
    rows_Bx1 = torch.arange(B, device=x_BxLxD.device)[:, None]
    prev_pos_BxL = pos_all[rows_Bx1, src_BxL]
    same_BxL = (prev_pos_BxL >= 0) & (prev_pos_BxL < pos_BxL)
    if source_row_BxL is not None:
        row_all = F.pad(source_row_BxL, (1, 0), value=-1)
        same_BxL &= row_all[rows_Bx1, src_BxL] == source_row_BxL
    prev_BxLxD = x_all[rows_Bx1, src_BxL] * same_BxL[..., None].to(x_BxLxD.dtype)
    end_B = last_BxL1[:, -1]
    rows_B = rows_Bx1[:, 0]
    return prev_BxLxD, x_all[rows_B, end_B], pos_all[rows_B, end_B]


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(
        self,
        x_BxLxD: torch.Tensor,
        mask_Bx1xLxK: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        queries: int | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, L, D) -> (B, Q, D): every token is a key, only the last Q = ``queries`` (default L) are queries.
        ``rope``: the tokens' rotary angles (:func:`rotary`); keys enter the cache rotated."""
        B, L, D = x_BxLxD.shape
        qkv = self.qkv(x_BxLxD).view(B, L, 3, self.n_head, D // self.n_head)
        if rope is not None:
            qkv = torch.cat((rotate(qkv[:, :, :2], rope), qkv[:, :, 2:]), dim=2)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, L, hd) views, as SDPA likes them
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if queries is not None:
            q, mask_Bx1xLxK, L = q[:, :, L - queries :], mask_Bx1xLxK[:, :, L - queries :], queries
            if L == 0:
                return x_BxLxD[:, :0]
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU bf16 training (train.precision: bf16): the attention product stays fp32. In bf16 the demo
            # learned text-arith's exact answers far less well (fresh prompts 0.47 and 0.38 against 0.86 and
            # 0.81 with this, on the same seeds), and on the CPU it costs no time (bench/README.md,
            # "Training in bf16 on a CPU"). The projections around it still run in bf16.
            mask = mask_Bx1xLxK.float() if mask_Bx1xLxK is not None and mask_Bx1xLxK.is_floating_point() \
                else mask_Bx1xLxK
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_Bx1xLxK, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-LN transformer block; the only block implementation (training, full logits, cached acting)."""

    def __init__(self, n_embd: int, n_head: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, d_ff), nn.GELU(), nn.Linear(d_ff, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int, queries: int | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, L, D) -> (B, Q, D); ``queries``: only the last Q tokens get outputs (all give keys/values)."""
        h = self.attn(self.ln1(x), mask, cache, layer, queries, rope)
        x = x + self.drop(h) if queries is None else x[:, x.shape[1] - queries :] + self.drop(h)
        return x + self.drop(self.mlp(self.ln2(x)))


class GatoModel(nn.Module):
    """The GATO transformer. ``patch_size`` is the tokenizer's (``tokenizer.patch_size``): the patch
    embedding's input size depends on it."""

    def __init__(self, cfg: ModelConfig, vocab: VocabLayout, patch_size: int = 16, mu: float = 100.0,
                 M: float = 256.0):
        super().__init__()
        self.cfg, self.vocab, self.patch_size, self.mu, self.M = cfg, vocab, patch_size, mu, M
        n_layer, n_embd, n_head, d_ff = resolve_sizes(cfg)
        self.n_embd, self.n_head = n_embd, n_head
        self.tok_emb = TokenEmbedding(vocab, n_embd, cfg.value_order, mu, M)
        self.local_pos = nn.Embedding(cfg.context, n_embd)
        # Timestep within the window; a window holds at most `context` timesteps (one token each).
        self.step_pos = nn.Embedding(cfg.context, n_embd)
        self.patch_emb = PatchEmbedding(patch_size, n_embd)
        self.patch_row = nn.Embedding(cfg.patch_position_bins, n_embd)
        self.patch_col = nn.Embedding(cfg.patch_position_bins, n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        # model.token_shift: the previous token's embedding, mapped; no bias, so "no previous token" adds 0.
        self.shift = nn.Linear(n_embd, n_embd, bias=False) if cfg.token_shift else None
        self.blocks = nn.ModuleList(Block(n_embd, n_head, d_ff, cfg.dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # The output head is tied to the token table (see the module docstring): logits() reads it.
        self.apply(self._init)
        for name, p in self.named_parameters():
            # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
            # variance does not grow with depth.
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Embedding, TokenEmbedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, TokenEmbedding) and m.ordinal is not None:
            nn.init.normal_(m.ordinal, std=ORDINAL_INIT_STD)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (a tied weight once); ``non_embedding`` leaves out the lookup tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(e.weight.numel() for e in (self.local_pos, self.patch_row, self.patch_col))
        return n

    # -- embedding ------------------------------------------------------------------------------

    def _image_channels(self, field: LayoutField) -> int:
        c, rest = divmod(field.channels, self.patch_size**2)
        if rest or c not in (1, 3):
            raise ValueError(
                f"field {field.key!r}: {field.channels} channels per patch is not patch_size^2 * (1 or 3) "
                f"with patch_size={self.patch_size} (tokenizer.patch_size must match the model's)"
            )
        return c

    def embed(
        self,
        tokens: Mapping[str, torch.Tensor],
        fields: Sequence[LayoutField],
        step_mask_BxE: torch.Tensor | None = None,
        pos0: int = 0,
        step_index_BxE: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed consecutive fields of E timesteps.

        ``tokens[f.key]``: (B, E, T_f, C_f) ids or uint8 patches; T_f may be fewer than ``f.tokens`` (a
        partial field while acting). Local positions run from ``pos0`` over the fields in order.
        ``step_index_BxE``: each timestep's index in its window (None: add no step encoding; the
        policy then adds :meth:`step_embedding` itself, so that it can keep embedded histories whose
        steps move).
        Returns ``x (B, E*S, D)``, ``valid (B, E*S)``, ``ids (B, E*S)`` (pad at image positions) and
        ``pos (B, E*S)``, each token's local position (what :meth:`trunk` rotates by with ``model.rotary``),
        with S = sum of T_f.
        """
        xs, valids, ids = [], [], []
        for f in fields:
            t = tokens[f.key]
            if t.ndim != 4 or t.shape[3] != f.channels:
                raise ValueError(f"field {f.key!r}: expected (B, E, T, {f.channels}), got {tuple(t.shape)}")
            if f.is_image:
                if f.grid is None:
                    raise ValueError(f"image field {f.key!r} has no patch grid in its layout")
                B, E, T = t.shape[:3]
                rows, cols = patch_position_ids(
                    f.grid, self.cfg.patch_position_bins, (B, E), sample=self.training, device=t.device
                )
                x = (
                    self.patch_emb(t, self._image_channels(f))
                    + self.patch_row(rows[..., :T])
                    + self.patch_col(cols[..., :T])
                )
                xs.append(x)
                valids.append(torch.ones((B, E, T), dtype=torch.bool, device=t.device))
                ids.append(torch.full((B, E, T), self.vocab.pad, dtype=torch.long, device=t.device))
            else:
                i = t[..., 0].long()
                xs.append(self.tok_emb(i))
                valids.append(i != self.vocab.pad)
                ids.append(i)
        x = torch.cat(xs, dim=2)
        B, E, S, D = x.shape
        if pos0 + S > self.cfg.context:
            raise ValueError(
                f"a timestep of {pos0 + S} tokens exceeds model.context={self.cfg.context} local positions"
            )
        local_S = torch.arange(pos0, pos0 + S, device=x.device)
        x = x + self.local_pos(local_S)
        if step_index_BxE is not None:
            x = x + self.step_embedding(step_index_BxE)
        valid = torch.cat(valids, dim=2)
        if step_mask_BxE is not None:
            valid = valid & step_mask_BxE.bool()[:, :, None]
        return (self.drop(x.reshape(B, E * S, D)), valid.reshape(B, E * S), torch.cat(ids, dim=2).reshape(B, E * S),
                local_S.repeat(E).expand(B, E * S))

    def step_embedding(self, step_index_BxE: torch.Tensor) -> torch.Tensor:
        """(B, E) step-in-window indices -> (B, E, 1, D), to add to every token of those steps."""
        if step_index_BxE.numel() and int(step_index_BxE.max()) >= self.cfg.context:
            raise ValueError(f"a window of more than model.context={self.cfg.context} timesteps")
        return self.step_pos(step_index_BxE.long())[:, :, None, :]

    @staticmethod
    def window_steps(step_mask_BxE: torch.Tensor) -> torch.Tensor:
        """(B, E): each step's index among the real steps of its window (a masked step in the middle
        does not count, so a window with a gap encodes like the same window without it)."""
        return (step_mask_BxE.long().cumsum(dim=1) - 1).clamp(min=0)

    def _check_batch(self, batch: Mapping[str, torch.Tensor], layout: SequenceLayout) -> None:
        if layout.vocab is not None and layout.vocab != self.vocab:
            raise ValueError(f"task {layout.task!r}: the layout's vocab {layout.vocab} is not the model's {self.vocab}")
        for f in layout.fields:
            t = batch.get(f.key)
            if t is None:
                raise KeyError(f"task {layout.task!r}: batch has no field {f.key!r} (keys: {sorted(batch)})")
            if t.ndim != 4 or tuple(t.shape[2:]) != (f.tokens, f.channels) or t.shape[1] != layout.steps:
                raise ValueError(
                    f"task {layout.task!r}: field {f.key!r} has shape {tuple(t.shape)}, expected "
                    f"(B, {layout.steps}, {f.tokens}, {f.channels})"
                )

    # -- transformer ----------------------------------------------------------------------------

    def trunk(
        self,
        x_BxLxD: torch.Tensor,
        valid_BxL: torch.Tensor,
        cache: KVCache | None = None,
        outputs: int | None = None,
        source_row_BxL: torch.Tensor | None = None,
        pos_BxL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block stack: hidden states (B, L, D) before the final LayerNorm.

        Without a cache the L tokens attend causally among themselves; with one they are appended at
        ``cache.length`` and attend to every valid cached key before them as well. ``outputs``: return
        only the last ``outputs`` positions (B, outputs, D); the last block then computes attention and
        MLP for those alone, which is exact: the other tokens still give it their keys and values, the
        only thing a cache keeps (acting reads logits at the last position, or none after a prefill).
        ``source_row_BxL`` (packed rows, :mod:`mugato_ray.packing`): a token attends only to keys of
        the same source row. ``pos_BxL``: the tokens' local positions (:meth:`embed`), required with
        ``model.rotary`` or ``model.token_shift``.
        """
        B, L, _ = x_BxLxD.shape
        rope = None
        if self.cfg.rotary or self.cfg.token_shift:
            if pos_BxL is None or pos_BxL.shape != (B, L):
                option = "model.rotary" if self.cfg.rotary else "model.token_shift"
                raise ValueError(f"{option}: trunk needs the positions of its {B} x {L} tokens")
        if self.cfg.rotary:
            rope = rotary(pos_BxL, self.n_embd // self.n_head, x_BxLxD.dtype)
        dev = x_BxLxD.device
        start = 0 if cache is None else cache.length
        if cache is not None:
            if start + L > cache.capacity:
                raise ValueError(f"KV cache overflow: {start} + {L} tokens > capacity {cache.capacity}")
            cache.valid[:, start : start + L] = valid_BxL
            key_valid_BxK = cache.valid[:, : start + L]
        else:
            key_valid_BxK = valid_BxL
        q_pos = torch.arange(start, start + L, device=dev)[:, None]
        k_pos = torch.arange(start + L, device=dev)[None, :]
        # Causal AND the key is valid; a token always sees itself, so no row is empty (NaN).
        allowed_BxLxK = (k_pos <= q_pos)[None] & key_valid_BxK[:, None, :]
        if source_row_BxL is not None:
            if cache is not None:
                raise ValueError("packed rows are a training input; a KV cache holds unpacked rows")
            allowed_BxLxK = allowed_BxLxK & (source_row_BxL[:, :, None] == source_row_BxL[:, None, :])
        mask_Bx1xLxK = (allowed_BxLxK | (k_pos == q_pos)[None])[:, None]
        if cache is not None:
            # Additive form, built once for all layers: SDPA's CPU kernel converts a bool mask to this at
            # every call (a quarter of its time while acting). The cache's dtype is the queries' dtype.
            mask_Bx1xLxK = torch.zeros(mask_Bx1xLxK.shape, dtype=cache.k[0].dtype, device=dev).masked_fill_(
                ~mask_Bx1xLxK, float("-inf")
            )
        if self.shift is not None:
            x_BxLxD = self._add_previous(x_BxLxD, valid_BxL, pos_BxL, cache, source_row_BxL)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            x_BxLxD = block(x_BxLxD, mask_Bx1xLxK, cache, layer, outputs if layer == last else None, rope)
        if cache is not None:
            cache.length = start + L
        return x_BxLxD

    def _add_previous(self, x_BxLxD: torch.Tensor, valid_BxL: torch.Tensor, pos_BxL: torch.Tensor,
                      cache: KVCache | None, source_row_BxL: torch.Tensor | None) -> torch.Tensor:
        """``model.token_shift``: add the mapped previous token of each token's timestep; a cache carries each
        row's last token from call to call."""
        if cache is None:
            prev_BxLxD = previous_in_step(x_BxLxD, valid_BxL, pos_BxL, source_row_BxL=source_row_BxL)[0]
        else:
            prev_BxLxD, cache.prev_x, cache.prev_pos = previous_in_step(
                x_BxLxD, valid_BxL, pos_BxL, cache.prev_x, cache.prev_pos)
        return x_BxLxD + self.shift(prev_BxLxD)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> next-token logits (..., V)."""
        return F.linear(self.ln_f(hidden), self.tok_emb.table())

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty cache on the model's device and dtype."""
        p = self.tok_emb.weight
        hd = self.n_embd // self.n_head
        shape = (batch_size, self.n_head, capacity, hd)
        n = len(self.blocks)
        shift = self.cfg.token_shift
        return KVCache(
            k=[p.new_zeros(shape) for _ in range(n)],
            v=[p.new_zeros(shape) for _ in range(n)],
            valid=torch.zeros((batch_size, capacity), dtype=torch.bool, device=p.device),
            prev_x=p.new_zeros((batch_size, self.n_embd)) if shift else None,
            prev_pos=torch.full((batch_size,), -1, dtype=torch.long, device=p.device) if shift else None,
        )

    def prefill(
        self, x_BxLxD: torch.Tensor, valid_BxL: torch.Tensor, cache: KVCache, outputs: int | None = None,
        pos_BxL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Empty ``cache`` and fill it with L tokens; returns their hidden states (B, L, D), or the last
        ``outputs`` of them (0: fill the cache only)."""
        cache.clear()
        return self.trunk(x_BxLxD, valid_BxL, cache, outputs, pos_BxL=pos_BxL)

    def extend(
        self, x_BxLxD: torch.Tensor, valid_BxL: torch.Tensor, cache: KVCache, outputs: int | None = None,
        pos_BxL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append L tokens to ``cache``; returns their hidden states (B, L, D), or the last ``outputs``."""
        return self.trunk(x_BxLxD, valid_BxL, cache, outputs, pos_BxL=pos_BxL)

    # -- training -------------------------------------------------------------------------------

    def forward(
        self, batch: Mapping[str, torch.Tensor], layout: SequenceLayout, return_logits: bool = False
    ) -> ModelOutput:
        """Loss on one task's batch of sequence rows (see the module docstring for the targets)."""
        self._check_batch(batch, layout)
        step_BxE = batch[STEP_MASK_KEY].bool()
        x, _, _, pos_BxL = self.embed(batch, layout.fields, step_BxE, step_index_BxE=self.window_steps(step_BxE))
        # The row contract (sequence.flatten_ids): ids, validity, and the loss positions (action-role
        # fields of real, non-prompt steps whose id is not pad).
        ids_BxL, valid_BxL, loss_BxL = flatten_ids(batch, layout, self.vocab.pad)
        B, L = ids_BxL.shape
        # The prediction for j comes from the last valid position before j.
        pos_L = torch.arange(L, device=x.device)
        last_valid_BxL = torch.where(valid_BxL, pos_L, -1).cummax(dim=1).values
        prev_BxL = F.pad(last_valid_BxL[:, :-1], (1, 0), value=-1)
        b_idx, j_idx = (loss_BxL & (prev_BxL >= 0)).nonzero(as_tuple=True)
        packing = plan_packing(valid_BxL) if self.cfg.pack else None
        if packing is None:
            hidden_ND = self.trunk(x, valid_BxL, pos_BxL=pos_BxL)[b_idx, prev_BxL[b_idx, j_idx]]
            positions = B * L
        else:
            # Only RoPE and the token shift read positions.
            packed_pos = packing.pack(pos_BxL[..., None])[..., 0] if self.cfg.rotary or self.cfg.token_shift else None
            hidden = self.trunk(packing.pack(x), packing.occupied_PxC, source_row_BxL=packing.row_PxC,
                                pos_BxL=packed_pos)
            hidden_ND = packing.gather(hidden, b_idx, prev_BxL[b_idx, j_idx])
            positions = packing.rows * packing.capacity
        logits_NxV = self.logits(hidden_ND).float()
        targets_N = ids_BxL[b_idx, j_idx]
        n = torch.tensor(targets_N.numel(), device=x.device)
        if targets_N.numel():
            cont_S = torch.cat([torch.full((f.tokens,), f.loss and f.modality == Modality.CONTINUOUS)
                                for f in layout.fields]).to(x.device)
            loss = self.action_loss(logits_NxV, targets_N, cont_S[j_idx % layout.step_tokens])
        else:
            loss = logits_NxV.sum() * 0.0  # keeps the graph (and DDP's reducer) intact
        correct = (logits_NxV.argmax(-1) == targets_N).sum()
        return ModelOutput(
            loss=loss, num_loss_tokens=n, num_correct=correct,
            num_tokens=valid_BxL.sum(), num_positions=positions,
            logits=logits_NxV if return_logits else None, targets=targets_N if return_logits else None,
        )

    def action_loss(self, logits_NxV: torch.Tensor, targets_N: torch.Tensor, continuous_N: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over N loss tokens; continuous-action tokens against HL-Gauss targets.

        A continuous action's target bin t gets a soft target: the mass of a Gaussian centred on t with
        ``model.continuous_target_sigma`` bins of std that falls in each value bin (normalized over the
        value range). Neighbouring bins then count as nearly right, which one-hot cross-entropy over
        1,024 classes cannot express (bench/README.md, "Learning"). Other tokens keep one-hot targets.
        """
        logp_NxV = F.log_softmax(logits_NxV, dim=-1)
        nll_N = -logp_NxV.gather(1, targets_N[:, None])[:, 0]
        sigma = self.cfg.continuous_target_sigma
        if sigma > 0 and bool(continuous_N.any()):
            lo, hi = self.vocab.ranges()["value"]
            t_C = (targets_N[continuous_N] - lo).to(logits_NxV.dtype)
            edges_K = torch.arange(hi - lo + 1, device=logits_NxV.device, dtype=logits_NxV.dtype)
            cdf_CxK = torch.special.ndtr((edges_K[None, :] - (t_C[:, None] + 0.5)) / sigma)
            mass_CxB = cdf_CxK[:, 1:] - cdf_CxK[:, :-1]
            target_CxB = mass_CxB / mass_CxB.sum(dim=1, keepdim=True)
            nll_N = nll_N.masked_scatter(continuous_N, -(target_CxB * logp_NxV[continuous_N, lo:hi]).sum(dim=1))
        return nll_N.mean()

    def full_logits(self, batch: Mapping[str, torch.Tensor], layout: SequenceLayout) -> torch.Tensor:
        """(B, L, V): at every position j the logits predicting the token after j (for tests and acting references)."""
        self._check_batch(batch, layout)
        step_BxE = batch[STEP_MASK_KEY].bool()
        x, valid_BxL, _, pos_BxL = self.embed(batch, layout.fields, step_BxE,
                                              step_index_BxE=self.window_steps(step_BxE))
        return self.logits(self.trunk(x, valid_BxL, pos_BxL=pos_BxL))


def count_flops_per_token(model: GatoModel, seq_len: int, logit_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward): ``6 N + 12 n_layer D seq_len``.

    N counts the matmul parameters of the blocks and of the head (weighted by ``logit_fraction``, the
    fraction of positions that get logits: only loss positions do). The attention term counts the full
    L x L score and value products, as masked SDPA computes them (PaLM's convention).
    """
    blocks = sum(p.numel() for p in model.blocks.parameters())
    blocks += model.shift.weight.numel() if model.shift is not None else 0
    head = model.tok_emb.weight.numel() * logit_fraction
    return 6.0 * (blocks + head) + 12.0 * len(model.blocks) * model.n_embd * seq_len


# ---------------------------------------------------------------------------------------------
# Checkpoints


SAFETENSORS_SUFFIX = ".safetensors"
"""A model file with this suffix is safetensors (an export, ``mugato_ray.export``); any other is a torch file."""
SAFETENSORS_META_KEY = "mugato_ray.model"
"""The safetensors metadata entry holding :func:`model_meta` as JSON (the header's metadata is str -> str)."""


def model_meta(model: GatoModel) -> dict:
    """What rebuilds ``model`` besides its weights: ``{"format", "model_config", "vocab", "patch_size", "mu_law"}``."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": dataclasses.asdict(model.cfg),
        "vocab": {"text_size": model.vocab.text_size, "value_bins": model.vocab.value_bins},
        "patch_size": model.patch_size,
        "mu_law": {"mu": model.mu, "M": model.M},
    }


def _atomic_file(path: Path, write) -> Path:
    """``write(tmp_path)`` then rename over ``path``: a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_model(model: GatoModel, path: str | Path) -> Path:
    """Write the weights and :func:`model_meta` atomically: a torch file (``{**model_meta, "state_dict"}``), or
    safetensors when ``path`` ends in ``.safetensors`` (the metadata then lives in the file's header)."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        # Lazy: only exports write safetensors. Its save_model keeps one name of each group of tensors that
        # share memory (safetensors refuses shared tensors) and its load_model ties them again.
        from safetensors.torch import save_model as save_safetensors

        meta = {SAFETENSORS_META_KEY: json.dumps(model_meta(model))}
        return _atomic_file(path, lambda tmp: save_safetensors(model, tmp, metadata=meta))
    payload = {**model_meta(model), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    return _atomic_file(path, lambda tmp: torch.save(payload, tmp))


def build_model(meta: Mapping, path: Path) -> GatoModel:
    """The (untrained) GatoModel that :func:`model_meta` describes; CheckpointError naming ``path`` otherwise."""
    if not isinstance(meta, Mapping) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, Mapping) else type(meta).__name__
        raise CheckpointError(f"model checkpoint {path}: expected format {CHECKPOINT_FORMAT}, got {got!r}")
    try:
        cfg = ModelConfig(**meta["model_config"])
        vocab = VocabLayout(**meta["vocab"])
        mu_law = meta["mu_law"]
        return GatoModel(cfg, vocab, patch_size=int(meta["patch_size"]), mu=float(mu_law["mu"]), M=float(mu_law["M"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"model checkpoint {path} does not describe a GatoModel: {e}") from e


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> GatoModel:
    """Rebuild a model saved by :func:`save_model`, from either format; never executes code (torch files load
    ``weights_only``, safetensors is a JSON header and raw tensors: no pickle at all)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path).to(map_location)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"model checkpoint {path} is corrupt or not a torch file: {e}") from e
    model = build_model(payload, path)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"model checkpoint {path} does not describe a GatoModel: {e}") from e
    return model.to(map_location)


def _load_safetensors(path: Path) -> GatoModel:
    # Lazy: only exports are safetensors.
    from safetensors import safe_open
    from safetensors.torch import load_model as load_safetensors

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[SAFETENSORS_META_KEY])
    except KeyError:
        raise CheckpointError(f"model file {path} has no {SAFETENSORS_META_KEY!r} metadata: not a mugato-ray "
                              "export") from None
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"model file {path} is corrupt or not a safetensors file: {e}") from e
    model = build_model(meta, path)
    try:
        load_safetensors(model, str(path), strict=True)
    except Exception as e:  # a truncated body, a missing or misshapen tensor
        raise CheckpointError(f"model file {path} does not hold this GatoModel's weights: {e}") from e
    return model
