"""Model benchmark: ratios measured in ONE run (absolute numbers on a shared machine are noisy).

1. Training: tokens/s and model FLOP/s of a preset (`--preset`, default `small`; GATO's `gato-79m` on a GPU)
   at T=512 on a synthetic text batch, over the machine's measured matmul rate (fp32 2048^3 on CPU; bf16
   under autocast on CUDA); the price of each optional model switch; and the step with
   `train.precision=bf16` over fp32.
2. KV-cached decoding over full recomputation at a 1024-token context (tokens/s).
3. The patch embedding (images): forward and backward of a BabyAI-sized batch of patches through the
   module, whose convolutions take channels-last inputs, over the same weights in the (N, C, H, W) layout
   it used before (same outputs; the CPU's 8-channel convolution kernels are what differ).
4. Batched acting: N=16 envs in one ModelPolicy over 16 single-env policies stepped in turn (env steps/s,
   best of 3 interleaved runs), on a MuJoCo-like and a BabyAI-like task with synthetic observations; on the
   MuJoCo-like task also the rate of greedy continuous actions by the argmax over that by the mean
   (rollout.continuous_actions).

Run: .venv/bin/python bench/model.py [--device cuda] [--preset gato-79m] [--batch 32] [--quick]
(the preset sizes every model here but the patch embedding's, which is the demo's width)
"""

from __future__ import annotations

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402

from mugato_ray.config import ModelConfig, TokenizerConfig  # noqa: E402
from mugato_ray.learner import cpu_bf16_speedup, training_autocast  # noqa: E402
from mugato_ray.model import PRESETS, GatoModel, count_flops_per_token  # noqa: E402
from mugato_ray.policy import ModelPolicy  # noqa: E402
from mugato_ray.sequence import LayoutField, SequenceLayout, make_layout  # noqa: E402
from mugato_ray.specs import space_spec  # noqa: E402
from mugato_ray.tokenizer import ByteTokenizer, Modality, make_vocab  # noqa: E402


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


def text_batch(device, vocab, T: int, B: int) -> tuple[SequenceLayout, dict[str, torch.Tensor]]:
    """A one-field text layout and a synthetic (B, T) batch of random text tokens in it, fixed by seed 0."""
    layout = SequenceLayout("text", (LayoutField("act/text", "action", Modality.TEXT, T, 1),), 1)
    g = torch.Generator().manual_seed(0)
    batch = {
        "act/text": torch.randint(0, vocab.text_size, (B, 1, T, 1), generator=g, dtype=torch.int32).to(device),
        "step_mask": torch.ones((B, 1), dtype=torch.bool, device=device),
        "prompt_mask": torch.zeros((B, 1), dtype=torch.bool, device=device),
    }
    return layout, batch


