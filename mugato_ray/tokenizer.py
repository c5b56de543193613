"""GATO tokenization: one id space, and pure numpy functions from env data to ids and back.

Layout of the id space (built only by :class:`VocabLayout`)::

    [0, text_size)                           text ids (bytes or BPE subwords)
    [value_offset, value_offset + bins)      discrete values and discretized continuous values
    separator, pad, eos                      one id each, after the value range

Per-step tensors follow the project's ``(steps, tokens, channels)`` layout (the seed calls the
steps rank "Episodes"): every ``encode_*`` maps ``E`` steps to ``(E, T, C)`` where ``C`` is 1 for
ids and ``patch * patch * channels`` for uint8 image patches. Images stay uint8 here; the model
normalizes them on the device, which moves 4x fewer bytes than float32 patches.

Continuous values (arXiv 2205.06175, section 2.1):
observations are mu-law encoded, ``F(x) = sgn(x) log(|x| mu + 1) / log(M mu + 1)``, then clipped to
[-1, 1] and put into ``bins`` FIXED uniform bins on [-1, 1]; the same value therefore gets the same
id in any batch. Actions from a bounded Box are scaled linearly from the space bounds to [-1, 1]
instead of mu-law encoded, so that the bins cover exactly the legal range.

Everything here is numpy and vectorized over steps and tokens; only text loops, once per string.
Which fields a Gymnasium space has, and how each tokenizes, is decided in ``mugato_ray.specs``.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mugato_ray.config import TokenizerConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Modalities and the id space
# ---------------------------------------------------------------------------------------------


class Modality(enum.StrEnum):
    """What a field holds; chosen from the gymnasium space, never guessed from a tensor's shape."""

    TEXT = "text"
    IMAGE = "image"
    DISCRETE = "discrete"
    CONTINUOUS = "continuous"


class UnsupportedSpaceError(ValueError):
    """A gymnasium space (or one key of a Dict space) that has no GATO tokenization."""


@dataclass(frozen=True)
class VocabLayout:
    """The one place that builds the id space. Every other module reads its sizes from here."""

    text_size: int
    """Text ids are ``[0, text_size)``."""
    value_bins: int = 1024
    """Value ids are ``[value_offset, value_offset + value_bins)``."""

    def __post_init__(self) -> None:
        if self.text_size < 1:
            raise ValueError(f"VocabLayout.text_size must be >= 1, got {self.text_size}")
        if self.value_bins < 2:
            raise ValueError(f"tokenizer.value_bins must be >= 2, got {self.value_bins}")

    @property
    def value_offset(self) -> int:
        return self.text_size

    @property
    def separator(self) -> int:
        """Between a step's observation tokens and its action tokens."""
        return self.text_size + self.value_bins

    @property
    def pad(self) -> int:
        return self.separator + 1

    @property
    def eos(self) -> int:
        """End of text."""
        return self.separator + 2

    @property
    def size(self) -> int:
        """Total number of ids (the model's embedding and head size)."""
        return self.separator + 3

    def ranges(self) -> dict[str, tuple[int, int]]:
        """name -> half-open ``(lo, hi)``; disjoint and covering ``[0, size)``."""
        return {
            "text": (0, self.text_size),
            "value": (self.value_offset, self.value_offset + self.value_bins),
            "separator": (self.separator, self.separator + 1),
            "pad": (self.pad, self.pad + 1),
            "eos": (self.eos, self.eos + 1),
        }


# ---------------------------------------------------------------------------------------------
# Continuous values
# ---------------------------------------------------------------------------------------------


def _float_array(x: Any) -> np.ndarray:
    """Keep float32/float64 as they are (same dtype out); anything else becomes float64."""
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


def mu_law_encode(x: Any, mu: float = 100.0, M: float = 256.0) -> np.ndarray:
    """``F(x) = sgn(x) * log(|x| mu + 1) / log(M mu + 1)``, elementwise, same float dtype out.

    ``|x| = M`` maps to 1; larger magnitudes map past 1 and are clipped later by :func:`discretize`.
    """
    x = _float_array(x)
    # log1p is log(1 + .) without the rounding of adding 1 to a tiny |x| mu. Huge |x| overflow to
    # inf (encoded as +-inf, which discretize clips to the edge bin): that is the intended result.
    with np.errstate(over="ignore"):
        y = np.sign(x) * np.log1p(np.abs(x) * x.dtype.type(mu)) / x.dtype.type(math.log(M * mu + 1.0))
    return y.astype(x.dtype, copy=False)


