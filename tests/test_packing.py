"""Packing: the real tokens of padded rows moved into fewer rows, exactly (same loss and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mugato_ray.packing import first_fit_decreasing, plan_packing
from tests.test_model import VOCAB, _loss_and_grads, agent_layout, make_batch, text_layout, tiny_model


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=30), st.integers(20, 40))
def test_first_fit_decreasing_places_every_item_without_overlap(lengths, capacity):
    lengths = np.asarray(lengths)
    bin_B, offset_B = first_fit_decreasing(lengths, capacity)
    used = {}
    for n, b, o in zip(lengths, bin_B, offset_B):
        assert 0 <= o and o + n <= capacity
        for q in range(o, o + n):
            assert (b, q) not in used  # no two items share a position
            used[(b, q)] = True
    # First fit: an item opened a new bin only when no earlier bin had room, so any two bins hold more
    # than the capacity together, hence fewer than 2 * total / capacity + 1 bins.
    bins = int(bin_B.max()) + 1
    assert bins == 1 or bins < 2 * lengths.sum() / capacity + 1
    again = first_fit_decreasing(lengths, capacity)
    assert (again[0] == bin_B).all() and (again[1] == offset_B).all()


def test_plan_packing_keeps_order_and_source_rows():
    valid = torch.tensor([
        [1, 1, 0, 0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
    ], dtype=torch.bool)
    p = plan_packing(valid, capacity=8)
    assert p is not None and p.rows == 2 and p.capacity == 8  # 3 + 1 + 5 + 2 = 11 tokens in 2 rows
    assert (plan_packing(valid).rows, plan_packing(valid).capacity) == (3, 5)  # 15 positions beat 16
    for b in range(4):
        flat = p.where_BxL[b][valid[b]]
        assert (flat[1:] > flat[:-1]).all()  # the row's order survives
        assert (p.row_PxC.reshape(-1)[flat] == b).all()
        assert (flat // 8 == flat[0] // 8).all()  # never split over two packed rows
    assert (p.where_BxL[~valid] == -1).all()
    assert int(p.occupied_PxC.sum()) == int(valid.sum())
    x = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8, 1)
    packed = p.pack(x)
    b, j = valid.nonzero(as_tuple=True)
    assert torch.equal(p.gather(packed, b, j)[:, 0], x[b, j, 0])
    with pytest.raises(ValueError, match="pad"):
        p.gather(packed, torch.tensor([0]), torch.tensor([2]))


def test_no_plan_when_packing_saves_no_position():
    assert plan_packing(torch.ones(4, 8, dtype=torch.bool)) is None
    assert plan_packing(torch.ones(1, 8, dtype=torch.bool)) is None
    full_and_two_fives = torch.arange(8)[None] < torch.tensor([8, 5, 5])[:, None]  # 3 rows of 8 however placed
    assert plan_packing(full_and_two_fives) is None
    assert plan_packing(torch.zeros(3, 8, dtype=torch.bool)) is None  # nothing to compute


def valid_rows(lengths: list[int], L: int = 8) -> torch.Tensor:
    """Rows of ``L`` positions with ``lengths`` valid tokens each, their pads spread inside the row (as a
    mission field's unused tokens sit inside every timestep)."""
    rows = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        rows[b, torch.linspace(0, L - 1, n).round().long()] = True
    assert rows.sum(dim=1).tolist() == lengths
    return rows


def test_rows_that_do_not_fit_together_drop_their_pads():
    """No two rows of 5 valid tokens fit in 8 positions, but their pads need not be computed: 3 rows of 5. The
    capacity is whichever of L and the longest row computes fewer positions."""
    valid = valid_rows([5, 5, 4])
    p = plan_packing(valid)
    assert p is not None and (p.rows, p.capacity) == (3, 5)
    for b in range(3):
        flat = p.where_BxL[b][valid[b]]
        assert (flat[1:] > flat[:-1]).all() and (p.row_PxC.reshape(-1)[flat] == b).all()
    assert int(p.occupied_PxC.sum()) == int(valid.sum())
    x = torch.randn(3, 8, 2)
    b, j = valid.nonzero(as_tuple=True)
    assert torch.equal(p.gather(p.pack(x), b, j), x[b, j])
    # Rows of 5 (3 x 5 = 15) beat rows of 8 where a short row joins one of 5 (2 x 8 = 16) ...
    p = plan_packing(valid_rows([5, 5, 1]))
    assert (p.rows, p.capacity) == (3, 5)
    # ... and rows of 8 win where they hold two rows each (2 x 8 = 16 against 3 x 6 = 18).
    p = plan_packing(valid_rows([6, 2, 5]))
    assert (p.rows, p.capacity) == (2, 8)
    # One row alone is compacted too.
    p = plan_packing(valid_rows([3]))
    assert (p.rows, p.capacity) == (1, 3)


@pytest.mark.parametrize("layout_name,rotary,token_shift", [
    ("agent", False, False), ("text", False, False), ("agent", True, False), ("text", True, False),
    ("agent", False, True), ("text", False, True),
    ("no two fit", False, False), ("no two fit", True, False), ("no two fit", False, True)])
def test_packed_forward_equals_unpacked_and_computes_fewer_positions(layout_name, rotary, token_shift):
    """The model trains on packed rows (fails if packing is bypassed) with the unpacked loss and gradients
    (with rotary positions too: each token keeps its own local position in the packed row; with the token
    shift, a row's first token does not see the previous row's last one)."""
    if layout_name == "agent":
        layout = agent_layout(steps=4)
        batch = make_batch(layout, [1, 2, 1, 1, 4, 1, 2, 1], seed=3, prompt_steps=1)
    elif layout_name == "no two fit":  # rows of 3 steps of 4: packed rows as long as the longest row
        layout = agent_layout(steps=4)
        batch = make_batch(layout, [3] * 8, seed=3, prompt_steps=1)
    else:
        layout = text_layout(tokens=24)
        batch = make_batch(layout, [1] * 8, seed=3)
    packed_model = tiny_model(rotary=rotary, token_shift=token_shift).eval()  # eval: no sampled patch positions
    plain_model = tiny_model(pack=False, rotary=rotary, token_shift=token_shift).eval()
    if token_shift:  # a previous token as loud as the token itself, so a wrong previous token shows
        with torch.no_grad():
            packed_model.shift.weight.mul_(20.0)
    if rotary:  # sharper attention than the 0.02-std init, so a token packed at a wrong position shows
        with torch.no_grad():
            for block in packed_model.blocks:
                block.attn.qkv.weight.mul_(5.0)
    plain_model.load_state_dict(packed_model.state_dict())

    seen = []
    hook = packed_model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:2])))
    loss_p, grads_p = _loss_and_grads(packed_model, batch, layout)
    hook.remove()
    loss_u, grads_u = _loss_and_grads(plain_model, batch, layout)

    B, L = batch["step_mask"].shape[0], layout.seq_len
    (rows, capacity), = seen
    assert rows * capacity == packed_model(batch, layout).num_positions < B * L and rows <= B and capacity <= L
    if layout_name == "no two fit":
        assert (rows, capacity) == (B, 3 * L // 4)
    out = packed_model(batch, layout)
    assert out.num_positions < B * L and plain_model(batch, layout).num_positions == B * L
    real = int(out.num_tokens)
    assert real / out.num_positions >= 0.75  # most pads are gone from the computation
    assert real / (B * L) < (0.75 if layout_name == "no two fit" else 0.5)
    torch.testing.assert_close(loss_p, loss_u, atol=1e-6, rtol=1e-6)
    assert grads_p.keys() == grads_u.keys()
    for k in grads_p:
        torch.testing.assert_close(grads_p[k], grads_u[k], atol=1e-6, rtol=1e-5, msg=k)


def test_packed_rows_do_not_see_each_other():
    """Changing one source row leaves the loss terms of the rows packed beside it unchanged."""
    layout = text_layout(tokens=24)
    batch = make_batch(layout, [1] * 6, seed=5)
    model = tiny_model().eval()
    with torch.no_grad():
        ref = model(batch, layout, return_logits=True)
        other = {k: v.clone() for k, v in batch.items()}
        keep = other["act/text"][0] != VOCAB.pad
        other["act/text"][0][keep] = (other["act/text"][0][keep] + 7) % 256  # row 0's text, same length
        out = model(other, layout, return_logits=True)
    assert out.num_positions < 6 * layout.seq_len  # really packed
    n0 = int((batch["act/text"][0] != VOCAB.pad).sum()) - 1  # row 0's loss tokens come first
    assert not torch.allclose(ref.logits[:n0], out.logits[:n0])
    torch.testing.assert_close(ref.logits[n0:], out.logits[n0:])


def test_batches_with_nothing_to_merge_are_planned_without_the_bin_packing_loop(monkeypatch):
    """The plan runs at every training step: a full batch (a 512-row control task) or rows no two of which fit
    together never enter first-fit decreasing's Python loop."""
    import mugato_ray.packing as packing

    def refuse(*args):
        raise AssertionError("first_fit_decreasing was called")

    monkeypatch.setattr(packing, "first_fit_decreasing", refuse)
    assert plan_packing(torch.ones(512, 5, dtype=torch.bool)) is None
    p = plan_packing(valid_rows([5, 5, 4]))
    assert (p.rows, p.capacity) == (3, 5) and sorted(p.row_PxC[:, 0].tolist()) == [0, 1, 2]
    with pytest.raises(AssertionError, match="first_fit_decreasing"):
        plan_packing(valid_rows([5, 5, 1]))  # two rows fit together here: the loop places them