def training_step(device, vocab, T: int, B: int, preset: str, precision: str = "auto", **options):
    """The model, and one optimizer step of ``preset`` on a synthetic (B, T) text batch, under
    ``train.precision``'s autocast. ``options``: ModelConfig switches, e.g. ``rotary=True``."""
    model = GatoModel(ModelConfig(preset=preset, context=T, **options), vocab).to(device)
    layout, batch = text_batch(device, vocab, T, B)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = training_autocast(precision, device)

    def step():
        with autocast:
            loss = model(batch, layout).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def bench_training(device, vocab, args) -> None:
    T, B = 512, args.batch
    model, step = training_step(device, vocab, T, B, args.preset)
    dt = timed(step, device, repeats=args.repeats, warmup=2)
    tokens_per_s = B * T / dt
    # Every position but the first of each row gets logits (a text task).
    flops = count_flops_per_token(model, T, logit_fraction=(T - 1) / T) * tokens_per_s
    peak = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"train {args.preset}  params={model.num_params() / 1e6:.2f}M  B={B} T={T}  {tokens_per_s:,.0f} tokens/s")
    print(f"  model {flops / 1e9:.1f} GFLOP/s over matmul {peak / 1e9:.1f} GFLOP/s  ->  ratio {flops / peak:.2f}")
    # The price of each optional model switch: the same step with it on, interleaved with the plain one
    # (best of 3 each).
    for option in ("rotary", "token_shift"):
        option_step = training_step(device, vocab, T, B, args.preset, **{option: True})[1]
        plain, on = [], []
        for _ in range(3):
            plain.append(timed(step, device, repeats=args.repeats, warmup=1))
            on.append(timed(option_step, device, repeats=args.repeats, warmup=1))
        print(f"  model.{option}: step time {min(on) * 1e3:.0f} ms over {min(plain) * 1e3:.0f} ms  ->  ratio "
              f"{min(on) / min(plain):.2f}")
    # train.precision: the same step with bf16 products against fp32 ones, interleaved, best of 3 each; on a
    # CPU whose bf16 products are not faster, bf16 falls back to fp32 (cpu_bf16_speedup says which).
    steps = {precision: training_step(device, vocab, T, B, args.preset, precision)[1] for precision in ("fp32", "bf16")}
    times = {precision: [] for precision in steps}
    for _ in range(3):
        for precision, fn in steps.items():
            times[precision].append(timed(fn, device, repeats=args.repeats, warmup=1))
    note = f", a bf16 matmul at {cpu_bf16_speedup():.2f}x the fp32 rate" if device.type == "cpu" else ""
    print(f"  train.precision=bf16: step time {min(times['bf16']) * 1e3:.0f} ms over {min(times['fp32']) * 1e3:.0f} "
          f"ms in fp32  ->  ratio {min(times['fp32']) / min(times['bf16']):.2f} faster{note}")


def bench_task_moments(device, vocab, args, tasks: int = 4) -> None:
    """The price of ``train.task_moments``: one optimizer step of ``tasks`` micro-batches (one per task, as
    the demo's steps) through ``learner.Learner``, with per-task moments against one AdamW, interleaved,
    best of 3 each."""
    from mugato_ray.config import Config, TaskEntry, TrainConfig  # lazy: only this benchmark needs them
    from mugato_ray.learner import Learner, make_optimizer

    T, B = 256, args.batch
    layout, batch = text_batch(device, vocab, T, B)
    names = [f"text-{i}" for i in range(tasks)]
    steps = {}
    for moments in (False, True):
        cfg = Config(train=TrainConfig(task_moments=moments, steps=10**6),
                     tasks=[TaskEntry(name="text-arith") for _ in names])
        model = GatoModel(ModelConfig(preset=args.preset, context=T), vocab).to(device)
        learner = Learner(model, make_optimizer(model, cfg.train, tasks), cfg, dict.fromkeys(names, layout), device)
        learner.tasks = names  # the mixture's task names, each with the same synthetic batch
        steps[moments] = lambda learner=learner: learner.step(0, lambda task: batch)
    plain, per_task = [], []
    for _ in range(3):
        plain.append(timed(steps[False], device, repeats=args.repeats, warmup=1))
        per_task.append(timed(steps[True], device, repeats=args.repeats, warmup=1))
    print(f"  train.task_moments ({tasks} tasks, {tasks} micro-batches of {B} x {T}): step time "
          f"{min(per_task) * 1e3:.0f} ms over {min(plain) * 1e3:.0f} ms  ->  ratio {min(per_task) / min(plain):.2f}")


