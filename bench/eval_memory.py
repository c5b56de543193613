"""Peak memory of an evaluation with 64 environments over 2 rollout actors (32 envs each, lockstep).

    .venv/bin/python bench/eval_memory.py [--config configs/demo.yaml] [--envs-per-actor 32] [--actors 2]
                                          [--episodes 64] [--bound-mib 6144]

Runs ``jobs/evaluate.py`` as a user would (its own local Ray), on the config's tasks with an untrained
model of the config's size (the weights' values do not change the memory; an untrained policy runs long
episodes, the worst case for BabyAI), and samples every process of the job (driver, Ray's own processes,
rollout actors) twice a second. Prints the peak of the summed resident set (RSS, counts shared pages once
per process: an upper bound) and of the summed unique set (USS: what killing the job would free), the
peak per kind of process, and the ratio of the peak RSS to the bound README "Reliability" states.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BOUND_MIB = 3072
"""The bound README "Reliability" states for the default run (64 envs over 2 actors, the demo's tasks)."""


def write_untrained_checkpoint(config: str, folder: Path, overrides: list[str]) -> Path:
    """A checkpoint directory (model, config, layouts) of an untrained model of ``config``."""
    from mugato_ray.checkpoints import write_acting_files
    from mugato_ray.config import load_config
    from mugato_ray.data import task_layouts
    from mugato_ray.learner import build_model

    cfg = load_config(config, [f"run_dir={folder / 'run'}", *overrides])
    specs, layouts = task_layouts(cfg)
    vocab = next(iter(specs.values())).vocab
    write_acting_files(folder / "ckpt", build_model(cfg, vocab), cfg, specs, layouts)
    return folder / "ckpt"


def kind(p: psutil.Process) -> str:
    """A short name for a process: Ray's actors and workers set their titles (ray::RolloutWorker...)."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    first = cmd[0] if cmd else p.name()
    if first.startswith("ray::"):
        return first.split(".")[0]
    if len(cmd) > 1 and cmd[1].endswith(".py"):
        return Path(cmd[1]).name
    return Path(first).name


def sample_tree(root: psutil.Process, peaks: dict, stop: threading.Event) -> None:
    """Every 0.5 s: the tree's summed RSS and USS, and each kind's, into ``peaks`` (max over samples)."""
    while not stop.is_set():
        rss = uss = 0
        by_kind = collections.Counter()
        for p in [root, *root.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss
            uss += info.uss
            by_kind[kind(p)] += info.rss
        peaks["rss"] = max(peaks.get("rss", 0), rss)
        peaks["uss"] = max(peaks.get("uss", 0), uss)
        for k, v in by_kind.items():
            peaks["kind:" + k] = max(peaks.get("kind:" + k, 0), v)
        stop.wait(0.5)


def measure(config: str, actors: int, envs_per_actor: int, episodes: int) -> dict:
    """Run the evaluation job and sample its processes: {"rss", "uss", "kind:<name>": peak bytes, "seconds"}."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_untrained_checkpoint(config, Path(tmp), [])
        cmd = [sys.executable, "jobs/evaluate.py", "--checkpoint", str(ckpt), f"run_dir={tmp}/eval",
               f"rollout.num_actors={actors}", f"rollout.envs_per_actor={envs_per_actor}", f"eval.episodes={episodes}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks, stop = {}, threading.Event()
        sampler = threading.Thread(target=sample_tree, args=(psutil.Process(proc.pid), peaks, stop), daemon=True)
        sampler.start()
        out, _ = proc.communicate()
        stop.set()
        sampler.join()
        peaks["seconds"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the evaluation failed (exit {proc.returncode}):\n{out[-3000:]}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--envs-per-actor", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=64, help="evaluation episodes per task")
    parser.add_argument("--bound-mib", type=float, default=BOUND_MIB, help="the bound README states")
    args = parser.parse_args()
    mib = 2**20
    runs = {n: measure(args.config, args.actors, n, args.episodes) for n in (args.envs_per_actor, 1)}
    for n, peaks in runs.items():
        print(f"evaluation of {args.config}'s tasks, {args.episodes} episodes each, {args.actors * n} envs over "
              f"{args.actors} actors: {peaks['seconds']:.0f} s; peak summed RSS {peaks['rss'] / mib:.0f} MiB, "
              f"peak summed USS {peaks['uss'] / mib:.0f} MiB")
    peaks = runs[args.envs_per_actor]
    for k, v in sorted(((k[5:], v) for k, v in peaks.items() if k.startswith("kind:")), key=lambda kv: -kv[1]):
        print(f"  {k:40s} peak RSS {v / mib:7.0f} MiB")
    one = runs[1]
    print(f"peak RSS, {args.envs_per_actor} envs per actor / 1 env per actor: {peaks['rss'] / one['rss']:.2f}")
    print(f"peak RSS / bound ({args.bound_mib:.0f} MiB): {peaks['rss'] / mib / args.bound_mib:.2f}")


if __name__ == "__main__":
    main()
