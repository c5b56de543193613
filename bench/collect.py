"""Collection throughput: env steps/s of the rollout worker with 1 vs N envs, and of 1 vs 2 rollout actors.

Run: .venv/bin/python bench/collect.py [--envs 8] [--actors 2] [--repeats 3] [--scale 1.0]

Rows: CartPole-v1 with its scripted expert, BabyAI-GoToRedBall-v0 with the BabyAI bot, and CartPole-v1
acted by an untrained `tiny` GATO model (greedy), where batching the N envs into one forward pays most.
- vectorization: one in-process RolloutWorker with 1 env, then with N envs, on the same seeds;
- actors: the same seeds split over 1 actor, then over `--actors` actors (N envs each); wall time of the
  pool after a warm-up call (actor start-up and imports are not counted).
Each figure is the best of `--repeats` interleaved runs, which filters out bursts of load from other
processes. Steps are those of finished episodes; the idle tail of a call (slots without seeds left) is
paid, not counted. Ratios in one run are the numbers to compare: these machines are shared and noisy.
"""

import os

# One thread per process, as in a Ray actor with num_cpus=1: in-process and actor figures compare.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import ray  # noqa: E402

from mugato_ray.config import config_from_dict  # noqa: E402
from mugato_ray.rollout import PolicySpec, RolloutActor, RolloutWorker  # noqa: E402


def tiny_checkpoint(cfg, folder: str) -> str:
    import torch

    from mugato_ray.model import GatoModel, save_model
    from mugato_ray.tokenizer import make_vocab

    torch.manual_seed(0)
    return str(save_model(GatoModel(cfg.model, make_vocab(cfg.tokenizer)), os.path.join(folder, "tiny.pt")))


def best_rates(runs: dict, seeds: list[int], repeats: int) -> dict[str, float]:
    """runs: name -> fn(seeds) -> (env_steps, seconds); best steps/s of each over interleaved repeats."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            steps, seconds = run(seeds)
            best[name] = max(best[name], steps / seconds)
    return best


def in_process(worker: RolloutWorker):
    def run(seeds):
        res = worker.sample(seeds, return_episodes=False)
        return res.env_steps, res.seconds
    return run


def pool(actors: list):
    def run(seeds):
        t0 = time.perf_counter()
        parts = [seeds[k::len(actors)] for k in range(len(actors))]
        results = ray.get([a.sample.remote(p, return_episodes=False) for a, p in zip(actors, parts)])
        return sum(r.env_steps for r in results), time.perf_counter() - t0
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=8, help="envs per worker in the vectorized runs")
    parser.add_argument("--actors", type=int, default=2, help="actors in the parallel runs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per figure (best is kept)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the episodes per run")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="mugato-bench-collect-")
    cfg = config_from_dict({"run_dir": tmp, "model": {"preset": "tiny", "context": 256},
                            "rollout": {"max_episode_steps": 100}})
    rows = [  # label, task, policy, episodes per run
        ("CartPole-v1 expert", "CartPole-v1", PolicySpec("expert"), 32),
        ("BabyAI-GoToRedBall bot", "BabyAI-GoToRedBall-v0", PolicySpec("expert"), 96),
        ("CartPole-v1 tiny model", "CartPole-v1", PolicySpec("model", tiny_checkpoint(cfg, tmp)), 48),
    ]
    ray.init(num_cpus=max(args.actors + 1, len(os.sched_getaffinity(0))), include_dashboard=False,
             logging_level=logging.ERROR)
    print(f"{'policy':<24} {'1 env':>8} {f'{args.envs} envs':>8} {'ratio':>6}   "
          f"{'1 actor':>8} {f'{args.actors} actors':>8} {'ratio':>6}   (env steps/s; episodes capped at 100 steps)")
    for label, task, policy, episodes in rows:
        seeds = list(range(max(args.envs * args.actors, int(episodes * args.scale))))
        warm = [10**6 + i for i in range(args.envs)]
        workers = {n: RolloutWorker(task, policy, cfg, num_envs=n) for n in (1, args.envs)}
        for w in workers.values():
            w.sample(warm[:w.num_envs], return_episodes=False)
        vec = best_rates({n: in_process(w) for n, w in workers.items()}, seeds, args.repeats)
        pools = {k: [RolloutActor.options(num_cpus=1).remote(task, policy, cfg, args.envs) for _ in range(k)]
                 for k in (1, args.actors)}
        ray.get([a.sample.remote(warm, return_episodes=False) for p in pools.values() for a in p])
        par = best_rates({k: pool(p) for k, p in pools.items()}, seeds, args.repeats)
        for p in pools.values():
            for a in p:
                ray.kill(a)
        v1, vn, a1, an = vec[1], vec[args.envs], par[1], par[args.actors]
        print(f"{label:<24} {v1:>8.0f} {vn:>8.0f} {vn / v1:>6.2f}   {a1:>8.0f} {an:>8.0f} {an / a1:>6.2f}")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
