"""Tests of the model policy: cached decoding, legal actions, windows past the context, reproducible sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from mugato_ray.config import ModelConfig, TokenizerConfig
from mugato_ray.model import GatoModel, KVCache
from mugato_ray.policy import ModelPolicy, pack_valid
from mugato_ray.sequence import make_layout
from mugato_ray.specs import space_spec
from mugato_ray.tokenizer import (
    ByteTokenizer,
    Modality,
    encode_actions,
    legal_action_mask,
    make_vocab,
)

TOK_CFG = TokenizerConfig(value_bins=64, patch_size=4, max_text_tokens=6)
TEXT = ByteTokenizer()
VOCAB = make_vocab(TOK_CFG, TEXT)

DICT_OBS = spaces.Dict(
    {
        "mission": spaces.Text(12),
        "image": spaces.Box(0, 255, (8, 8, 3), np.uint8),
        "pos": spaces.MultiDiscrete([5, 7]),
    }
)


def setup(obs_space, act_space, context, seed=0, sharpen=True, rotary=False, token_shift=False):
    spec = space_spec(obs_space, act_space, TOK_CFG, VOCAB)
    layout = make_layout("task", spec, context)
    torch.manual_seed(seed)
    model = GatoModel(ModelConfig(preset="tiny", context=context, rotary=rotary, token_shift=token_shift), VOCAB,
                      patch_size=TOK_CFG.patch_size)
    if sharpen:  # sharper logits than the 0.02-std init, so greedy choices are far from ties
        with torch.no_grad():
            model.tok_emb.weight.mul_(20.0)
    if token_shift:  # a previous token as loud as the token itself, so a wrong previous token shows
        with torch.no_grad():
            model.shift.weight.mul_(20.0)
    return spec, layout, model


def random_obs(spec, n, rng):
    """A batch of N observations for every field of the spec (key -> (N, *shape) or list[str])."""
    out = {}
    for f in spec.observation:
        if f.modality is Modality.TEXT:
            out[f.key] = ["".join(rng.choice(list("abcdefgh "), size=rng.integers(0, 10))) for _ in range(n)]
        elif f.modality is Modality.IMAGE:
            out[f.key] = rng.integers(0, 256, (n, *f.shape), dtype=np.uint8)
        elif f.modality is Modality.DISCRETE:
            out[f.key] = (np.asarray(f.start) + rng.integers(0, np.asarray(f.nvec), (n, len(f.nvec)))).reshape(
                n, *f.shape
            )
        else:
            out[f.key] = rng.normal(0, 3, (n, *f.shape)).astype(np.float32)
    return out


def take(obs, idx):
    return {k: [v[i] for i in idx] if isinstance(v, list) else v[idx] for k, v in obs.items()}


@pytest.mark.parametrize("prompted,rotary,token_shift,continuous",
                         [(False, False, False, False), (True, False, False, False), (True, True, False, False),
                          (False, False, True, False), (True, True, True, False), (True, True, True, True)])
def test_cached_decoding_matches_uncached(prompted, rotary, token_shift, continuous, monkeypatch):
    # Two action tokens: one cached token step per act. Continuous: greedy by the mean of the bins.
    act_space = spaces.Box(-1.0, 1.0, (2,), np.float32) if continuous else spaces.MultiDiscrete([3, 4])
    spec, layout, model = setup(DICT_OBS, act_space, context=64, rotary=rotary, token_shift=token_shift)
    assert layout.steps == 4  # 6 text + 4 patches + 2 + sep + 2 actions = 15 tokens per step
    N = 3
    prompt = None
    if prompted:
        g = np.random.default_rng(5)
        prompt = {
            f.key: g.integers(0, 256, (1, f.tokens, f.channels)).astype(np.uint8)
            if f.is_image
            else np.full(
                (1, f.tokens, f.channels), VOCAB.separator if f.role == "separator" else VOCAB.value_offset + 1
            )
            for f in layout.fields
        }
    calls = {"compact": 0, "place_some": 0}  # the cache's reclaiming paths must run (non-vacuous)
    compact, place = KVCache.compact, KVCache.place

    def counting_compact(cache):
        calls["compact"] += 1
        compact(cache)

    def counting_place(cache, rows, src):
        calls["place_some"] += len(rows) < N
        place(cache, rows, src)

    monkeypatch.setattr(KVCache, "compact", counting_compact)
    monkeypatch.setattr(KVCache, "place", counting_place)
    cached = ModelPolicy(model, spec, layout, TEXT, N, use_cache=True, prompt_tokens=prompt)
    reference = ModelPolicy(model, spec, layout, TEXT, N, use_cache=False, prompt_tokens=prompt)
    for p in (cached, reference):
        p.reset(range(N), [0, 1, 2])
    rng = np.random.default_rng(0)
    slides = 0
    for t in range(22):
        if t in (5, 13):  # a reset in the middle, on different envs
            for p in (cached, reference):
                p.reset([1] if t == 5 else [0, 2], [7] if t == 5 else [8, 9])
        obs = random_obs(spec, N, rng)
        before = cached.n.copy()
        a1, ids1, logits1 = cached.act_with_logits(obs)
        a2, ids2, logits2 = reference.act_with_logits(obs)
        slides += int((cached.n < before + 1).any())
        np.testing.assert_allclose(logits1, logits2, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(ids1, ids2)
        np.testing.assert_array_equal(a1, a2)
        assert np.array_equal(cached.n, reference.n)
    assert slides >= 3  # the window slid several times
    assert calls["compact"] >= 3 and calls["place_some"] >= 3  # holes reclaimed; some envs re-encoded alone
    assert len(set(map(tuple, ids1.tolist()))) > 1 or len({tuple(r) for r in logits1[:, 0, :8]}) > 1


def test_pack_valid_keeps_each_rows_valid_tokens_in_order_right_aligned():
    g = torch.Generator().manual_seed(0)
    B, L, D = 5, 9, 3
    x = torch.randn(B, L, D, generator=g)
    valid = torch.rand(B, L, generator=g) > 0.5
    valid[0] = True  # a full row: nothing to gain, the input comes back as is (checked last)
    valid[1, -1] = False  # an invalid last token: kept (its output is read), still invalid as a key
    valid[2] = False
    valid[2, :3] = True  # the last kept token sits far from the end
    for keep_last in (True, False):
        valid_in = valid.clone()
        valid_in[0, 4] = False  # no row full: every row is packed
        pos = torch.arange(L).expand(B, L)
        out_x, out_valid, out_pos = pack_valid(x, valid_in, pos, keep_last)
        W = out_x.shape[1]
        for b in range(B):
            keep = valid_in[b].clone()
            keep[-1] |= keep_last
            n = int(keep.sum())
            assert n <= W and not out_valid[b, : W - n].any()  # left padding is invalid
            torch.testing.assert_close(out_x[b, W - n :], x[b, keep], rtol=0, atol=0)
            assert torch.equal(out_valid[b, W - n :], valid_in[b, keep])
            assert torch.equal(out_pos[b, W - n :], pos[b, keep])  # positions move with their tokens
        kept_B = valid_in.sum(1) + (keep_last & ~valid_in[:, -1])
        assert W == int(kept_B.max())
    full_x, full_valid, _ = pack_valid(x, valid, torch.arange(L).expand(B, L))  # row 0 keeps everything: as is
    assert full_x is x and full_valid is valid


@pytest.mark.parametrize("rotary,token_shift", [(False, False), (True, False), (False, True)])
def test_cache_compaction_and_placement_are_exact(rotary, token_shift):
    """Squeezing invalid entries out, or encoding rows elsewhere and placing them, changes no later output
    (with rotary positions too: keys are cached rotated, so where they sit does not matter; with the token
    shift, a placed row brings its last token along)."""
    _, _, model = setup(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2), context=64, rotary=rotary,
                        token_shift=token_shift)
    g = torch.Generator().manual_seed(0)
    B, L0, L1, D = 3, 20, 6, model.n_embd
    x = torch.randn(B, L0 + L1, D, generator=g)
    valid = torch.rand(B, L0 + L1, generator=g) > 0.4
    valid[:, L0:] = True
    pos = torch.randint(0, 64, (B, L0 + L1), generator=g)
    pos[:, L0] = 63  # the first extended token follows the cached ones within a timestep (token shift)
    with torch.no_grad():
        want = model.trunk(x, valid, pos_BxL=pos)[:, L0:]  # the reference: no cache at all
        cache = model.new_cache(B, 48)
        model.prefill(x[:, :L0], valid[:, :L0], cache, outputs=0, pos_BxL=pos[:, :L0])
        cache.compact()
        assert cache.length == int(valid[:, :L0].sum(1).max()) < L0
        torch.testing.assert_close(model.extend(x[:, L0:], valid[:, L0:], cache, pos_BxL=pos[:, L0:]), want,
                                   rtol=0, atol=1e-5)
        last2 = model.trunk(x, valid, model.new_cache(B, 32), outputs=2, pos_BxL=pos)  # the last block, 2 queries
        torch.testing.assert_close(last2, model.trunk(x, valid, pos_BxL=pos)[:, -2:], rtol=0, atol=1e-5)

        # A prefill starts over: nothing of what the cache held carries into it (its first token sits at the
        # highest position, so a stale last token would count as its predecessor).
        torch.testing.assert_close(model.prefill(x[:, L0:], valid[:, L0:], cache, pos_BxL=pos[:, L0:]),
                                   model.trunk(x[:, L0:], valid[:, L0:], pos_BxL=pos[:, L0:]), rtol=0, atol=1e-5)

        # Row 1 encoded alone, placed into a cache whose other rows hold their own (shorter) histories and
        # whose row 1 held another history (invalidated below).
        cache = model.new_cache(B, 48)
        other = x.clone()
        other[1] = torch.randn(L0 + L1, D, generator=g)
        model.prefill(other[:, 5:L0], valid[:, 5:L0], cache, outputs=0, pos_BxL=pos[:, 5:L0])
        cache.valid[1] = False
        alone = model.new_cache(1, L0)
        model.prefill(x[1:2, :L0], valid[1:2, :L0], alone, outputs=0, pos_BxL=pos[1:2, :L0])
        cache.place(torch.tensor([1]), alone)
        assert cache.length == L0
        got = model.extend(x[:, L0:], valid[:, L0:], cache, pos_BxL=pos[:, L0:])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    want_rest = model.trunk(x[:, 5:], valid[:, 5:], pos_BxL=pos[:, 5:])[:, -L1:]
    torch.testing.assert_close(got[[0, 2]], want_rest[[0, 2]], rtol=0, atol=1e-5)


def test_rotary_attention_sees_relative_positions_only():
    """With model.rotary, shifting every position by the same amount changes no output; changing one token's
    offset to the others does; and a rotary model asked to run without positions says so."""
    _, _, model = setup(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2), context=64, rotary=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, model.n_embd, generator=g)
    valid = torch.ones(2, 12, dtype=torch.bool)
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        for block in model.blocks:  # sharper attention than the 0.02-std init, so positions matter visibly
            block.attn.qkv.weight.mul_(20.0)
        out = model.trunk(x, valid, pos_BxL=pos)
        torch.testing.assert_close(model.trunk(x, valid, pos_BxL=pos + 37), out, rtol=0, atol=1e-4)
        moved = pos.clone()
        moved[:, 3] = 9
        assert (model.trunk(x, valid, pos_BxL=moved)[:, 3:] - out[:, 3:]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="model.rotary"):
        model.trunk(x, valid)


ACTION_SPACES = {
    "discrete": spaces.Discrete(5, start=2),
    "multidiscrete": spaces.MultiDiscrete([3, 4, 2]),
    "multibinary": spaces.MultiBinary(3),
    "box": spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([3.0, 0.5], np.float32), dtype=np.float32),
}


@pytest.mark.parametrize("name", list(ACTION_SPACES))
def test_sampled_actions_are_legal_and_in_the_space(name):
    act_space = ACTION_SPACES[name]
    spec, layout, model = setup(spaces.Box(-1, 1, (3,), np.float32), act_space, context=48, sharpen=False)
    legal = legal_action_mask(spec)
    N = 4
    policy = ModelPolicy(model, spec, layout, TEXT, N, temperature=2.0)
    policy.reset(range(N), range(N))
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(15):
        actions, ids, _ = policy.act_with_logits(random_obs(spec, N, rng))
        assert actions.shape == (N, *act_space.shape) and actions.dtype == act_space.dtype
        assert legal[np.arange(ids.shape[1])[None], ids].all()
        assert all(act_space.contains(a) for a in actions)
        # The chosen ids are exactly the encoding of the returned actions (round-trip; bins for Box).
        np.testing.assert_array_equal(encode_actions(spec, actions)["action"][..., 0], ids)
        seen.update(map(tuple, ids.tolist()))
    assert len(seen) > 3  # temperature 2 explores several actions


def test_acting_past_the_context_keeps_a_bounded_window():
    spec, layout, model = setup(spaces.Box(-1, 1, (4,), np.float32), spaces.Discrete(3), context=30)
    E = layout.steps
    assert E == 5  # 4 obs + sep + 1 action = 6 tokens per step
    N = 2
    policy = ModelPolicy(model, spec, layout, TEXT, N)
    policy.reset(range(N), [0, 1])
    rng = np.random.default_rng(2)
    history, n_seen = [], []
    for _ in range(4 * E):
        obs = random_obs(spec, N, rng)
        history.append(obs["observation"])
        policy.act(obs)
        assert 1 <= policy.n.max() <= E and policy.cache.length <= policy.cache.capacity == E * layout.step_tokens
        # The window always holds the most recent steps, in order.
        kept = policy.n[0]
        expected = np.stack(history[-kept:], axis=1)  # (N, kept, 4)
        got = policy.hist["obs/observation"][:, :kept, :, 0]
        want = np.stack([encode_obs_ids(spec, expected[i]) for i in range(N)])
        np.testing.assert_array_equal(got, want)
        n_seen.append(int(policy.n[0]))
    # A full window drops its oldest steps down to E // 2 = 2 at once, then grows again: 3, 4, 5, 3, ...
    assert n_seen == [1, 2, 3, 4, 5] + [3, 4, 5] * 5


def encode_obs_ids(spec, x):
    from mugato_ray.tokenizer import encode_observations

    return encode_observations(spec, {"observation": x}, TEXT)["observation"][..., 0]


def test_temperature_sampling_reproducible_and_slot_independent():
    spec, layout, model = setup(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(6), context=40, sharpen=False)
    N, T = 3, 12
    rng = np.random.default_rng(3)
    obs_seq = [random_obs(spec, N, rng) for _ in range(T)]

    def run(seeds, perm):
        p = ModelPolicy(model, spec, layout, TEXT, N, temperature=1.5)
        p.reset(range(N), [seeds[i] for i in perm])
        return np.stack([p.act(take(o, perm)) for o in obs_seq])  # (T, N)

    identity, perm = [0, 1, 2], [2, 0, 1]
    a = run([10, 11, 12], identity)
    np.testing.assert_array_equal(a, run([10, 11, 12], identity))  # same seeds: same samples
    b = run([10, 11, 12], perm)  # each episode in another batch slot
    np.testing.assert_array_equal(b, a[:, perm])
    c = run([20, 21, 22], identity)
    assert not np.array_equal(a, c)  # the seed matters (non-vacuous)


CONTINUOUS_ACTIONS = {
    "bounded": spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([3.0, 0.5], np.float32), dtype=np.float32),
    "unbounded": spaces.Box(-np.inf, np.inf, (2,), np.float32),  # mu-law bins: not evenly spaced in value
}


def bin_values(spec):
    """(A, value_bins): the env value each value id decodes to, per action token, from decode_actions."""
    from mugato_ray.tokenizer import decode_actions

    bins = VOCAB.value_bins
    ids = np.repeat(VOCAB.value_offset + np.arange(bins)[:, None], spec.action[0].tokens, axis=1)
    return decode_actions(spec, ids).reshape(bins, -1).T.astype(np.float64)


@pytest.mark.parametrize("name", list(CONTINUOUS_ACTIONS))
def test_greedy_continuous_action_is_the_bin_nearest_the_expected_value(name):
    act_space = CONTINUOUS_ACTIONS[name]
    spec, layout, model = setup(spaces.Box(-1, 1, (3,), np.float32), act_space, context=48, sharpen=False)
    values_AxB = bin_values(spec)
    lo, bins = VOCAB.value_offset, VOCAB.value_bins
    N = 4
    mean_policy = ModelPolicy(model, spec, layout, TEXT, N)  # the default: "mean"
    mode_policy = ModelPolicy(model, spec, layout, TEXT, N, continuous_actions="argmax")
    for p in (mean_policy, mode_policy):
        p.reset(range(N), range(N))
    rng = np.random.default_rng(4)
    differs = 0
    for _ in range(6):
        obs = random_obs(spec, N, rng)
        actions, ids, logits = mean_policy.act_with_logits(obs)
        # Expected value of each action token's distribution over its value bins, in env units.
        z = logits[:, :, lo : lo + bins].astype(np.float64)
        p_NxAxB = np.exp(z - z.max(-1, keepdims=True))
        p_NxAxB /= p_NxAxB.sum(-1, keepdims=True)
        mean_NxA = (p_NxAxB * values_AxB[None]).sum(-1)
        nearest = np.abs(values_AxB[None] - mean_NxA[..., None]).argmin(-1) + lo
        np.testing.assert_array_equal(ids, nearest)
        assert all(act_space.contains(a) for a in actions)
        np.testing.assert_array_equal(encode_actions(spec, actions)["action"][..., 0], ids)
        # "argmax" keeps the most likely bin, fed the same observations.
        _, mode_ids, mode_logits = mode_policy.act_with_logits(obs)
        np.testing.assert_array_equal(mode_ids, mode_logits[:, :, lo : lo + bins].argmax(-1) + lo)
        differs += int((mode_ids != ids).sum())
    assert differs > 0  # near-uniform logits: the mode and the mean pick different bins (non-vacuous)


def test_greedy_mean_leaves_discrete_actions_and_sampling_alone():
    spec, layout, model = setup(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(6), context=40, sharpen=False)
    policy = ModelPolicy(model, spec, layout, TEXT, 3)  # "mean" on a discrete action: the most likely id
    policy.reset(range(3), range(3))
    obs = random_obs(spec, 3, np.random.default_rng(5))
    _, ids, logits = policy.act_with_logits(obs)
    lo = VOCAB.value_offset
    np.testing.assert_array_equal(ids, logits[:, :, lo : lo + 6].argmax(-1) + lo)
    # Sampling draws from the distribution: its ids spread over the bins where the mean's would not.
    box_spec, box_layout, box_model = setup(spaces.Box(-1, 1, (3,), np.float32), CONTINUOUS_ACTIONS["bounded"],
                                            context=48, sharpen=False)
    chosen = {}
    for temperature in (0.0, 1.0):
        p = ModelPolicy(box_model, box_spec, box_layout, TEXT, 3, temperature=temperature)
        p.reset(range(3), range(3))
        rng = np.random.default_rng(6)
        chosen[temperature] = np.stack([p.act_with_logits(random_obs(box_spec, 3, rng))[1] for _ in range(5)])
    assert np.ptp(chosen[1.0][..., 0]) > 4 * max(np.ptp(chosen[0.0][..., 0]), 1)


def test_prompt_and_window_validation():
    spec, layout, model = setup(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2), context=25)
    bad = {f.key: np.zeros((layout.steps, f.tokens, f.channels), np.int64) for f in layout.fields}
    with pytest.raises(ValueError, match="no room"):
        ModelPolicy(model, spec, layout, TEXT, 1, prompt_tokens=bad)
    with pytest.raises(ValueError, match="temperature"):
        ModelPolicy(model, spec, layout, TEXT, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="continuous_actions"):
        ModelPolicy(model, spec, layout, TEXT, 1, continuous_actions="median")