def mu_law_decode(y: Any, mu: float = 100.0, M: float = 256.0) -> np.ndarray:
    """Exact inverse of :func:`mu_law_encode`: ``sgn(y) * ((M mu + 1)^|y| - 1) / mu``."""
    y = _float_array(y)
    with np.errstate(over="ignore"):
        x = np.sign(y) * np.expm1(np.abs(y) * y.dtype.type(math.log(M * mu + 1.0))) / y.dtype.type(mu)
    return x.astype(y.dtype, copy=False)


def discretize(x: Any, bins: int = 1024) -> np.ndarray:
    """Clip to [-1, 1] and return the index of its bin among ``bins`` FIXED uniform bins: int64 in
    ``[0, bins)``. Bin ``i`` is ``[-1 + 2i/bins, -1 + 2(i+1)/bins)``; 1.0 falls in the last bin.

    The bins never depend on the data (no per-sample min/max), so a value's id does not depend on
    the batch it comes in.
    """
    x = _float_array(x)
    if np.isnan(x).any():
        raise ValueError("discretize: input contains NaN; episodes must be validated before tokenizing")
    ids = np.floor((np.clip(x, -1.0, 1.0) + 1.0) * (bins / 2.0)).astype(np.int64)
    return np.minimum(ids, bins - 1, out=ids)


def undiscretize(ids: Any, bins: int = 1024) -> np.ndarray:
    """Bin ids ``[0, bins)`` -> bin centers in (-1, 1), float32."""
    ids = np.asarray(ids)
    return ((ids.astype(np.float32) + np.float32(0.5)) * np.float32(2.0 / bins) - np.float32(1.0)).astype(
        np.float32, copy=False
    )


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def patch_grid(height: int, width: int, patch: int = 16) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid; a partial patch at the bottom/right counts (it is zero-padded)."""
    if patch < 1:
        raise ValueError(f"tokenizer.patch_size must be >= 1, got {patch}")
    return -(-height // patch), -(-width // patch)


def image_to_patches(image: np.ndarray, patch: int = 16) -> np.ndarray:
    """Split images into non-overlapping ``patch x patch`` patches in raster order.

    ``(H, W, C) -> (P, patch*patch*C)`` or, with a leading batch, ``(E, H, W, C) -> (E, P, patch*patch*C)``,
    where ``P = rows * cols`` from :func:`patch_grid`. Patch ``r * cols + c`` holds pixel rows
    ``[r*patch, (r+1)*patch)`` and columns ``[c*patch, (c+1)*patch)``, flattened as ``(patch, patch, C)``
    in C order. The dtype is kept (uint8 in the pipeline).

    Padding policy: a side that is not a multiple of ``patch`` is zero-padded at the bottom / right up
    to the next multiple; :func:`patches_to_image` crops it back off.

    Cost: one strided copy straight into the output (no Python loop over patches, no padded temporary).
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image_to_patches: expected (H, W, C) or (E, H, W, C), got shape {image.shape}")
    batched = image.ndim == 4
    x_EHWC = image if batched else image[None]
    E, H, W, C = x_EHWC.shape
    rows, cols = patch_grid(H, W, patch)
    full_r, full_c = H // patch, W // patch
    rem_h, rem_w = H - full_r * patch, W - full_c * patch
    padded = rem_h or rem_w
    # np.zeros is lazily zeroed by the OS, so the padded case costs no extra pass.
    out = (np.zeros if padded else np.empty)((E, rows, cols, patch, patch, C), x_EHWC.dtype)
    # The output seen as (E, rows, patch, cols, patch, C) has the image's index order: assigning into
    # this view performs the whole patch transpose as one vectorized copy.
    out_view = out.transpose(0, 1, 3, 2, 4, 5)
    hf, wf = full_r * patch, full_c * patch
    if full_r and full_c:
        out_view[:, :full_r, :, :full_c] = x_EHWC[:, :hf, :wf].reshape(E, full_r, patch, full_c, patch, C)
    if rem_w and full_r:
        out_view[:, :full_r, :, full_c, :rem_w] = x_EHWC[:, :hf, wf:].reshape(E, full_r, patch, rem_w, C)
    if rem_h and full_c:
        out_view[:, full_r, :rem_h, :full_c] = x_EHWC[:, hf:, :wf].reshape(E, rem_h, full_c, patch, C)
    if rem_h and rem_w:
        out_view[:, full_r, :rem_h, full_c, :rem_w] = x_EHWC[:, hf:, wf:]
    patches = out.reshape(E, rows * cols, patch * patch * C)
    return patches if batched else patches[0]


