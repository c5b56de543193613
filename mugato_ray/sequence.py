"""Sequencing: the seed's (Batch, Episodes, Tokens, Channels) layout.

The seed document calls the second rank "Episodes", but, as it admits itself, that rank holds the
*timesteps* of one episode. Here it is called E (steps). Every tokenized field of a task is an array of
shape (E, T, C):

- E: timesteps (text-only tasks have E = 1),
- T: tokens of that field per timestep (a fixed number per task: padded or capped),
- C: channels: 1 for ids, patch*patch*channels for image patches (kept uint8 until the model).

A batch stacks rows to (B, E, T, C) per field. After embedding, every field has channel D;
concatenating along T gives (B, E, sum T, D), reshaped to (B, E * sum T, D) for the transformer.

Within a timestep the order follows GATO: observation fields (text, images, then the rest, each group
sorted by key), the separator, then the action. Only "action" fields carry loss. The text of a text-only
task and the answer of a vision-language task are the "action" of those tasks: what the model produces.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mugato_ray.episodes import Episode, episodes_from_batch
from mugato_ray.tokenizer import (
    Modality,
    SpaceSpec,
    TextTokenizer,
    VocabLayout,
    encode_actions,
    encode_observations,
    encode_text,
    make_text_tokenizer,
)

if TYPE_CHECKING:
    from mugato_ray.config import Config

Role = Literal["observation", "separator", "action"]

SEPARATOR_KEY = "sep"
STEP_MASK_KEY = "step_mask"
PROMPT_MASK_KEY = "prompt_mask"


@dataclass(frozen=True)
class LayoutField:
    """One field of a timestep, in sequence order."""

    key: str
    """Batch column: "obs/<field key>", "sep", or "act/<field key>"."""
    role: Role
    modality: Modality
    tokens: int
    """T: tokens of this field per timestep."""
    channels: int
    """C: 1 for ids, patch*patch*channels for image patches."""
    grid: tuple[int, int] | None = None
    """(rows, cols) of the patch grid for image fields."""

    @property
    def loss(self) -> bool:
        return self.role == "action"

    @property
    def is_image(self) -> bool:
        return self.modality == Modality.IMAGE


@dataclass(frozen=True)
class SequenceLayout:
    """The fixed shape of every sequence of one task."""

    task: str
    fields: tuple[LayoutField, ...]
    """Fields of one timestep, in sequence order."""
    steps: int
    """E: timesteps per sequence (prompt steps included)."""
    vocab: VocabLayout | None = None
    """The id space (pad fills padded positions); set by :func:`make_layout`."""

    @property
    def step_tokens(self) -> int:
        """Tokens per timestep (sum of T over fields)."""
        return sum(f.tokens for f in self.fields)

    @property
    def seq_len(self) -> int:
        return self.steps * self.step_tokens

    def field(self, key: str) -> LayoutField:
        for f in self.fields:
            if f.key == key:
                return f
        raise KeyError(f"layout of task '{self.task}' has no field '{key}' (fields: {[f.key for f in self.fields]})")

    @property
    def pad(self) -> int:
        if self.vocab is None:
            raise ValueError(f"layout of task '{self.task}' has no vocab; build it with make_layout")
        return self.vocab.pad

    def offsets(self) -> dict[str, int]:
        """Start of each field within a timestep."""
        out, start = {}, 0
        for f in self.fields:
            out[f.key] = start
            start += f.tokens
        return out




# ---------------------------------------------------------------------------------------------
# Layout


def make_layout(task: str, spec: SpaceSpec, context: int, max_steps: int | None = None) -> SequenceLayout:
    """The fixed ``(E, T, C)`` shapes of every sequence of ``task`` for a ``context``-token window.

    Fields in timestep order: ``"obs/<key>"`` in spec order (GATO: text, images, the rest, each sorted
    by key), ``"sep"`` (only when the task has observation AND action fields), ``"act/<key>"``.
    ``E = context // step_tokens``, at most ``max_steps`` (the task's ``window``). A text-only task (no
    observation field, one TEXT action field) is
    one step of ``context`` text tokens: its text fills the whole window.
    """
    if not spec.action:
        raise ValueError(f"task '{task}': the space spec has no action field; nothing would carry loss")
    text_only = not spec.observation and len(spec.action) == 1 and spec.action[0].modality is Modality.TEXT
    obs = [
        LayoutField(f"obs/{f.key}", "observation", f.modality, f.tokens, f.channels, f.grid)
        for f in spec.observation
    ]
    # The separator is an id like any other: DISCRETE tells the model to embed it from the id table.
    sep = [LayoutField(SEPARATOR_KEY, "separator", Modality.DISCRETE, 1, 1)] if obs else []
    act = [
        LayoutField(f"act/{f.key}", "action", f.modality, context if text_only else f.tokens, f.channels, f.grid)
        for f in spec.action
    ]
    fields = (*obs, *sep, *act)
    step_tokens = sum(f.tokens for f in fields)
    if context // step_tokens < 1:
        raise ValueError(
            f"task '{task}': one timestep needs step_tokens={step_tokens} tokens "
            f"({', '.join(f'{f.key}={f.tokens}' for f in fields)}) but model.context={context}; "
            "raise model.context or shrink the observation (e.g. tokenizer.max_text_tokens, image size)"
        )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"task '{task}': a window of max_steps={max_steps} timesteps; use at least 1")
    steps = context // step_tokens if max_steps is None else min(max_steps, context // step_tokens)
    return SequenceLayout(task=task, fields=fields, steps=steps, vocab=spec.vocab)


# ---------------------------------------------------------------------------------------------
# Episode -> per-step tokens


def tokenize_episode(
    ep: Episode,
    spec: SpaceSpec,
    text_tokenizer: TextTokenizer,
    *,
    steps: slice = slice(None),
    layout: SequenceLayout | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize the timesteps ``steps`` of an episode (default: all L): layout key -> ``(L, T, C)``.

    Ids are int32, image patches uint8. ``"sep"`` is full of ``vocab.separator`` (only when the task
    has observation and action fields). A TEXT action (text-only and vision-language tasks) is
    ``ep.actions``, a list of L strings, padded/truncated to T with ``vocab.eos`` after the text when it
    fits, so that generation learns to stop. ``layout`` (from :func:`make_layout`) sets T of a text
    action; without it T comes from the spec. Tokenizing only the steps a window needs keeps image
    episodes cheap.
    """
    if len(spec.action) != 1:
        raise ValueError(f"episode {ep.episode_id!r}: the spec has {len(spec.action)} action fields, expected 1")
    vocab, (act,) = spec.vocab, spec.action
    length = len(range(*steps.indices(ep.length)))
    observations = {key: value[steps] for key, value in ep.observations.items()}
    encoded = encode_observations(spec, observations, text_tokenizer)
    out = {f"obs/{f.key}": _ids_int32(encoded[f.key]) for f in spec.observation}
    if spec.observation:
        out[SEPARATOR_KEY] = np.full((length, 1, 1), vocab.separator, np.int32)
    if act.modality is Modality.TEXT:
        texts = ep.actions[steps]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"episode {ep.episode_id!r}: actions: the text action '{act.key}' expects a list[str], "
                f"got {type(ep.actions).__name__}"
            )
        tokens = layout.field(f"act/{act.key}").tokens if layout is not None else act.tokens
        ids_LxT = encode_text(texts, text_tokenizer, vocab, tokens, append_eos=True)
        out[f"act/{act.key}"] = ids_LxT[..., None].astype(np.int32)
    else:
        out[f"act/{act.key}"] = _ids_int32(encode_actions(spec, np.asarray(ep.actions)[steps])[act.key])
    return out


