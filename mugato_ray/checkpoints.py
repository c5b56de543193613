"""Checkpoint directories: what one holds, how it is written, verified and found again.

A checkpoint is one directory, ``<storage_path>/<run_name>/checkpoint_<step:08d>``, holding:

- ``model.pt``: the weights and model config (``model.save_model``);
- ``state.pt``: ``{"format", "step", "optimizer", "torch_rng"}`` (the optimizer's state dict, the
  optimizer steps done, rank 0's torch RNG state) and, with ``train.ema_decay``, ``"train_model"``: the
  training weights, while ``model.pt`` holds their moving average, the weights the run acts with
  (``mugato_ray.weight_average``);
- ``config.yaml``: the run's config; ``layouts.json``: the task specs and sequence layouts
  (``data.save_layouts``); ``tokenizer.json``: a copy of the BPE when ``tokenizer.text: bpe``;
- ``manifest.json``, written last: the size and SHA-256 of every other file.

Every file loads without executing code (``weights_only`` loads, YAML, JSON).

Verify: a checkpoint is complete when its manifest exists, lists ``model.pt`` and ``state.pt``, and
every file it lists has the listed size and SHA-256 (:func:`verify_checkpoint`). A checkpoint without a
manifest was never completed (the writer was killed before its last file).

Resume: a run resumes from its newest checkpoint that verifies, whatever Ray Train's own bookkeeping
says (:func:`latest_checkpoint`, newest first; each newer one skipped is logged with its reason); when
none verifies, training starts at step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mugato_ray.config import Config, save_config
from mugato_ray.data import LAYOUTS_FILE, load_layouts, save_layouts

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.pt", "state.pt", "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
"""The copy of the BPE tokenizer (``tokenizer.bpe_path``) in a checkpoint of a ``tokenizer.text: bpe`` run."""
MANIFEST_FILE = "manifest.json"
"""Written last into every checkpoint: each file's size and SHA-256, so a checkpoint can be verified."""
EXPORT_MODEL_FILE, EXPORT_CONFIG_FILE = "model.safetensors", "config.json"
"""An export's weights and run config (``mugato_ray.export``): what it holds instead of model.pt and config.yaml."""
STATE_FORMAT = 1
TRAIN_MODEL_KEY = "train_model"
"""state.pt's training weights (a state dict) when model.pt holds their moving average (``train.ema_decay``)."""


def run_name(cfg: Config) -> str:
    """Ray Train run name: the run directory's name (the same run directory resumes the same run)."""
    return Path(cfg.run_dir).resolve().name or "run"