def bench_patch_embedding(device, args) -> None:
    """``PatchEmbedding`` forward + backward on 640 16x16 RGB patches (a demo BabyAI micro-batch: 8 rows x
    5 steps x 16 patches), its channels-last convolutions over the contiguous (N, C, H, W) ones it had,
    interleaved, best of 3 each; and the largest difference of their outputs."""
    import torch.nn.functional as F  # lazy: only this benchmark needs them

    from mugato_ray.model import PatchEmbedding, normalize_patches

    p = 16
    module = PatchEmbedding(p, 128).to(device)
    g = torch.Generator().manual_seed(0)
    patches = torch.randint(0, 256, (8, 80, p * p * 3), generator=g, dtype=torch.uint8).to(device)

    def nchw(x_u8: torch.Tensor) -> torch.Tensor:
        x = normalize_patches(x_u8, p).reshape(-1, p, p, 3).permute(0, 3, 1, 2).contiguous()
        h = module.conv1(F.gelu(module.norm1(x)))
        h = module.conv2(F.gelu(module.norm2(h)))
        return module.out((h + module.skip(x)).flatten(1)).reshape(*x_u8.shape[:-1], -1)

    def step(forward):
        module.zero_grad(set_to_none=True)
        forward().sum().backward()

    current, before = [], []
    for _ in range(3):
        current.append(timed(lambda: step(lambda: module(patches, 3)), device, repeats=args.repeats, warmup=1))
        before.append(timed(lambda: step(lambda: nchw(patches)), device, repeats=args.repeats, warmup=1))
    with torch.no_grad():
        diff = (module(patches, 3) - nchw(patches)).abs().max().item()
    print(f"patch embedding, 640 patches of 16x16x3, forward + backward: {min(current) * 1e3:.1f} ms over "
          f"{min(before) * 1e3:.1f} ms in (N, C, H, W)  ->  ratio {min(before) / min(current):.2f} faster "
          f"(outputs differ by at most {diff:.1e})")


def bench_cached_decoding(device, vocab, args) -> None:
    """Decode tokens after a ~1000-token prefix: append one token to a KV cache vs re-run the whole sequence."""
    L, new = 1024, args.decode_tokens
    model = GatoModel(ModelConfig(preset=args.preset, context=L), vocab).to(device).eval()
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
        f"decode {args.preset} at context {L}: cached {new / dt_cached:,.0f} tokens/s, "
        f"full recomputation {new / dt_full:,.1f} tokens/s  ->  ratio {dt_full / dt_cached:.1f}x"
    )


ACTING_TASKS = {
    # name: (observation space, action space, episode length or None)
    "mujoco-like": (spaces.Box(-np.inf, np.inf, (17,), np.float32), spaces.Box(-1.0, 1.0, (6,), np.float32), None),
    "babyai-like": (
        spaces.Dict(
            {
                "direction": spaces.Discrete(4),
                "image": spaces.Box(0, 255, (56, 56, 3), np.uint8),
                "mission": spaces.Text(512),
            }
        ),
        spaces.Discrete(7),
        64,
    ),
}
"""Synthetic acting tasks. MuJoCo-like: Box(17) -> Box(6), 24 tokens per step (6 action tokens), no episode
end. BabyAI-like: the BabyAI wrapper's spaces, 83 tokens per step (64 mission tokens, mostly pad, 16 patches,
direction, separator, action); 64-step episodes whose ends are staggered over the envs, as when episodes
finish at different times (env i's first episode is 4 i steps shorter)."""


def synthetic_observations(space, n: int, rng: np.random.Generator) -> dict:
    if isinstance(space, spaces.Dict):
        return {
            "direction": rng.integers(0, 4, n),
            "image": rng.integers(0, 256, (n, 56, 56, 3), dtype=np.uint8),
            "mission": ["go to the red ball"] * n,
        }
    return {"observation": rng.normal(size=(n, *space.shape)).astype(np.float32)}