def _ids_int32(x: np.ndarray) -> np.ndarray:
    """Ids -> int32 (the row format: half the bytes of int64); image patches stay uint8."""
    return x if x.dtype == np.uint8 else x.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Windows, prompts and padding


def _window(length: int, max_steps: int, rng: np.random.Generator) -> tuple[int, int]:
    """``(start, stop)`` of a uniformly placed window of ``min(length, max_steps)`` whole steps."""
    n = min(length, max_steps)
    start = int(rng.integers(0, length - n + 1))
    return start, start + n


def _prompt_range(length: int, rng: np.random.Generator, max_steps: int, end_fraction: float) -> tuple[int, int]:
    """GATO's prompt: with probability ``end_fraction`` the episode's last steps, else a uniform window."""
    n = min(length, max_steps)
    if rng.random() < end_fraction:
        return length - n, length
    start = int(rng.integers(0, length - n + 1))
    return start, start + n


def _assemble(
    layout: SequenceLayout, prompt: dict[str, np.ndarray] | None, window: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Prompt steps, then window steps, then padding up to E, per field; plus the step masks."""
    n_prompt = len(prompt[layout.fields[0].key]) if prompt is not None else 0
    n_real = n_prompt + len(window[layout.fields[0].key])
    if n_real > layout.steps:
        raise ValueError(f"task '{layout.task}': {n_real} steps do not fit E={layout.steps}")
    row = {}
    for f in layout.fields:
        shape = (layout.steps, f.tokens, f.channels)
        out = np.zeros(shape, np.uint8) if f.is_image else np.full(shape, layout.pad, np.int32)
        for part, lo in ((prompt, 0), (window, n_prompt)):
            if part is None:
                continue
            x = part[f.key]
            if x.shape[1:] != shape[1:]:
                raise ValueError(
                    f"task '{layout.task}': field '{f.key}' has steps of shape {x.shape[1:]}, "
                    f"the layout expects (T, C)={shape[1:]}"
                )
            out[lo : lo + len(x)] = x
        row[f.key] = out
    steps_E = np.arange(layout.steps)
    row[STEP_MASK_KEY] = steps_E < n_real
    row[PROMPT_MASK_KEY] = steps_E < n_prompt
    return row


def collate(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack rows of one layout: key -> ``(B, ...)``."""
    if not rows:
        raise ValueError("collate: no rows to stack")
    keys = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != keys:
            raise ValueError(f"collate: row {i} has keys {sorted(row)}, row 0 has {sorted(keys)}")
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def empty_batch(layout: SequenceLayout) -> dict[str, np.ndarray]:
    """A batch of 0 rows with the layout's columns (for an empty input batch)."""
    out = {
        f.key: np.zeros((0, layout.steps, f.tokens, f.channels), np.uint8 if f.is_image else np.int32)
        for f in layout.fields
    }
    out[STEP_MASK_KEY] = np.zeros((0, layout.steps), bool)
    out[PROMPT_MASK_KEY] = np.zeros((0, layout.steps), bool)
    return out


# ---------------------------------------------------------------------------------------------
# The Ray Data callable


class SequenceBuilder:
    """Store rows -> sequence rows of one task; a ``map_batches`` callable class (one per actor).

    Each episode of the batch gives one training sequence (a random window of whole steps). With
    probability ``data.prompt_prob`` a sequence is prompted by another episode of the same batch
    (GATO: a demonstration of the same task), taking up to half of the E steps: its end with
    probability ``data.prompt_end_fraction``, else a uniform window. The randomness is drawn from
    ``(seed, the batch's episode ids)``, so the output depends only on the seed and the batch, not
    on which actor ran it; pass a different seed per epoch for fresh windows.
    """

    def __init__(self, task: str, spec: SpaceSpec, cfg: Config, seed: int = 0):
        self.task, self.spec, self.seed = task, spec, int(seed)
        self.prompt_prob = cfg.data.prompt_prob
        self.prompt_end_fraction = cfg.data.prompt_end_fraction
        self.text_tokenizer = make_text_tokenizer(cfg.tokenizer)
        if self.text_tokenizer.size != spec.vocab.text_size:
            raise ValueError(
                f"task '{task}': tokenizer.text={cfg.tokenizer.text!r} has {self.text_tokenizer.size} ids but the "
                f"spec's vocab has text_size={spec.vocab.text_size}; build both from the same tokenizer config"
            )
        entry = cfg.task(task)
        self.layout = make_layout(task, spec, cfg.model.context, entry.window if entry else None)

    def _rng(self, episodes: list[Episode]) -> np.random.Generator:
        # crc32, not hash(): str hashes are salted per process and would differ between actors.
        key = zlib.crc32("\0".join(ep.episode_id for ep in episodes).encode("utf-8"))
        return np.random.default_rng([self.seed % 2**64, key])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.build(episodes_from_batch(batch))

    def check(self, episodes: Sequence[Episode]) -> None:
        """Raise unless every episode belongs to this task and matches its spec."""
        for i, ep in enumerate(episodes):
            if ep.task != self.task:
                raise ValueError(
                    f"batch row {i}: episode {ep.episode_id!r} belongs to task '{ep.task}', but this "
                    f"SequenceBuilder serves task '{self.task}' (one dataset per task)"
                )
            ep.validate(self.spec)

    def build(self, episodes: list[Episode], *, checked: bool = False,
              tokens: dict[int, dict[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """One training sequence per episode (see the class docstring), stacked: key -> (N, ...).

        Several draws over the same episodes (``data.WindowSampler``) pay the checks and the tokenizing
        once: ``checked`` skips :meth:`check`, and ``tokens`` (a dict kept by the caller, episode index
        -> its whole episode tokenized) is filled on first use and sliced after. Tasks with image fields
        ignore ``tokens``: a window tokenizes only its own steps, so image episodes stay cheap.
        """
        if not episodes:
            return empty_batch(self.layout)
        if not checked:
            self.check(episodes)
        rng, n, layout = self._rng(episodes), len(episodes), self.layout
        if tokens is not None and any(f.is_image for f in layout.fields):
            tokens = None

        def steps_of(i: int, lo: int, hi: int) -> dict[str, np.ndarray]:
            if tokens is None:
                return tokenize_episode(episodes[i], self.spec, self.text_tokenizer, steps=slice(lo, hi), layout=layout)
            if i not in tokens:
                tokens[i] = tokenize_episode(episodes[i], self.spec, self.text_tokenizer, layout=layout)
            return {k: v[lo:hi] for k, v in tokens[i].items()}

        max_prompt = layout.steps // 2
        prompted_N = (rng.random(n) < self.prompt_prob) & (n > 1) & (max_prompt >= 1)
        # A shift in [1, n) never lands on the episode itself.
        other_N = (np.arange(n) + rng.integers(1, max(n, 2), size=n)) % n
        rows = []
        for i, ep in enumerate(episodes):
            prompt = None
            if prompted_N[i]:
                donor = int(other_N[i])
                lo, hi = _prompt_range(episodes[donor].length, rng, max_prompt, self.prompt_end_fraction)
                prompt = steps_of(donor, lo, hi)
            n_prompt = len(prompt[layout.fields[0].key]) if prompt is not None else 0
            lo, hi = _window(ep.length, layout.steps - n_prompt, rng)
            rows.append(_assemble(layout, prompt, steps_of(i, lo, hi)))
        return collate(rows)


# ---------------------------------------------------------------------------------------------
# The flat view


def flatten_ids(batch: dict[str, Any], layout: SequenceLayout, pad: int | None = None) -> tuple[Any, Any, Any]:
    """The flat token view of a batch: ``(ids_BxL int64, valid_BxL bool, loss_BxL bool)``, L = E * step_tokens.

    Fields are concatenated along T within a step, then steps follow each other. Image positions hold
    ``vocab.pad`` in ids (the model embeds them from the patches) but are valid in real steps.
    valid: real step and (image, or id != pad). loss: valid, action field, not a prompt step.
    Works on numpy arrays and, unchanged, on torch tensors (the model's batches). ``pad``: the pad id
    (default: the layout's vocab's).
    """
    step_BxE, prompt_BxE = batch[STEP_MASK_KEY], batch[PROMPT_MASK_KEY]
    xp = _TorchOps(step_BxE) if type(step_BxE).__module__.startswith("torch") else _NumpyOps
    pad = layout.pad if pad is None else pad
    parts = [
        xp.full(batch[f.key].shape[:3], pad, like=step_BxE) if f.is_image else xp.int64(batch[f.key][..., 0])
        for f in layout.fields
    ]
    ids_BxExS = xp.cat(parts, axis=2)
    # Static per-position flags of one step, broadcast over B and E.
    is_image_S = xp.const(np.concatenate([np.full(f.tokens, f.is_image) for f in layout.fields]), like=step_BxE)
    is_loss_S = xp.const(np.concatenate([np.full(f.tokens, f.loss) for f in layout.fields]), like=step_BxE)
    valid_BxExS = step_BxE[:, :, None] & ((ids_BxExS != pad) | is_image_S)
    loss_BxExS = valid_BxExS & is_loss_S & ~prompt_BxE[:, :, None]
    B = ids_BxExS.shape[0]
    return ids_BxExS.reshape(B, -1), valid_BxExS.reshape(B, -1), loss_BxExS.reshape(B, -1)


class _NumpyOps:
    @staticmethod
    def full(shape, value, like):
        return np.full(shape, value, np.int64)

    @staticmethod
    def int64(x):
        return x.astype(np.int64)

    @staticmethod
    def cat(parts, axis):
        return np.concatenate(parts, axis=axis)

    @staticmethod
    def const(x, like):
        return x


class _TorchOps:
    """The same four operations on torch tensors, on the batch's device (torch imported lazily)."""

    def __init__(self, like):
        import torch

        self.torch = torch

    def full(self, shape, value, like):
        return self.torch.full(tuple(shape), value, dtype=self.torch.int64, device=like.device)

    def int64(self, x):
        return x.long()

    def cat(self, parts, axis):
        return self.torch.cat(parts, dim=axis)

    def const(self, x, like):
        return self.torch.as_tensor(x, device=like.device)
