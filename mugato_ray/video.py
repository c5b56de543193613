"""Videos of episodes: the frames an env renders (``render_mode="rgb_array"``), written as MP4, or GIF.

MP4 (H.264, yuv420p: it plays in browsers) goes through imageio's ffmpeg plugin, whose ffmpeg binary the
``imageio-ffmpeg`` package bundles (the ``video`` extra). Where that package is not installed, videos are GIFs
written by imageio's pillow plugin, and ``encoder_note`` says so. A GIF stores each frame with a 256-colour
palette of its own, and Pillow merges identical consecutive frames into one shown for their summed time; an
MP4 keeps every frame. Either way a video of an episode of L steps shows L + 1 frames' time: the frame after
``reset``, then one after each step, each for 1 / the env's ``render_fps`` (a GIF rounds it to hundredths of a
second).

A video is written to a dot-prefixed temporary file and renamed when complete, as the episode store is: a
reader (a browser following a link in eval.md) never sees a partial file.

imageio and its plugins are imported inside functions: only the processes that record load them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_FPS = 30.0
"""Frame rate of an env whose metadata names no ``render_fps``."""
INSTALL_HINT = "pip install imageio-ffmpeg (the project's 'video' extra)"


def mp4_encoder() -> str | None:
    """The ffmpeg executable that imageio-ffmpeg bundles, or None where none is installed."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # the package without its binary (a platform it ships none for)
        return None


def video_format() -> str:
    """"mp4" where an MP4 encoder is installed, else "gif"."""
    return "mp4" if mp4_encoder() is not None else "gif"


def encoder_note(fmt: str) -> str | None:
    """Why videos are GIFs (None for MP4): for the log and eval.md."""
    return None if fmt == "mp4" else f"no MP4 encoder is installed, so videos are GIFs ({INSTALL_HINT} for MP4)"


def task_folder_name(task: str) -> str:
    """A task name as one path component: ``ALE/Pong-v5`` -> ``ALE_Pong-v5``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task).lstrip(".") or "_"


def video_file_name(seed: int, fmt: str) -> str:
    return f"seed-{int(seed)}.{fmt}"


@dataclass(frozen=True)
class VideoRequest:
    """What a rollout call records: the episodes of ``seeds`` (those it runs), into ``folder``."""

    folder: str
    """Shared storage on a multi-node cluster: the actors write here, the report links here."""
    seeds: tuple[int, ...]
    fmt: str = "mp4"
    """"mp4" or "gif", decided once by the caller (``video_format``); "mp4" falls back to "gif" in a process that
    has no MP4 encoder (``actor_format``)."""


def actor_format(request: VideoRequest) -> str:
    """The format this process writes a request's videos in."""
    return "gif" if request.fmt == "gif" or mp4_encoder() is None else "mp4"


class EpisodeVideo:
    """One episode's video, written frame by frame (an MP4 never holds the episode's frames in memory; a GIF
    holds each as 1 byte per pixel until ``close``)."""

    def __init__(self, path: str | Path, fps: float, fmt: str):
        if fmt not in ("mp4", "gif"):
            raise ValueError(f"video format must be 'mp4' or 'gif', got {fmt!r}")
        self.path, self.fps, self.fmt, self.frames = Path(path), float(fps), fmt, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp.{fmt}")  # ffmpeg picks the container by suffix
        self.shape: tuple[int, ...] | None = None
        self._writer = _open_writer(self.tmp, self.fps, fmt)

    def add(self, frame: Any) -> None:
        """Append an (H, W, 3) uint8 frame; every frame of a video has the shape of the first."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"{self.path.name}: a frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        if self.shape is None:
            self.shape = frame.shape
        elif frame.shape != self.shape:
            raise ValueError(f"{self.path.name}: frame {self.frames} has shape {frame.shape}, the first {self.shape}")
        if self.fmt == "mp4":
            self._writer.append_data(_even(frame))
        else:  # bits=8: each frame kept as a 256-colour palette image (GIF's own depth), a third of RGB's bytes
            self._writer.write(frame, is_batch=False, duration=1000.0 / self.fps, loop=0, bits=8)
        self.frames += 1

    def close(self) -> dict:
        """Finish the file and put it in place; returns ``{"file", "format", "frames", "fps", "shape"}``."""
        self._writer.close()
        os.replace(self.tmp, self.path)
        return {"file": str(self.path), "format": self.fmt, "frames": self.frames, "fps": self.fps,
                "shape": list(self.shape or ())}

    def abort(self) -> None:
        """Drop a video that cannot be finished: nothing is left behind."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - a writer that failed may fail to close; the file is removed either way
            pass
        self.tmp.unlink(missing_ok=True)


def _open_writer(tmp: Path, fps: float, fmt: str) -> Any:
    if fmt == "mp4":
        import imageio.v2 as iio

        # macro_block_size=1: frames keep their size (imageio would otherwise scale them to multiples of 16);
        # _even pads an odd side by one pixel, which H.264 in yuv420p needs.
        return iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                              macro_block_size=1, ffmpeg_log_level="error")
    import imageio.v3 as iio

    return iio.imopen(tmp, "w", plugin="pillow", extension=".gif")


def _even(frame: np.ndarray) -> np.ndarray:
    """An (H, W, 3) frame with odd sides padded by one edge pixel (yuv420p halves both sides)."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    return np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else frame


def remove_videos(folder: str | Path, finished: bool = True) -> None:
    """Remove the temporary files an actor that died mid-episode left in ``folder`` and, with ``finished``, the
    videos of an earlier evaluation."""
    folder = Path(folder)
    patterns = [".seed-*.tmp.*"] + (["seed-*.mp4", "seed-*.gif"] if finished else [])
    for path in [p for pattern in patterns for p in folder.glob(pattern)] if folder.is_dir() else []:
        path.unlink(missing_ok=True)


def env_fps(env: Any) -> float:
    """The env's own ``render_fps``, so a video runs at the env's speed."""
    fps = (getattr(env, "metadata", None) or {}).get("render_fps")
    return float(fps) if fps else DEFAULT_FPS


def read_video(path: str | Path) -> tuple[np.ndarray, list[float]]:
    """A video's frames ``(F, H, W, 3)`` uint8 and each frame's duration in ms: what a viewer shows."""
    path = Path(path)
    if path.suffix == ".mp4":
        import imageio.v2 as iio

        reader = iio.get_reader(path, format="FFMPEG")
        try:
            fps = float(reader.get_meta_data()["fps"])
            frames = np.stack([f for f in reader.iter_data()])  # list(reader) asks len(), which is inf here
        finally:
            reader.close()
        return frames, [1000.0 / fps] * len(frames)
    import imageio.v3 as iio

    frames = iio.imread(path, index=None, plugin="pillow", mode="RGB")
    return frames, [float(iio.immeta(path, index=i, plugin="pillow")["duration"]) for i in range(len(frames))]
