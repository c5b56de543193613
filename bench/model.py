"""Model benchmark: ratios measured in ONE run (absolute numbers on a shared machine are noisy).

1. Training: tokens/s and model FLOP/s of the `small` preset at T=512 on a synthetic text batch, over
   the machine's measured matmul rate (fp32 2048^3 on CPU; bf16 under autocast on CUDA).
2. KV-cached decoding over full recomputation at a 1024-token context (tokens/s).
3. Batched acting: N=16 envs in one ModelPolicy over 16 single-env policies stepped in turn (env steps/s).

Run: .venv/bin/python bench/model.py [--device cuda] [--quick]
"""

from __future__ import annotations

import os
import sys

# bench/ holds tokenize.py, named like the stdlib module that inspect/linecache import: keep bench/ off
# sys.path and put the project root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402

from mugato_ray.config import ModelConfig, TokenizerConfig  # noqa: E402
from mugato_ray.model import GatoModel, count_flops_per_token  # noqa: E402
from mugato_ray.policy import ModelPolicy  # noqa: E402
from mugato_ray.sequence import LayoutField, SequenceLayout, make_layout  # noqa: E402
from mugato_ray.tokenizer import ByteTokenizer, Modality, make_vocab, space_spec  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats=7, warmup=2)


def bench_training(device, vocab, args) -> None:
    T, B = 512, args.batch
    model = GatoModel(ModelConfig(preset="small", context=T), vocab).to(device)
    layout = SequenceLayout("text", (LayoutField("act/text", "action", Modality.TEXT, T, 1),), 1)
    g = torch.Generator().manual_seed(0)
    batch = {
        "act/text": torch.randint(0, vocab.text_size, (B, 1, T, 1), generator=g, dtype=torch.int32).to(device),
        "step_mask": torch.ones((B, 1), dtype=torch.bool, device=device),
        "prompt_mask": torch.zeros((B, 1), dtype=torch.bool, device=device),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(batch, layout).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dt = timed(step, device, repeats=args.repeats, warmup=2)
    tokens_per_s = B * T / dt
    # Every position but the first of each row gets logits (a text task).
    flops = count_flops_per_token(model, T, logit_fraction=(T - 1) / T) * tokens_per_s
    peak = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"train small  params={model.num_params() / 1e6:.2f}M  B={B} T={T}  {tokens_per_s:,.0f} tokens/s")
    print(f"  model {flops / 1e9:.1f} GFLOP/s over matmul {peak / 1e9:.1f} GFLOP/s  ->  ratio {flops / peak:.2f}")


def bench_cached_decoding(device, vocab, args) -> None:
    """Decode tokens after a ~1000-token prefix: append one token to a KV cache vs re-run the whole sequence."""
    L, new = 1024, args.decode_tokens
    model = GatoModel(ModelConfig(preset="small", context=L), vocab).to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab.text_size, (1, L), generator=g).to(device)
    x_all = model.tok_emb(ids) + model.local_pos(torch.arange(L, device=device))
    valid = torch.ones((1, L), dtype=torch.bool, device=device)
    start = L - new

    @torch.no_grad()
    def cached_decode_only():
        cache = model.new_cache(1, L)
        model.prefill(x_all[:, :start], valid[:, :start], cache)
        sync(device)
        t0 = time.perf_counter()
        for t in range(start, L):
            model.logits(model.extend(x_all[:, t : t + 1], valid[:, t : t + 1], cache)[:, -1])
        sync(device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def uncached():
        for t in range(start, L):
            model.logits(model.trunk(x_all[:, : t + 1], valid[:, : t + 1])[:, -1])

    cached_decode_only()  # warm-up
    dt_cached = statistics.median(cached_decode_only() for _ in range(3))
    dt_full = timed(uncached, device, repeats=1, warmup=0)
    print(
        f"decode small at context {L}: cached {new / dt_cached:,.0f} tokens/s, "
        f"full recomputation {new / dt_full:,.1f} tokens/s  ->  ratio {dt_full / dt_cached:.1f}x"
    )


def bench_batched_acting(device, vocab, args) -> None:
    """MuJoCo-like task: Box(17) observation, Box(6) action (24 tokens per step, 42 steps in 1024 tokens)."""
    N, steps = 16, args.act_steps
    tok_cfg = TokenizerConfig()
    obs_space = spaces.Box(-np.inf, np.inf, (17,), np.float32)
    act_space = spaces.Box(-1.0, 1.0, (6,), np.float32)
    spec = space_spec(obs_space, act_space, tok_cfg, vocab)
    layout = make_layout("bench", spec, 1024)
    model = GatoModel(ModelConfig(preset="small", context=1024), vocab).to(device)
    text = ByteTokenizer()
    rng = np.random.default_rng(0)
    obs = [{"observation": rng.normal(size=(N, 17)).astype(np.float32)} for _ in range(steps)]

    batched = ModelPolicy(model, spec, layout, text, N, device=device)
    batched.reset(range(N), range(N))
    batched.act(obs[0])  # warm-up
    sync(device)
    t = time.perf_counter()
    for o in obs:
        batched.act(o)
    sync(device)
    rate_batched = N * steps / (time.perf_counter() - t)

    singles = [ModelPolicy(model, spec, layout, text, 1, device=device) for _ in range(N)]
    for i, p in enumerate(singles):
        p.reset([0], [i])
        p.act({"observation": obs[0]["observation"][i : i + 1]})
    sync(device)
    t = time.perf_counter()
    for o in obs:
        for i, p in enumerate(singles):
            p.act({"observation": o["observation"][i : i + 1]})
    sync(device)
    rate_single = N * steps / (time.perf_counter() - t)
    print(
        f"acting small, {layout.step_tokens} tokens/step, {steps} steps: N={N} batched {rate_batched:,.0f} env steps/s, "
        f"one env at a time {rate_single:,.0f} env steps/s  ->  ratio {rate_batched / rate_single:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        # On a loaded machine OpenMP threads spin against other processes: 1 thread can be 10x faster.
        torch.set_num_threads(args.threads)
    args.batch, args.repeats, args.decode_tokens, args.act_steps = (2, 2, 8, 5) if args.quick else (8, 5, 32, 48)
    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = make_vocab(TokenizerConfig(), ByteTokenizer())
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} vocab={vocab.size}")
    bench_training(device, vocab, args)
    bench_cached_decoding(device, vocab, args)
    bench_batched_acting(device, vocab, args)


if __name__ == "__main__":
    main()