def storage_path(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints: ``train.storage_path`` (a path, or a URI such as ``s3://...``)
    or ``<run_dir>/checkpoints``; paths are made absolute."""
    if cfg.train.storage_path and "://" in cfg.train.storage_path:
        return cfg.train.storage_path
    return str(Path(cfg.train.storage_path or Path(cfg.run_dir) / "checkpoints").resolve())


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """``manifest.json``: size and SHA-256 of every other file of ``directory``; written last, atomically."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"files": manifest}, indent=1))
    return tmp.replace(directory / MANIFEST_FILE)


def checkpoint_step(model_file: str | Path) -> int | None:
    """The training step of a checkpoint's or snapshot's model file, from its folder's name
    (``checkpoint_<step>``, ``step_<step>``); None for a model file kept elsewhere."""
    name = Path(model_file).parent.name
    for prefix in ("checkpoint_", "step_"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def verify_checkpoint(directory: Path) -> str | None:
    """None when ``directory`` is a complete checkpoint whose files match its manifest, else the reason."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (it is written last: the checkpoint was never completed)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({e})"
    for name in (MODEL_FILE, STATE_FILE):
        if name not in files:
            return f"{MANIFEST_FILE} does not list {name}"
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want.get('bytes')}"
        if _sha256(path) != want.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def latest_checkpoint(cfg: Config, warn: bool = True) -> Path:
    """The newest checkpoint of this run that verifies against its manifest, whatever Ray's own bookkeeping
    says (checked newest first, so older ones are not read). Newer ones that do not verify are logged
    (``warn``), each with its reason and folder. FileNotFoundError naming where it looked, and what it
    skipped, when none verifies."""
    if "://" in storage_path(cfg):
        raise ValueError(f"train.storage_path={storage_path(cfg)!r} is not a local or mounted path; open its "
                         "checkpoints with ray.train.Result.from_path")
    root = Path(storage_path(cfg)) / run_name(cfg)
    newest, skipped = None, []
    for d in sorted(root.glob("checkpoint_[0-9]*"), reverse=True) if root.is_dir() else []:
        why = verify_checkpoint(d) if d.is_dir() else "not a directory"
        if why is None:
            newest = d
            break
        skipped.append((d, why))
    if warn:
        for d, why in skipped:
            log.warning("checkpoint %s does not verify (%s); using %s instead. Delete that folder to silence "
                        "this.", d, why, newest or "none (training starts at step 0)")
    if newest is None:
        also = f"; skipped {len(skipped)} that do not verify: {[str(d) for d, _ in skipped][:3]}" if skipped else ""
        raise FileNotFoundError(f"no checkpoint of run '{run_name(cfg)}' under {root}{also}; train first "
                                "(jobs/train.py)")
    return newest


def write_acting_files(directory: Path, model: torch.nn.Module, cfg: Config, specs: dict, layouts: dict) -> Path:
    """Everything needed to act with ``model``, in ``directory``: model.pt, config.yaml, layouts.json and,
    for a BPE tokenizer, its copy tokenizer.json. Evaluation reads these, never the run's config or the
    original BPE file. Returns the model file."""
    from mugato_ray.model import save_model  # lazy: keeps torch out of processes that only read checkpoints

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory / MODEL_FILE)
    save_config(cfg, directory)
    save_layouts(directory / LAYOUTS_FILE, specs, layouts)
    if cfg.tokenizer.text == "bpe" and cfg.tokenizer.bpe_path:
        shutil.copyfile(cfg.tokenizer.bpe_path, directory / TOKENIZER_FILE)
    return directory / MODEL_FILE


def write_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     cfg: Config, specs: dict, layouts: dict, train_model: torch.nn.Module | None = None) -> None:
    """Fill ``directory`` with the acting files of ``model`` (:func:`write_acting_files`), state.pt, then
    manifest.json. ``train_model``: the training weights, when ``model`` is their moving average."""
    import torch  # lazy: keeps torch out of processes that only read checkpoint file names and manifests

    write_acting_files(directory, model, cfg, specs, layouts)
    state = {"format": STATE_FORMAT, "step": step, "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if train_model is not None:
        state[TRAIN_MODEL_KEY] = {k: v.detach().cpu() for k, v in train_model.state_dict().items()}
    torch.save(state, directory / STATE_FILE)
    write_manifest(directory)  # last: a checkpoint without it never completed


def save_local_checkpoint(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                          specs: dict, layouts: dict, train_model: torch.nn.Module | None = None) -> Path:
    """Write a checkpoint straight into the run's storage (complete or absent: a hidden temporary
    directory renamed into place) and keep the newest ``train.keep_checkpoints``."""
    root = Path(storage_path(cfg)) / run_name(cfg)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    write_checkpoint(tmp, model, optimizer, step, cfg, specs, layouts, train_model)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("checkpoint_[0-9]*"))[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def read_state(directory: Path) -> dict[str, Any]:
    """state.pt of a checkpoint directory (``weights_only=True``); ValueError naming the file if bad."""
    import torch  # lazy: as in write_checkpoint

    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise ValueError(f"training state {path} is missing or corrupt: {e}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"training state {path}: expected format {STATE_FORMAT}")
    return state


def find_model_file(path: str | Path) -> Path:
    """A model file, or a directory holding ``model.pt`` (a checkpoint or snapshot) or ``model.safetensors``
    (an export) -> that model file, absolute. FileNotFoundError naming what was expected otherwise."""
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in (MODEL_FILE, EXPORT_MODEL_FILE) if (path / n).is_file()), path / MODEL_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: expected a model file, a checkpoint directory with {MODEL_FILE} "
                                f"or an export directory with {EXPORT_MODEL_FILE}")
    return path.resolve()


def saved_config_file(directory: str | Path) -> Path | None:
    """The run config saved beside a model: ``config.yaml`` (a checkpoint) or ``config.json`` (an export)."""
    return next((Path(directory) / n for n in (CONFIG_FILE, EXPORT_CONFIG_FILE) if (Path(directory) / n).is_file()),
                None)


def checkpoint_layout(model_file: str | Path, task: str, space: Any) -> Any:
    """The layout a checkpoint was trained with for ``task`` (its ``layouts.json``), so that acting uses
    the training window; None when the checkpoint has no layouts file, lacks the task, or was trained on
    another observation/action spec (then the caller derives the layout from the config)."""
    path = Path(model_file).parent / LAYOUTS_FILE
    if not path.is_file():
        return None
    specs, layouts = load_layouts(path)
    if task not in layouts or specs[task] != space:
        return None
    return layouts[task]


# ---------------------------------------------------------------------------------------------
# Snapshots: the weights scored during training (mugato_ray.train_eval)

SNAPSHOTS_DIR = "snapshots"


def snapshot_root(cfg: Config) -> Path:
    return Path(cfg.run_dir) / SNAPSHOTS_DIR


def snapshot_file(cfg: Config, step: int) -> Path:
    """Where the snapshot of ``step`` lives: ``<run_dir>/snapshots/step_<step>/model.pt``."""
    return snapshot_root(cfg) / f"step_{step:08d}" / MODEL_FILE


def write_snapshot(cfg: Config, model: Any, step: int, specs: dict, layouts: dict) -> Path:
    """Save what acting with ``model`` at ``step`` needs (``checkpoints.write_acting_files``: weights, config,
    layouts, BPE tokenizer); returns the model file. ``cfg.run_dir`` must be absolute (resolved in the
    driver): a Ray Train worker does not run in the driver's directory."""
    path = snapshot_file(cfg, step)
    if not path.is_absolute():
        raise ValueError(f"snapshot path {path} is relative; resolve run_dir in the driver first")
    return write_acting_files(path.parent, model, cfg, specs, layouts)