def patches_to_image(
    patches: np.ndarray,
    height: int,
    width: int,
    patch: int = 16,
    channels: int | None = None,
) -> np.ndarray:
    """Exact inverse of :func:`image_to_patches`: ``(P, patch*patch*C) -> (H, W, C)`` or
    ``(E, P, patch*patch*C) -> (E, H, W, C)``; the zero padding is cropped off.
    ``channels`` defaults to ``patch*patch*C / (patch*patch)``."""
    patches = np.asarray(patches)
    if patches.ndim not in (2, 3):
        raise ValueError(f"patches_to_image: expected (P, D) or (E, P, D), got shape {patches.shape}")
    batched = patches.ndim == 3
    p_EPD = patches if batched else patches[None]
    E, P, D = p_EPD.shape
    if channels is None:
        channels, rest = divmod(D, patch * patch)
        if rest or channels < 1:
            raise ValueError(f"patches_to_image: patch dim {D} is not a multiple of patch*patch={patch * patch}")
    rows, cols = patch_grid(height, width, patch)
    if (P, D) != (rows * cols, patch * patch * channels):
        raise ValueError(
            f"patches_to_image: got patches of shape {(P, D)}, expected {(rows * cols, patch * patch * channels)} "
            f"for a {height}x{width}x{channels} image with patch {patch}"
        )
    out = np.empty((E, height, width, channels), p_EPD.dtype)
    grid_view = p_EPD.reshape(E, rows, cols, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    out[...] = grid_view.reshape(E, rows * patch, cols * patch, channels)[:, :height, :width]
    return out if batched else out[0]


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as ids ``[0, 256)``: offline, no training, exact round-trip for any valid str."""

    size = 256

    def encode(self, text: str) -> np.ndarray:
        """str -> (n_bytes,) int64."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)

    def decode(self, ids: Any, errors: str = "replace") -> str:
        """(n,) ids -> str. ``errors="replace"`` because sampled or truncated ids may split a character."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = ids[(ids < 0) | (ids >= self.size)][0]
            raise ValueError(f"ByteTokenizer.decode: id {int(bad)} is not a byte id in [0, 256)")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors=errors)


def _require_tokenizers():
    try:
        import tokenizers  # optional: only tokenizer.text=bpe needs it
    except ImportError as e:
        raise ImportError(
            "tokenizer.text='bpe' needs the `tokenizers` package (pip install tokenizers); "
            "set tokenizer.text='byte' to use the built-in byte tokenizer instead"
        ) from e
    return tokenizers


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` library, trained locally (see :meth:`train`).

    Byte-level pre-tokenization keeps every str representable, so encode/decode round-trip exactly.
    It has no special tokens: pad, eos and separator live in :class:`VocabLayout`.
    """

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self.size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        tokenizers = _require_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.bpe_path: no tokenizer.json at {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, path: str | Path | None = None) -> BPETokenizer:
        """Train on ``texts`` (offline) and save ``tokenizer.json`` to ``path`` when given."""
        tokenizers = _require_tokenizers()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        # add_prefix_space=False and use_regex=True keep decode(encode(s)) == s exactly.
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tok.save(str(path))
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        """str -> (n,) int64."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = ids[(ids < 0) | (ids >= self.size)][0]
            raise ValueError(f"BPETokenizer.decode: id {int(bad)} is not a text id in [0, {self.size})")
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE locally and save it as ``path`` (a tokenizer.json for tokenizer.bpe_path)."""
    return BPETokenizer.train(texts, vocab_size, path)


TextTokenizer = ByteTokenizer | BPETokenizer


def make_text_tokenizer(cfg: TokenizerConfig) -> TextTokenizer:
    """The text tokenizer named by ``cfg.text`` ("byte" or "bpe")."""
    if cfg.text == "byte":
        return ByteTokenizer()
    if cfg.text == "bpe":
        if not cfg.bpe_path:
            raise ValueError("tokenizer.bpe_path must name a tokenizer.json when tokenizer.text='bpe'")
        return BPETokenizer.load(cfg.bpe_path)
    raise ValueError(f"tokenizer.text must be 'byte' or 'bpe', got {cfg.text!r}")


def make_vocab(cfg: TokenizerConfig, text_tokenizer: TextTokenizer | None = None) -> VocabLayout:
    """The id space for a tokenizer config (text range from the text tokenizer, value bins from cfg)."""
    text_tokenizer = text_tokenizer if text_tokenizer is not None else make_text_tokenizer(cfg)
    return VocabLayout(text_size=text_tokenizer.size, value_bins=cfg.value_bins)


_WARNED_TRUNCATION: set[str] = set()


def encode_text(
    texts: Sequence[str],
    text_tokenizer: TextTokenizer,
    vocab: VocabLayout,
    tokens: int,
    append_eos: bool = False,
    field: str | None = None,
) -> np.ndarray:
    """E strings -> ``(E, tokens)`` int64 text ids, truncated to ``tokens`` and padded with ``vocab.pad``.

    With ``append_eos`` an ``eos`` id follows the text when it fits (free-text tasks need it to
    learn where to stop; a mission string in an observation does not). ``field``: the observation field
    the strings belong to; the first truncation of each such field in a process is logged, since a cut
    mission can lose what the task asks (``tokenizer.max_text_tokens`` sets the budget).
    """
    ids_ET = np.full((len(texts), tokens), vocab.pad, dtype=np.int64)
    # One encode per string; the per-byte work happens inside the tokenizer.
    for e, text in enumerate(texts):
        ids = text_tokenizer.encode(text)
        if field is not None and len(ids) > tokens and field not in _WARNED_TRUNCATION:
            _WARNED_TRUNCATION.add(field)
            log.warning("text observation %r: %r is %d tokens, cut to %d (tokenizer.max_text_tokens); raise it "
                        "if the end matters", field, text, len(ids), tokens)
        ids = ids[:tokens]
        ids_ET[e, : len(ids)] = ids
        if append_eos and len(ids) < tokens:
            ids_ET[e, len(ids)] = vocab.eos
    return ids_ET


def decode_text(ids: Any, text_tokenizer: TextTokenizer, vocab: VocabLayout) -> str:
    """Text ids ``(T,)`` or ``(T, 1)`` -> str, stopping at the first pad or eos.

    Any other non-text id (a value id, the separator) before that raises: nothing is dropped silently.
    """
    ids = np.asarray(ids).reshape(-1)
    stop = np.flatnonzero((ids == vocab.pad) | (ids == vocab.eos))
    ids = ids[: stop[0]] if stop.size else ids
    bad = (ids < 0) | (ids >= vocab.text_size)
    if bad.any():
        raise ValueError(
            f"decode_text: id {int(ids[bad][0])} at position {int(np.flatnonzero(bad)[0])} is not a text id "
            f"in [0, {vocab.text_size}) nor pad/eos"
        )
    return text_tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------
# Field specs (built from Gymnasium spaces by mugato_ray.specs)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One tokenized field of an observation or action."""

    key: str
    """Episode key: Dict keys as-is, nested Dict keys joined with "/"; "observation" / "action" otherwise."""
    modality: Modality
    shape: tuple[int, ...]
    """Raw per-step shape (image: (H, W, C); text: ())."""
    dtype: str
    """Raw numpy dtype name expected in episodes ("uint8", "float32", "int64", "str" for text)."""
    tokens: int
    """T: tokens per step."""
    channels: int
    """C: 1 for ids, patch*patch*C for image patches."""
    low: tuple[float, ...] | None = None
    """Flattened Box bounds (continuous)."""
    high: tuple[float, ...] | None = None
    nvec: tuple[int, ...] | None = None
    """Per-component number of discrete values (discrete)."""
    start: tuple[int, ...] | None = None
    """Per-component smallest discrete value (discrete)."""
    grid: tuple[int, int] | None = None
    """Image patch grid (rows, cols)."""

    @property
    def patch(self) -> int:
        """Image patch side, recovered from ``channels = patch * patch * C``."""
        if self.modality is not Modality.IMAGE:
            raise ValueError(f"field {self.key!r} is {self.modality.value}, not an image: it has no patch size")
        return math.isqrt(self.channels // self.shape[-1])


@dataclass(frozen=True)
class SpaceSpec:
    """How one task's observations and actions become tokens."""

    observation: tuple[FieldSpec, ...]
    """GATO order: text fields, then image fields, then the rest; each group sorted by key."""
    action: tuple[FieldSpec, ...]
    """Exactly one field, key "action"."""
    vocab: VocabLayout
    mu: float = 100.0
    """mu-law constants (tokenizer.mu, tokenizer.M) for continuous values."""
    M: float = 256.0

    @property
    def obs_tokens(self) -> int:
        return sum(f.tokens for f in self.observation)

    @property
    def action_tokens(self) -> int:
        return sum(f.tokens for f in self.action)

    @property
    def step_tokens(self) -> int:
        """Observation tokens + 1 separator + action tokens."""
        return self.obs_tokens + 1 + self.action_tokens

    def field(self, key: str) -> FieldSpec:
        for f in (*self.observation, *self.action):
            if f.key == key:
                return f
        raise KeyError(f"no field {key!r}; fields are {[f.key for f in (*self.observation, *self.action)]}")


# ---------------------------------------------------------------------------------------------
# Encoding and decoding fields
# ---------------------------------------------------------------------------------------------


def _steps(field: FieldSpec, x: Any) -> np.ndarray:
    """Validate ``(E, *shape)`` and flatten to ``(E, T)``."""
    x = np.asarray(x)
    if x.shape[1:] != field.shape or x.ndim != len(field.shape) + 1:
        raise ValueError(f"field {field.key!r}: expected shape (E, *{field.shape}), got {x.shape}")
    return x.reshape(x.shape[0], -1)


def _encode_discrete(field: FieldSpec, vocab: VocabLayout, x: Any) -> np.ndarray:
    x_ET = _steps(field, x)
    if not (np.issubdtype(x_ET.dtype, np.integer) or x_ET.dtype == np.bool_):
        raise ValueError(f"field {field.key!r}: discrete values must be integers, got dtype {x_ET.dtype}")
    v_ET = x_ET.astype(np.int64) - np.asarray(field.start, np.int64)
    bad = (v_ET < 0) | (v_ET >= np.asarray(field.nvec, np.int64))
    if bad.any():
        e, t = np.argwhere(bad)[0]
        raise ValueError(
            f"field {field.key!r}: value {int(x_ET[e, t])} at step {e}, component {t} is outside "
            f"[{field.start[t]}, {field.start[t] + field.nvec[t]})"
        )
    return v_ET + vocab.value_offset


def _bounded(field: FieldSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low_T, high_T = (
        np.asarray(field.low, np.float64),
        np.asarray(field.high, np.float64),
    )
    return low_T, high_T, np.isfinite(low_T) & np.isfinite(high_T)


def _encode_continuous(
    field: FieldSpec, vocab: VocabLayout, x: Any, mu: float, M: float, is_action: bool
) -> np.ndarray:
    x_ET = _float_array(_steps(field, x))
    y_ET = mu_law_encode(x_ET, mu, M)
    if is_action:
        low_T, high_T, bounded_T = _bounded(field)
        width_T = np.where(bounded_T & (high_T > low_T), high_T - low_T, 1.0)
        with np.errstate(invalid="ignore"):  # inf bounds are masked out by bounded_T
            scaled_ET = 2.0 * (x_ET - np.where(bounded_T, low_T, 0.0)) / width_T - 1.0
        y_ET = np.where(bounded_T, scaled_ET, y_ET)
    return discretize(y_ET, vocab.value_bins) + vocab.value_offset


def _value_ids(field: FieldSpec, vocab: VocabLayout, ids: Any) -> np.ndarray:
    """``(E, T)`` or ``(E, T, 1)`` value ids -> ``(E, T)`` offsets into the value range, checked."""
    ids = np.asarray(ids)
    if ids.ndim == 3 and ids.shape[-1] == 1:
        ids = ids[..., 0]
    if ids.ndim != 2 or ids.shape[1] != field.tokens:
        raise ValueError(f"field {field.key!r}: expected ids of shape (E, {field.tokens}[, 1]), got {ids.shape}")
    v_ET = ids.astype(np.int64) - vocab.value_offset
    limit_T = np.asarray(
        field.nvec if field.modality is Modality.DISCRETE else [vocab.value_bins],
        np.int64,
    )
    bad = (v_ET < 0) | (v_ET >= limit_T)
    if bad.any():
        e, t = np.argwhere(bad)[0]
        raise ValueError(f"field {field.key!r}: id {int(ids[e, t])} at step {e}, token {t} is not a legal value id")
    return v_ET


def _decode_continuous(
    field: FieldSpec, vocab: VocabLayout, ids: Any, mu: float, M: float, is_action: bool
) -> np.ndarray:
    y_ET = undiscretize(_value_ids(field, vocab, ids), vocab.value_bins).astype(np.float64)
    x_ET = mu_law_decode(y_ET, mu, M)
    if is_action:
        low_T, high_T, bounded_T = _bounded(field)
        with np.errstate(invalid="ignore"):
            scaled_ET = np.clip(low_T + (y_ET + 1.0) / 2.0 * (high_T - low_T), low_T, high_T)
        x_ET = np.where(bounded_T, scaled_ET, x_ET)
    return x_ET.astype(field.dtype).reshape(-1, *field.shape)


def _decode_discrete(field: FieldSpec, vocab: VocabLayout, ids: Any) -> np.ndarray:
    v_ET = _value_ids(field, vocab, ids) + np.asarray(field.start, np.int64)
    return v_ET.astype(field.dtype).reshape(-1, *field.shape)


def encode_observations(
    spec: SpaceSpec, observations: dict[str, Any], text_tokenizer: TextTokenizer
) -> dict[str, np.ndarray]:
    """E steps of observations -> key -> ``(E, T, C)`` tokens.

    Input: key -> ``(E, *shape)`` array, or a list of E strings for text.
    Output: int64 ids (text ids padded with ``vocab.pad``; discrete and mu-law continuous values shifted
    into the value range), or uint8 ``(E, P, patch*patch*C)`` image patches, not normalized.
    """
    out = {}
    for field in spec.observation:
        if field.key not in observations:
            raise KeyError(f"observation field {field.key!r} is missing; got keys {sorted(observations)}")
        try:
            out[field.key] = _encode_observation(spec, field, observations[field.key], text_tokenizer)
        except (ValueError, TypeError, OverflowError) as e:
            if f"{field.key!r}" in str(e):
                raise
            raise ValueError(f"observation field {field.key!r}: {e}") from e
    return out


def _encode_observation(spec: SpaceSpec, field: FieldSpec, x: Any, text_tokenizer: TextTokenizer) -> np.ndarray:
    vocab = spec.vocab
    if field.modality is Modality.TEXT:
        if isinstance(x, (str, bytes)) or not all(isinstance(t, str) for t in x):
            raise TypeError(f"expected a sequence of E strings, got {type(x).__name__}")
        return encode_text(list(x), text_tokenizer, vocab, field.tokens, field=field.key)[..., None]
    if field.modality is Modality.IMAGE:
        x = np.asarray(x)
        if x.dtype != np.uint8 or x.shape[1:] != field.shape:
            raise ValueError(f"field {field.key!r}: expected uint8 (E, *{field.shape}), got {x.dtype} {x.shape}")
        return image_to_patches(x, field.patch)
    if field.modality is Modality.DISCRETE:
        return _encode_discrete(field, vocab, x)[..., None]
    return _encode_continuous(field, vocab, x, spec.mu, spec.M, is_action=False)[..., None]


def decode_observations(
    spec: SpaceSpec, tokens: dict[str, np.ndarray], text_tokenizer: TextTokenizer
) -> dict[str, Any]:
    """Inverse of :func:`encode_observations` (exact for text within T tokens, images and discrete values;
    continuous values come back as bin centers)."""
    out: dict[str, Any] = {}
    for field in spec.observation:
        x = np.asarray(tokens[field.key])
        if field.modality is Modality.TEXT:
            out[field.key] = [decode_text(row, text_tokenizer, spec.vocab) for row in x]
        elif field.modality is Modality.IMAGE:
            out[field.key] = patches_to_image(x, field.shape[0], field.shape[1], field.patch, field.shape[2])
        elif field.modality is Modality.DISCRETE:
            out[field.key] = _decode_discrete(field, spec.vocab, x)
        else:
            out[field.key] = _decode_continuous(field, spec.vocab, x, spec.mu, spec.M, is_action=False)
    return out


def encode_actions(spec: SpaceSpec, actions: Any) -> dict[str, np.ndarray]:
    """``(E, *shape)`` env actions -> ``{"action": (E, T, 1) int64}`` value ids.

    Discrete: ``value - start + value_offset``. Continuous: each component with finite bounds is scaled
    linearly from ``[low, high]`` to [-1, 1] (not mu-law), then discretized (values outside the bounds
    clip to the edge bins); a component with an infinite bound is mu-law encoded like an observation.
    """
    (field,) = spec.action
    if field.modality is Modality.DISCRETE:
        ids_ET = _encode_discrete(field, spec.vocab, actions)
    else:
        ids_ET = _encode_continuous(field, spec.vocab, actions, spec.mu, spec.M, is_action=True)
    return {field.key: ids_ET[..., None]}


def decode_actions(spec: SpaceSpec, ids: Any) -> np.ndarray:
    """Action ids ``(E, T)`` or ``(E, T, 1)`` -> env actions ``(E, *shape)`` in the space's dtype.

    Exact inverse for discrete; continuous gives the bin center, unscaled (bounded) or mu-law decoded.
    An id outside the field's legal values raises (see :func:`legal_action_mask`).
    """
    (field,) = spec.action
    if field.modality is Modality.DISCRETE:
        return _decode_discrete(field, spec.vocab, ids)
    return _decode_continuous(field, spec.vocab, ids, spec.mu, spec.M, is_action=True)


def continuous_action_values(spec: SpaceSpec) -> np.ndarray | None:
    """``(action_tokens, vocab.size)`` float64: the env value each value id decodes to, per action token
    (:func:`decode_actions`: bin centres, unscaled or mu-law decoded); 0.0 at ids that are not values.
    ``None`` for a discrete action. Acting reads it to decode an action by its expected value."""
    (field,) = spec.action
    if field.modality is not Modality.CONTINUOUS:
        return None
    vocab = spec.vocab
    ids_BxT = np.repeat(vocab.value_offset + np.arange(vocab.value_bins)[:, None], field.tokens, axis=1)
    values_BxT = decode_actions(spec, ids_BxT).reshape(vocab.value_bins, field.tokens).astype(np.float64)
    out_TxV = np.zeros((field.tokens, vocab.size), np.float64)
    out_TxV[:, vocab.value_offset : vocab.value_offset + vocab.value_bins] = values_BxT.T
    return out_TxV


def legal_action_mask(spec: SpaceSpec) -> np.ndarray:
    """``(action_tokens, vocab.size)`` bool: the ids each action token may take when sampling.

    Discrete component with n values: ``value_offset + [0, n)``; continuous: all ``value_bins`` value ids.
    """
    vocab = spec.vocab
    n_T = np.concatenate(
        [np.asarray(f.nvec if f.modality is Modality.DISCRETE else [vocab.value_bins] * f.tokens) for f in spec.action]
    )
    v_V = np.arange(vocab.size) - vocab.value_offset
    return (v_V[None, :] >= 0) & (v_V[None, :] < n_T[:, None])
