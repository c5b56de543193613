"""Seen or new: a text task's exact answers split by whether the evaluated problem occurs, answered, in
the training store. Fresh prompts are not always fresh problems: text-arith's additions have operands
below 100, so a 2,000-document store holds about 8,000 of the 10,000 possible sums.

    python bench/text_overlap.py --store <run_dir>/data/text-arith --eval <eval run>/eval/eval.json
        [--task text-arith]

A problem counts as seen when the prompt's last line followed by the expected answer is a line of some
stored document (``"62+25=" + "87"`` against the line ``"62+25=87"``). Prints, per problem type and for
seen and new problems apart, the exact answers out of the problems evaluated: exact answers on the new
ones show an algorithm learned, not a table recalled.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mugato_ray.episodes import read_episodes


def stored_lines(store: Path) -> set[str]:
    """Every line of every stored document (a text episode's one action)."""
    return {line for ep in read_episodes(store) for doc in ep.actions for line in str(doc).splitlines()}


def overlap(per_episode: list[dict], lines: set[str]) -> dict[tuple[str, str], tuple[int, int]]:
    """(problem type, "seen" | "new") -> (exact answers, problems) over an evaluation's per-episode outcomes."""
    exact, total = Counter(), Counter()
    for item in per_episode:
        problem = item["prompt"].rsplit("\n", 1)[-1]
        key = (item.get("type") or "all", "seen" if problem + item["expected"] in lines else "new")
        total[key] += 1
        exact[key] += bool(item["success"])
    return {key: (exact[key], total[key]) for key in sorted(total)}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, type=Path, help="the task's training store (a folder of Parquet)")
    ap.add_argument("--eval", required=True, type=Path, help="an evaluation's eval.json")
    ap.add_argument("--task", default="text-arith")
    args = ap.parse_args(argv)
    tasks = json.loads(args.eval.read_text())["tasks"]
    if args.task not in tasks or not all("prompt" in o for o in tasks[args.task].get("per_episode", [])):
        sys.exit(f"--eval {args.eval}: no answered prompts of task {args.task!r}")
    lines = stored_lines(args.store)
    print(f"{args.store}: {len(lines)} distinct lines")
    for (kind, seen), (ok, n) in overlap(tasks[args.task]["per_episode"], lines).items():
        print(f"{kind:10s} {seen:5s} {ok:4d} of {n:4d} exact ({ok / n:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
