"""Evaluate a policy on every task of a config; write <run_dir>/eval/eval.json, eval.md and a PNG of the scores.

    python jobs/evaluate.py --config configs/smoke.yaml (--checkpoint PATH | --policy expert|random) [key=value ...]
    python jobs/evaluate.py --checkpoint DIR run_dir=/tmp/eval [key=value ...]

PATH is a model file, a training checkpoint directory (holding model.pt) or an export directory (holding
model.safetensors, written by jobs/export.py). The model acts greedily unless
rollout.temperature > 0; eval.prompt=true prompts it with an expert demonstration. Without --config, a
checkpoint directory's own config.yaml (an export's config.json) is used: a checkpoint carries its config,
layouts and BPE tokenizer, so it evaluates on its tasks after its run directory and BPE file are gone. A
checkpoint or snapshot whose step its folder names also adds its scores to <run_dir>/metrics/ (eval.csv,
TensorBoard).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mugato_ray.checkpoints import checkpoint_step, saved_config_file
from mugato_ray.cli import init_ray, parse_job_args
from mugato_ray.evaluate import eval_dir, evaluate, resolve_checkpoint, summary_lines, write_eval_metrics, write_report
from mugato_ray.rollout import PolicySpec


def add_args(parser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="model file, checkpoint directory or export directory to evaluate")
    who.add_argument("--policy", choices=("expert", "random"), help="evaluate a reference policy instead of a model")


def checkpoint_config_file(args) -> Path | None:
    """The run config beside the evaluated model (config.yaml, or an export's config.json), when --checkpoint
    names one that has it."""
    if not args.checkpoint:
        return None
    path = Path(args.checkpoint)
    return saved_config_file(path if path.is_dir() else path.parent)


def main(argv: list[str]) -> None:
    cfg, args = parse_job_args(argv, __doc__, add_args, config_fallback=checkpoint_config_file)
    if args.checkpoint:
        policy = PolicySpec("model", args.checkpoint, temperature=cfg.rollout.temperature)
    else:
        policy = PolicySpec(args.policy)
    init_ray(cfg)
    report = evaluate(cfg, policy)
    paths = write_report(report, eval_dir(cfg))
    step = checkpoint_step(resolve_checkpoint(args.checkpoint)) if args.checkpoint else None
    if step is not None:
        write_eval_metrics(cfg, report, step)
    for line in summary_lines(report):
        print(line)
    for path in paths.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
