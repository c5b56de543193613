"""Answering benchmark: text-arith answers/s of the acting policy (``ModelPolicy.answer``, the KV-cached
token loop that environment actions use), batched over B prompts against one prompt at a time, in ONE run.

    python bench/answers.py [--prompts 32] [--new-tokens 8] [--repeats 3]

An untrained ``small`` model (the demo's width, context 256), one torch thread, greedy decoding; prompts of
different lengths, as evaluation gives them. Prints the best of the interleaved repeats and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from mugato_ray.config import config_from_dict
from mugato_ray.datasets import generate_episodes, prompt_and_answer
from mugato_ray.evaluate import generate_answers
from mugato_ray.model import GatoModel
from mugato_ray.tokenizer import make_text_tokenizer, make_vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config_from_dict({"model": {"preset": "small", "n_embd": 128, "n_head": 4, "d_ff": 512, "context": 256},
                            "tasks": [{"name": "text-arith"}]})
    torch.manual_seed(0)
    model = GatoModel(cfg.model, make_vocab(cfg.tokenizer)).eval()
    tok = make_text_tokenizer(cfg.tokenizer)
    episodes = generate_episodes("text-arith", args.prompts, 1_000_000, cfg)
    prompts = [prompt_and_answer("text-arith", ep)[0] for ep in episodes]
    budget = [args.new_tokens] * args.prompts

    def batched() -> float:
        t = time.perf_counter()
        generate_answers("text-arith", cfg, episodes, prompts, tok, model=model, max_new=budget)
        return time.perf_counter() - t

    def one_at_a_time() -> float:
        t = time.perf_counter()
        for i in range(args.prompts):
            generate_answers("text-arith", cfg, episodes[i:i + 1], prompts[i:i + 1], tok, model=model,
                             max_new=budget[i:i + 1])
        return time.perf_counter() - t

    best_b = best_1 = float("inf")
    for _ in range(args.repeats):
        best_b, best_1 = min(best_b, batched()), min(best_1, one_at_a_time())
    n = args.prompts
    lengths = [len(tok.encode(p)) for p in prompts]
    print(f"text-arith, {n} prompts of {min(lengths)}-{max(lengths)} tokens, {args.new_tokens} new tokens each, "
          f"best of {args.repeats}")
    print(f"batched:        {n / best_b:8.1f} answers/s ({best_b:.3f} s)")
    print(f"one at a time:  {n / best_1:8.1f} answers/s ({best_1:.3f} s)")
    print(f"ratio batched / one at a time: {best_1 / best_b:.2f}x")


if __name__ == "__main__":
    main()