def acting_rate(model, spec, layout, obs_T, ends_T, per_policy: int, device,
                continuous_actions: str = "mean") -> tuple[float, float]:
    """Env steps per wall second and per CPU second of N envs split into policies of ``per_policy`` envs
    stepped in turn (step 0 is a warm-up).

    ``obs_T[t]``: the N envs' observations at step t; ``ends_T[t]``: the envs whose episode ends before step t.
    With one torch thread, CPU seconds count this run's work alone; wall seconds also count the time other
    processes on a shared machine ran.
    """
    N = len(next(iter(obs_T[0].values())))
    groups = [range(g, g + per_policy) for g in range(0, N, per_policy)]
    policies = [ModelPolicy(model, spec, layout, ByteTokenizer(), per_policy, device=device,
                            continuous_actions=continuous_actions) for _ in groups]
    for p, g in zip(policies, groups):
        p.reset(range(per_policy), list(g))
    for t, o in enumerate(obs_T):
        if t == 1:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
        for p, g in zip(policies, groups):
            ended = [i - g.start for i in ends_T[t] if i in g]
            if ended:
                p.reset(ended, [g.start + e for e in ended])
            p.act({k: v[g.start : g.stop] for k, v in o.items()})
    sync(device)
    steps = N * (len(obs_T) - 1)
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def bench_batched_acting(device, vocab, args) -> None:
    """Env steps/s of N=16 envs in one policy over 16 one-env policies stepped in turn, best of interleaved runs.

    Both sides see the same observations and episode ends, in one process (same torch threads).
    """
    N, steps = 16, args.act_steps
    model = GatoModel(ModelConfig(preset=args.preset, context=1024), vocab).to(device)
    for name, (obs_space, act_space, episode) in ACTING_TASKS.items():
        spec = space_spec(obs_space, act_space, TokenizerConfig(), vocab)
        layout = make_layout(name, spec, 1024)
        rng = np.random.default_rng(0)
        obs_T = [synthetic_observations(obs_space, N, rng) for _ in range(steps + 1)]
        ends_T = [[i for i in range(N) if episode and t and (t + 4 * i) % episode == 0] for t in range(steps + 1)]
        # (envs per policy, how greedy continuous actions are decoded) -> best [wall, cpu] env steps/s; a
        # continuous task also runs N=16 with the argmax, the price of decoding by the mean.
        runs = [(N, "mean"), (1, "mean")] + ([(N, "argmax")] if isinstance(act_space, spaces.Box) else [])
        best = {run: [0.0, 0.0] for run in runs}
        for _ in range(args.act_repeats):
            for (per_policy, decode), b in best.items():
                rates = acting_rate(model, spec, layout, obs_T, ends_T, per_policy, device, decode)
                b[:] = [max(b[0], rates[0]), max(b[1], rates[1])]
        (wb, cb), (w1, c1) = best[N, "mean"], best[1, "mean"]
        print(
            f"acting {args.preset}, {name}, {layout.step_tokens} tokens/step, {steps} steps, best of {args.act_repeats}: "
            f"N={N} batched {wb:,.0f} env steps/s, one env at a time {w1:,.0f} env steps/s  ->  ratio {wb / w1:.2f}x; "
            f"per CPU second {cb:,.0f} / {c1:,.0f}  ->  {cb / c1:.2f}x"
        )
        if (N, "argmax") in best:
            wa, ca = best[N, "argmax"]
            print(f"  greedy continuous actions, N={N}: by the mean {wb:,.0f} env steps/s, by the argmax {wa:,.0f}  ->  "
                  f"ratio {wa / wb:.2f}x; per CPU second {ca / cb:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size (model.preset)")
    parser.add_argument("--batch", type=int, default=0, help="rows of a training step (0: 8, or 2 with --quick)")
    args = parser.parse_args()
    if args.batch < 0:
        parser.error(f"--batch must be positive (or 0 for the default), got {args.batch}")
    if args.threads:
        # On a loaded machine OpenMP threads spin against other processes: 1 thread can be 10x faster.
        torch.set_num_threads(args.threads)
    batch, args.repeats, args.decode_tokens, args.act_steps = (2, 2, 8, 5) if args.quick else (8, 5, 32, 48)
    args.batch = args.batch or batch
    args.act_repeats = 1 if args.quick else 3
    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = make_vocab(TokenizerConfig(), ByteTokenizer())
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} vocab={vocab.size}")
    bench_training(device, vocab, args)
    bench_task_moments(device, vocab, args)
    bench_patch_embedding(device, args)
    bench_cached_decoding(device, vocab, args)
    bench_batched_acting(device, vocab, args)


if __name__ == "__main__":
    main()
