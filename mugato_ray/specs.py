"""Gymnasium spaces -> token specs: which fields a task's observations and actions have, and how each
tokenizes (``tokenizer.FieldSpec``, ``tokenizer.SpaceSpec``). The codecs themselves live in ``tokenizer``.

Discrete / MultiDiscrete / MultiBinary -> DISCRETE; float Box -> CONTINUOUS; uint8 (H, W, 1|3) Box
observations -> IMAGE; other integer Boxes -> DISCRETE; Text -> TEXT; Dict -> key by key, in GATO's order
(text, images, then the rest, each group sorted by key).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mugato_ray.tokenizer import FieldSpec, Modality, SpaceSpec, UnsupportedSpaceError, VocabLayout, patch_grid

if TYPE_CHECKING:
    from mugato_ray.config import TokenizerConfig


_GATO_ORDER = {
    Modality.TEXT: 0,
    Modality.IMAGE: 1,
    Modality.DISCRETE: 2,
    Modality.CONTINUOUS: 2,
}


def _discrete_field(key: str, space: Any, shape, dtype, nvec, start, bins: int) -> FieldSpec:
    nvec = np.asarray(nvec, dtype=np.int64).reshape(-1)
    start = np.broadcast_to(np.asarray(start, dtype=np.int64).reshape(-1), nvec.shape)
    if nvec.size == 0:
        raise UnsupportedSpaceError(f"{key!r}: {space} has no components")
    if nvec.max() > bins:
        raise UnsupportedSpaceError(
            f"{key!r}: {space} has a component with {int(nvec.max())} values, more than "
            f"tokenizer.value_bins={bins} value ids"
        )
    return FieldSpec(
        key=key,
        modality=Modality.DISCRETE,
        shape=tuple(shape),
        dtype=np.dtype(dtype).name,
        tokens=int(nvec.size),
        channels=1,
        nvec=tuple(int(n) for n in nvec),
        start=tuple(int(s) for s in start),
    )


def _leaf_field(key: str, space: Any, cfg: TokenizerConfig, text_tokens: int, is_action: bool) -> FieldSpec:
    from gymnasium import spaces  # lazy: the array functions need no gymnasium

    bins = cfg.value_bins
    if isinstance(space, spaces.Discrete):
        return _discrete_field(key, space, (), space.dtype, [space.n], [space.start], bins)
    if isinstance(space, spaces.MultiDiscrete):
        return _discrete_field(key, space, space.shape, space.dtype, space.nvec, space.start, bins)
    if isinstance(space, spaces.MultiBinary):
        shape = tuple(space.shape)
        n = int(np.prod(shape))
        return _discrete_field(key, space, shape, space.dtype, [2] * n, [0] * n, bins)
    if isinstance(space, spaces.Text):
        if is_action:
            raise UnsupportedSpaceError(f"{key!r}: {space} text action spaces are not supported")
        return FieldSpec(
            key=key,
            modality=Modality.TEXT,
            shape=(),
            dtype="str",
            tokens=text_tokens,
            channels=1,
        )
    if isinstance(space, spaces.Box):
        return _box_field(key, space, cfg, is_action)
    raise UnsupportedSpaceError(
        f"{key!r}: {type(space).__name__} space {space} is not supported "
        "(supported: Discrete, MultiDiscrete, MultiBinary, Box, Text, Dict of those)"
    )


def _box_field(key: str, space: Any, cfg: TokenizerConfig, is_action: bool) -> FieldSpec:
    """A Box: float -> continuous; uint8 (H, W, 1|3) observation -> image patches; other integer -> discrete."""
    shape, dtype = tuple(space.shape), np.dtype(space.dtype)
    if np.issubdtype(dtype, np.floating):
        return FieldSpec(
            key=key,
            modality=Modality.CONTINUOUS,
            shape=shape,
            dtype=dtype.name,
            tokens=int(np.prod(shape)),
            channels=1,
            low=tuple(float(v) for v in np.asarray(space.low, np.float64).reshape(-1)),
            high=tuple(float(v) for v in np.asarray(space.high, np.float64).reshape(-1)),
        )
    looks_like_image = len(shape) == 3 and shape[-1] in (1, 3)
    if dtype == np.uint8 and looks_like_image and not is_action:
        patch = cfg.patch_size
        grid = patch_grid(shape[0], shape[1], patch)
        return FieldSpec(
            key=key,
            modality=Modality.IMAGE,
            shape=shape,
            dtype="uint8",
            tokens=grid[0] * grid[1],
            channels=patch * patch * shape[-1],
            grid=grid,
        )
    if np.issubdtype(dtype, np.integer) and not (looks_like_image and not is_action):
        # A non-image integer Box is a vector of bounded integers: discrete, one token per component,
        # values [low, high] (a uint8 Box gives 256 values per component).
        low = np.asarray(space.low, np.int64).reshape(-1)
        high = np.asarray(space.high, np.int64).reshape(-1)
        return _discrete_field(key, space, shape, dtype, high - low + 1, low, cfg.value_bins)
    raise UnsupportedSpaceError(
        f"{key!r}: {space} is not supported: images must be uint8 Box (H, W, 1|3), other Boxes float or integer"
    )


def _fields(space: Any, key: str, cfg: TokenizerConfig, text_tokens: int, is_action: bool) -> list[FieldSpec]:
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        if is_action:
            raise UnsupportedSpaceError(f"{key!r}: Dict action spaces are not supported, got {space}")
        return [
            f
            for k, sub in space.spaces.items()
            for f in _fields(
                sub,
                k if key == "observation" else f"{key}/{k}",
                cfg,
                text_tokens,
                is_action,
            )
        ]
    return [_leaf_field(key, space, cfg, text_tokens, is_action)]


def space_spec(
    observation_space: Any,
    action_space: Any,
    cfg: TokenizerConfig,
    vocab: VocabLayout,
    text_tokens: int | None = None,
) -> SpaceSpec:
    """Map gymnasium spaces to their tokenization.

    Discrete / MultiDiscrete / MultiBinary -> DISCRETE (every component must have <= value_bins values).
    Float Box -> CONTINUOUS. uint8 Box (H, W, 1|3) observation -> IMAGE. Any other integer Box (including
    a uint8 Box of another shape, and integer Box actions) -> DISCRETE with values ``[low, high]``.
    Text observation -> TEXT with ``text_tokens`` (default ``cfg.max_text_tokens``) tokens.
    Dict observation -> key by key; nested keys joined with "/", fields in GATO order.
    Anything else -> :class:`UnsupportedSpaceError` naming the key and the space.
    """
    if vocab.value_bins != cfg.value_bins:
        raise ValueError(f"vocab has {vocab.value_bins} value bins but tokenizer.value_bins={cfg.value_bins}")
    text_tokens = cfg.max_text_tokens if text_tokens is None else text_tokens
    obs = _fields(observation_space, "observation", cfg, text_tokens, is_action=False)
    obs.sort(key=lambda f: (_GATO_ORDER[f.modality], f.key))
    act = _fields(action_space, "action", cfg, text_tokens, is_action=True)
    return SpaceSpec(
        observation=tuple(obs),
        action=tuple(act),
        vocab=vocab,
        mu=float(cfg.mu),
        M=float(cfg.M),
    )
