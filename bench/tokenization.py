"""Tokenizer throughput per modality, and image tokenization against a plain numpy copy of the same bytes.

Run: .venv/bin/python bench/tokenization.py [--repeats 15] [--batch 256]

Prints tokens/s for text, discrete, continuous and image fields, and for images MB/s of pixels next to
np.copyto of the same bytes measured in the same run. Absolute numbers are noisy on shared machines; the
ratio to the in-run copy is the number to compare. numpy is single-threaded here (one core).
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from mugato_ray import tokenizer as tk  # noqa: E402
from mugato_ray.config import TokenizerConfig  # noqa: E402
from mugato_ray.specs import space_spec  # noqa: E402


def median_seconds(repeats: int, fn, *args) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs, after one warm-up run."""
    fn(*args)  # warm-up: page faults of first allocations, lazy imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (median reported)")
    parser.add_argument("--batch", type=int, default=256, help="steps per call (E)")
    args = parser.parse_args()

    cfg = TokenizerConfig()
    text_tok = tk.ByteTokenizer()
    vocab = tk.make_vocab(cfg, text_tok)
    rng = np.random.default_rng(0)
    E = args.batch
    rows = []

    def bench_obs(name: str, space, data) -> None:
        spec = space_spec(space, spaces.Discrete(2), cfg, vocab)
        secs = median_seconds(args.repeats, tk.encode_observations, spec, {"observation": data}, text_tok)
        rows.append((name, E * spec.obs_tokens / secs, secs))

    words = np.array(["go", "to", "the", "red", "blue", "ball", "key", "door", "pick", "up", "open", "and", "then"])
    missions = [" ".join(rng.choice(words, 8)) for _ in range(E)]
    bench_obs("text (64 tokens/step incl. pad)", spaces.Text(200), missions)
    bench_obs(
        "discrete (MultiDiscrete 7x7x3)",
        spaces.MultiDiscrete(np.full((7, 7, 3), 11)),
        rng.integers(0, 11, (E, 7, 7, 3)),
    )
    bench_obs(
        "continuous obs (Box 376, mu-law)",
        spaces.Box(-np.inf, np.inf, (376,), np.float32),
        rng.normal(0, 10, (E, 376)).astype(np.float32),
    )
    act_spec = space_spec(spaces.Discrete(2), spaces.Box(-1, 1, (17,), np.float32), cfg, vocab)
    actions = rng.uniform(-1, 1, (E, 17)).astype(np.float32)
    secs = median_seconds(args.repeats, tk.encode_actions, act_spec, actions)
    rows.append(("continuous action (Box 17, scaled)", E * 17 / secs, secs))

    image_rows = []
    for H, W in [(64, 64), (84, 84)]:  # 84x84 (Atari) exercises the zero-padding path
        images = rng.integers(0, 256, (E, H, W, 3), dtype=np.uint8)
        spec = space_spec(spaces.Box(0, 255, (H, W, 3), np.uint8), spaces.Discrete(2), cfg, vocab)
        secs = median_seconds(args.repeats, tk.encode_observations, spec, {"observation": images}, text_tok)
        dst = np.empty_like(images)
        copy_secs = median_seconds(args.repeats, np.copyto, dst, images)
        mb = images.nbytes / 1e6
        rows.append((f"image {H}x{W}x3 ({spec.obs_tokens} patches/step)", E * spec.obs_tokens / secs, secs))
        image_rows.append((f"{E}x{H}x{W}x3 uint8", mb / secs, mb / copy_secs))

    print(f"tokenizer throughput, batch E={E}, median of {args.repeats} (single core)")
    print(f"{'field':<42}{'tokens/s':>14}{'ms/call':>10}")
    for name, tps, secs in rows:
        print(f"{name:<42}{tps:>14,.0f}{secs * 1e3:>10.2f}")
    print()
    print(f"{'image pixels':<24}{'tokenize MB/s':>15}{'np.copyto MB/s':>16}{'ratio':>8}")
    for name, tok_mbs, copy_mbs in image_rows:
        print(f"{name:<24}{tok_mbs:>15,.0f}{copy_mbs:>16,.0f}{tok_mbs / copy_mbs:>8.2f}")
    print("goal: >= 1000 MB/s of image pixels per core (eihli/mugato's per-patch torch path: ~39 MB/s)")


if __name__ == "__main__":
    main()
