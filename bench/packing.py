"""Packing benchmark: per task, the non-pad fraction of the positions the model computes and the real
(non-pad) tokens/s of a training step (forward + backward), with ``model.pack`` on over off, in ONE run.

    python bench/packing.py --config configs/demo.yaml [--batches 6] [--tasks ...] [key=value ...]

The store must exist (``python jobs/collect.py --config ...``). Batches are built by the training
path's own ``SequenceBuilder`` at each task's batch size; both models have the same weights, and the
loss of the two is compared on every batch (packing is exact, so they must agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from mugato_ray.config import load_config
from mugato_ray.data import EpisodeFilter, task_batch_size, task_layouts
from mugato_ray.episodes import read_episodes, store_dir
from mugato_ray.model import GatoModel
from mugato_ray.sequence import SequenceBuilder


def step_time(model: GatoModel, batches, layout) -> tuple[float, int, int, float]:
    """Seconds per forward + backward (median over batches), real tokens, positions computed, mean loss."""
    times, tokens, positions, losses = [], 0, 0, []
    model(batches[0], layout).loss.backward()  # warm-up
    for batch in batches:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        out = model(batch, layout)
        out.loss.backward()
        times.append(time.perf_counter() - t)
        tokens += int(out.num_tokens)
        positions += out.num_positions
        losses.append(float(out.loss.detach()))
    return float(np.median(times)) * len(batches), tokens, positions, float(np.mean(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--tasks", nargs="*", help="a subset of the config's tasks (default: all)")
    ap.add_argument("--batches", type=int, default=6, help="batches per task")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: train.torch_threads or all)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(args.threads or cfg.train.torch_threads or torch.get_num_threads())
    specs, layouts = task_layouts(cfg)
    vocab = next(iter(specs.values())).vocab
    torch.manual_seed(0)
    kw = dict(patch_size=cfg.tokenizer.patch_size, mu=cfg.tokenizer.mu, M=cfg.tokenizer.M)
    packed = GatoModel(cfg.model, vocab, **kw).eval()  # eval: deterministic patch positions, no dropout
    plain = GatoModel(dataclasses.replace(cfg.model, pack=False), vocab, **kw).eval()
    plain.load_state_dict(packed.state_dict())
    print(f"model: {cfg.model.preset} preset, width {packed.n_embd}, context {cfg.model.context}; "
          f"{torch.get_num_threads()} torch thread(s); {args.batches} batches per task")
    print(f"{'task':28s} {'rows':>5s} {'seq':>5s} {'nonpad off':>10s} {'nonpad on':>10s} "
          f"{'real tok/s off':>14s} {'real tok/s on':>14s} {'ratio':>6s}")
    total_off = total_on = 0.0
    for task in args.tasks or [t.name for t in cfg.tasks]:
        layout, bs = layouts[task], task_batch_size(cfg, task)
        episodes = EpisodeFilter.from_config(cfg, task).apply(read_episodes(store_dir(cfg, task)))
        builder = SequenceBuilder(task, specs[task], cfg, seed=0)
        rng = np.random.default_rng(0)
        batches = []
        for _ in range(args.batches):
            pick = rng.choice(len(episodes), size=bs, replace=len(episodes) < bs)
            batches.append({k: torch.from_numpy(v) for k, v in builder.build([episodes[i] for i in pick]).items()})
        t_off, tok, pos_off, loss_off = step_time(plain, batches, layout)
        t_on, tok_on, pos_on, loss_on = step_time(packed, batches, layout)
        if tok != tok_on or not np.isclose(loss_off, loss_on, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{task}: packed and unpacked disagree (tokens {tok} vs {tok_on}, "
                             f"loss {loss_off:.6f} vs {loss_on:.6f})")
        print(f"{task:28s} {bs:5d} {layout.seq_len:5d} {tok / pos_off:10.2f} {tok / pos_on:10.2f} "
              f"{tok / t_off:14,.0f} {tok / t_on:14,.0f} {t_off / t_on:6.2f}")
        total_off, total_on = total_off + t_off / len(batches), total_on + t_on / len(batches)
    # A training step computes one batch of every task (at its batch size): its time off over on.
    print(f"one batch of every task (a mixed training step's forward + backward): {total_off:.3f} s off, "
          f"{total_on:.3f} s on, ratio {total_off / total_on:.2f}")


if __name__ == "__main__":
    main()
