"""Export a checkpoint as a Hugging Face-style model repository: model.safetensors, config.json, layouts.json,
tokenizer.json (BPE runs) and a model card (README.md) with the evaluation table.

    python jobs/export.py --checkpoint PATH --out DIR [--eval EVAL_JSON]

PATH is what jobs/evaluate.py --checkpoint accepts (a model file, a checkpoint directory or an export). The
card's evaluation is EVAL_JSON, else the eval/eval.json of the checkpoint's run when it evaluated this very
checkpoint. DIR must be new (or empty). Load it with mugato_ray.export.load_export(DIR) (no pickle), evaluate it
with jobs/evaluate.py --checkpoint DIR, upload it with `huggingface-cli upload NAME DIR` where a hub is reachable.
"""

from __future__ import annotations

import argparse
import sys

from mugato_ray.export import export_model


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model file, checkpoint directory or export directory")
    parser.add_argument("--out", required=True, help="the new directory to write the export into")
    parser.add_argument("--eval", help="eval.json to put in the model card (default: found beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        export_model(args.checkpoint, args.out, eval_json=args.eval)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # CheckpointError and ConfigError are ValueErrors
        parser.error(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
