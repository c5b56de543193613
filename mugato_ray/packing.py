"""Packing: the valid tokens of padded sequence rows, moved into as few rows as they fit.

A task's rows have one fixed shape (``sequence.SequenceLayout``), so short episodes, VQA questions and
padded text fields leave most of a row as pads: a BabyAI-GoToRedBall row is about 63% real tokens, a
vqa-minigrid-color row about 20%. The model masks pads as attention keys, so they never change a real
token's output, but the transformer still computes them.

:func:`plan_packing` places each row's valid tokens, in order, into packed rows of at most ``capacity``
positions (first-fit decreasing over rows: a row's tokens are never split), and marks each packed
position with the index of the row it came from. The model then runs its blocks on the packed rows with
attention allowed only within one source row (:meth:`Packing.same_row_mask`). That is exact: a real
token sees the same keys in the same order as before (pads were masked anyway), and every position
encoding was added before packing. Only the number of positions computed changes.

The capacity is the layout's length or, where that saves more, the longest row's count of valid tokens
(then the rows rarely share a packed row, but the pads inside each timestep, such as a mission's unused
text tokens, are no longer computed). Either way a packed row never costs more attention than an unpacked
one, and a batch whose rows are all full is left alone (:func:`plan_packing` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Packing:
    """Where every valid token of a ``(B, L)`` batch sits in ``(P, capacity)`` packed rows."""

    rows: int
    """P: packed rows (at most the B source rows; a plan always computes fewer positions than B x L)."""
    capacity: int
    """Positions per packed row."""
    row_PxC: torch.Tensor
    """(P, capacity) long: the source row of each packed position, -1 where nothing was placed."""
    where_BxL: torch.Tensor
    """(B, L) long: each source position's flat packed index ``p * capacity + q``, -1 for pads."""

    @property
    def occupied_PxC(self) -> torch.Tensor:
        return self.row_PxC >= 0

    def pack(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (P, capacity, D): valid positions moved, the rest zeros."""
        B, L, D = x_BxLxD.shape
        out = x_BxLxD.new_zeros(self.rows * self.capacity, D)
        src = self.where_BxL.reshape(-1)
        keep = src >= 0
        out[src[keep]] = x_BxLxD.reshape(B * L, D)[keep]
        return out.reshape(self.rows, self.capacity, D)

    def gather(self, packed_PxCxD: torch.Tensor, b_N: torch.Tensor, j_N: torch.Tensor) -> torch.Tensor:
        """(N, D): the packed outputs at source positions ``(b_N, j_N)``, which must be valid."""
        flat = self.where_BxL[b_N, j_N]
        if bool((flat < 0).any()):
            raise ValueError("Packing.gather: a requested position is a pad; it has no packed place")
        return packed_PxCxD.reshape(-1, packed_PxCxD.shape[-1])[flat]

    def same_row_mask(self) -> torch.Tensor:
        """(P, capacity, capacity) bool: query q may see key k (k <= q, same source row, k occupied)."""
        r = self.row_PxC
        return (r[:, :, None] == r[:, None, :]) & (r[:, None, :] >= 0)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins for items of ``lengths`` (each <= ``capacity``): ``(bin_B, offset_B)`` per item.

    Items in order of decreasing length go to the first bin with room (ties keep input order, so
    the plan is deterministic). Uses at most 11/9 OPT + 1 bins.
    """
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError(f"first_fit_decreasing: an item of {int(lengths.max())} exceeds the capacity {capacity}")
    order = np.argsort(-lengths, kind="stable")
    free: list[int] = []
    bin_B = np.zeros(len(lengths), np.int64)
    offset_B = np.zeros(len(lengths), np.int64)
    for i in order:
        n = int(lengths[i])
        b = next((k for k, room in enumerate(free) if room >= n), len(free))
        if b == len(free):
            free.append(capacity)
        bin_B[i], offset_B[i] = b, capacity - free[b]
        free[b] -= n
    return bin_B, offset_B


def _place(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`first_fit_decreasing`, without its loop where no two items fit together: one bin each."""
    if len(lengths) < 2 or int(np.partition(lengths, 1)[:2].sum()) > capacity:
        if lengths.size and int(lengths.max()) > capacity:
            raise ValueError(f"_place: an item of {int(lengths.max())} exceeds the capacity {capacity}")
        return np.arange(len(lengths), dtype=np.int64), np.zeros(len(lengths), np.int64)
    return first_fit_decreasing(lengths, capacity)


def plan_packing(valid_BxL: torch.Tensor, capacity: int | None = None) -> Packing | None:
    """A :class:`Packing` of the valid tokens of ``valid_BxL`` into rows of ``capacity`` positions, or None
    when it would not compute fewer positions than the B x L of the batch.

    Default capacity: whichever of L and the longest row's valid count computes fewer positions (ties: the
    longest row's, the cheaper attention). Rows of L hold more rows each; rows of the longest row's length
    still drop the pads inside every timestep (a mission field's unused tokens), where no two rows fit in one.
    """
    B, L = valid_BxL.shape
    valid = valid_BxL.detach().cpu().numpy().astype(bool)
    lengths = valid.sum(axis=1)
    longest = int(lengths.max()) if B else 0
    if longest == 0:
        return None
    if capacity is not None:
        candidates = [capacity]
    else:  # every step computes this plan: skip the capacities that cannot save anything without placing rows
        candidates = [L] if int(lengths.sum()) <= (B - 1) * L else []
        candidates += [longest] if longest < L else []
    best = None
    for cap in candidates:
        bin_B, offset_B = _place(lengths, cap)
        rows = int(bin_B.max()) + 1
        if rows * cap < B * L and (best is None or rows * cap <= best[0] * best[1]):
            best = (rows, cap, bin_B, offset_B)
    if best is None:
        return None
    rows, capacity, bin_B, offset_B = best
    rank_BxL = np.cumsum(valid, axis=1) - 1
    where = np.where(valid, bin_B[:, None] * capacity + offset_B[:, None] + rank_BxL, -1)
    row_flat = np.full(rows * capacity, -1, np.int64)
    b_idx, _ = np.nonzero(valid)
    row_flat[where[valid]] = b_idx
    dev = valid_BxL.device
    return Packing(
        rows=rows,
        capacity=capacity,
        row_PxC=torch.from_numpy(row_flat.reshape(rows, capacity)).to(dev),
        where_BxL=torch.from_numpy(where.astype(np.int64)).to(dev),
    )
