"""Tasks without an environment: text and vision-language data as episodes.

GATO trains on text and captioned/VQA images next to agent experience, in the same token layout.
Here they enter the same episode store, with the same schema, as tasks whose "action" is text:

- A text episode has one step (E = 1): ``observations = {}``, ``actions = ["<the chunk>"]``,
  ``rewards = [0.0]``. The whole text is the action, so the loss covers all of it (GATO text).
  Its SpaceSpec has no observation fields and one TEXT action field "text" with ``model.context`` tokens.
- A VQA episode has one step: ``observations = {"image": (1, H, W, 3) uint8, "question": [str]}``,
  ``actions = [answer]``, ``rewards = [1.0]``, ``success = True``. The stored answer is correct by
  construction, so it gets the reward an evaluated answer gets when it is exactly right: the mean
  return of an evaluation is then its accuracy, and this data scores 1.0 like an expert.

Every episode is ``source="expert"`` (ground-truth data), ``terminated=True``.

Datasets (``DATASETS``, a plain table):

- "arith": generated, exactly scorable text lines ``"12+7=19\\n"`` and ``"reverse: abc -> cba\\n"``,
  packed into one episode up to the context. :func:`score_text_answer` checks a completion of a
  prompt such as ``"12+7="``.
- "vqa_color": renders of a MiniGrid room holding one ball, key or box of a random color, asked
  "what color is the ball?" (-> "red") or "what object is in the room?" (-> "key").
- "text_files": every .txt and .jsonl file under a folder (default: the bundled ``data_samples/text``),
  chunked on token boundaries of the configured text tokenizer (:func:`text_file_episodes`).

An episode generated from seed ``s`` depends on ``s`` only, so ``generate_episodes(task, n, seed)``
yields episodes for seeds ``seed, seed + 1, ..., seed + n - 1`` and a longer run extends a shorter one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mugato_ray.episodes import Episode
from mugato_ray.specs import space_spec
from mugato_ray.tasks import get_task
from mugato_ray.tokenizer import (
    FieldSpec,
    Modality,
    SpaceSpec,
    TextTokenizer,
    make_text_tokenizer,
    make_vocab,
)

if TYPE_CHECKING:
    from mugato_ray.config import Config

DEFAULT_TEXT_FOLDER = Path(__file__).resolve().parent / "data_samples" / "text"
"""The bundled sample corpus of the "text_files" dataset."""

ARITH_MAX_OPERAND = 100
"""Addition operands are drawn from [0, ARITH_MAX_OPERAND)."""
ARITH_WORD_LENGTHS = (3, 7)
"""Reversal words have a length in [lo, hi) letters a-z."""

VQA_ROOM = 8
"""Side of the MiniGrid room in cells, walls included."""
VQA_TILE = 8
"""Pixels per cell: the image is (VQA_ROOM * VQA_TILE)^2 = 64x64, i.e. 4x4 patches of 16."""
VQA_OBJECTS = ("ball", "box", "key")
VQA_QUESTION_COLOR = "what color is the {obj}?"
VQA_QUESTION_OBJECT = "what object is in the room?"
VQA_QUESTION_TOKENS = 32
"""Text tokens of the question field (every question fits; checked when the spec is built)."""
VQA_ANSWER_TOKENS = 8
"""Text tokens of the answer field: the longest answer plus an end-of-text id fit."""


class DatasetError(ValueError):
    """A dataset name, file or line is wrong; the message names it and what was expected."""


@dataclass(frozen=True)
class DatasetInfo:
    """One non-environment dataset: a row of ``DATASETS``."""

    name: str
    kind: Literal["text", "vqa"]
    """"text": no observation, the text is the action; "vqa": image + question -> answer."""
    description: str
    generate: Callable[[str, int, int, Any], list[Episode]]
    """(task name, n, seed, cfg) -> episodes."""
    scorable: bool
    """Whether :func:`score_text_answer` can score answers exactly."""
    problem_type: Callable[[str], str] | None = None
    """A scorable prompt -> the type of problem it poses (arith: "addition" or "reversal"), so that a report can
    give exact match per type: one overall number can hide a type that is never answered."""


# ------------------------------------------------------------------------------------ episodes


def _episode(task: str, episode_id: str, seed: int, observations: dict, answer: str, reward: float) -> Episode:
    return Episode(
        task=task,
        episode_id=episode_id,
        source="expert",
        seed=int(seed),
        observations=observations,
        actions=[answer],
        rewards=np.full(1, reward, np.float32),
        terminated=True,
        success=True if reward > 0 else None,
    )


# ----------------------------------------------------------------------------------- arith


def arith_problems(rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """``k`` random (prompt, answer) pairs: half additions ``"12+7=" -> "19"``, half reversals
    ``"reverse: abc -> " -> "cba"``. The draws are vectorized; only the string formatting loops."""
    is_add_K = rng.integers(0, 2, k).astype(bool)
    a_K, b_K = rng.integers(0, ARITH_MAX_OPERAND, (2, k))
    lo, hi = ARITH_WORD_LENGTHS
    letters_KW = rng.integers(ord("a"), ord("z") + 1, (k, hi - 1)).astype(np.uint8)
    len_K = rng.integers(lo, hi, k)
    out = []
    for add, a, b, letters, n in zip(is_add_K, a_K, b_K, letters_KW, len_K):
        if add:
            out.append((f"{a}+{b}=", str(a + b)))
        else:
            word = letters[:n].tobytes().decode("ascii")
            out.append((f"reverse: {word} -> ", word[::-1]))
    return out


_ADD = re.compile(r"(\d+)\+(\d+)=")
_REVERSE = re.compile(r"reverse: ([a-z]+) -> ")


def _arith_problem(prompt: str) -> tuple[str, re.Match]:
    """The problem on the prompt's last line (earlier lines are examples): ("addition" | "reversal", its match)."""
    last = prompt.rsplit("\n", 1)[-1]
    if m := _ADD.fullmatch(last):
        return "addition", m
    if m := _REVERSE.fullmatch(last):
        return "reversal", m
    raise DatasetError(f"arith: the prompt's last line {last!r} is not 'a+b=' nor 'reverse: word -> '")


def arith_answer(prompt: str) -> str:
    """The exact answer to the problem on the prompt's last line."""
    kind, m = _arith_problem(prompt)
    return str(int(m[1]) + int(m[2])) if kind == "addition" else m[1][::-1]


def arith_problem_type(prompt: str) -> str:
    """"addition" or "reversal": the problem on the prompt's last line."""
    return _arith_problem(prompt)[0]


def _arith_text(rng: np.random.Generator, tok: TextTokenizer, budget: int) -> str:
    """Problem lines packed up to ``budget`` text tokens (at least one line)."""
    lines: list[str] = []
    used = 0
    while True:
        block = [p + a + "\n" for p, a in arith_problems(rng, 32)]
        cum = used + np.cumsum([len(tok.encode(line)) for line in block])
        take = int(np.searchsorted(cum, budget, side="right"))
        lines += block[:take]
        if take < len(block):
            break
        used = int(cum[-1])
    if not lines:
        raise DatasetError(f"arith: model.context={budget} tokens cannot hold one problem line")
    # Line token counts add up for byte-level tokenizers; a BPE could merge across lines, so check the whole.
    while len(lines) > 1 and len(tok.encode("".join(lines))) > budget:
        lines.pop()
    return "".join(lines)


def _arith_episodes(task: str, n: int, seed: int, cfg: Config) -> list[Episode]:
    tok = make_text_tokenizer(cfg.tokenizer)
    return [
        _episode(task, f"{task}-s{s}", s, {}, _arith_text(np.random.default_rng(s), tok, cfg.model.context), 0.0)
        for s in range(seed, seed + n)
    ]


# -------------------------------------------------------------------------------------- vqa


@functools.cache
def _object_room_class() -> type:
    # minigrid (and pygame under it) is imported only when VQA data is generated.
    from minigrid.core.constants import COLOR_NAMES
    from minigrid.core.grid import Grid
    from minigrid.core.mission import MissionSpace
    from minigrid.core.world_object import Ball, Box, Key
    from minigrid.minigrid_env import MiniGridEnv

    kinds = {"ball": Ball, "box": Box, "key": Key}

    class ObjectRoomEnv(MiniGridEnv):
        """An empty room with the agent and one ball, box or key of a random color.

        After ``reset(seed=s)``: ``obj`` is the object, ``mission`` the question, ``answer`` its answer.
        """

        def __init__(self, size: int = VQA_ROOM):
            super().__init__(
                mission_space=MissionSpace(mission_func=lambda: VQA_QUESTION_OBJECT),
                grid_size=size,
                max_steps=1,
                see_through_walls=True,
            )

        def _gen_grid(self, width: int, height: int) -> None:
            self.grid = Grid(width, height)
            self.grid.wall_rect(0, 0, width, height)
            kind = self._rand_elem(VQA_OBJECTS)
            self.obj = kinds[kind](self._rand_elem(COLOR_NAMES))
            self.place_obj(self.obj)
            self.place_agent()
            if self._rand_bool():
                self.mission, self.answer = VQA_QUESTION_COLOR.format(obj=kind), self.obj.color
            else:
                self.mission, self.answer = VQA_QUESTION_OBJECT, kind

    return ObjectRoomEnv


def vqa_scene(seed: int, env: Any = None) -> tuple[Any, np.ndarray, str, str]:
    """The scene of episode seed ``seed``: (env after reset, (H, W, 3) uint8 render, question, answer).

    ``env`` reuses an environment from an earlier call; the scene depends on ``seed`` only.
    """
    env = env if env is not None else _object_room_class()()
    env.reset(seed=int(seed))
    image_HWC = env.get_frame(highlight=False, tile_size=VQA_TILE)
    return env, image_HWC, env.mission, env.answer


def _vqa_episodes(task: str, n: int, seed: int, cfg: Config) -> list[Episode]:
    env, out = None, []
    for s in range(seed, seed + n):
        env, image_HWC, question, answer = vqa_scene(s, env)
        obs = {"image": image_HWC[None], "question": [question]}
        out.append(_episode(task, f"{task}-s{s}", s, obs, answer, 1.0))
    return out


def vqa_problem_type(question: str) -> str:
    """"object" (what object is in the room?) or "color" (what color is the <obj>?)."""
    if question == VQA_QUESTION_OBJECT:
        return "object"
    if question in {VQA_QUESTION_COLOR.format(obj=k) for k in VQA_OBJECTS}:
        return "color"
    raise DatasetError(f"vqa: {question!r} is none of the dataset's questions")


def _vqa_texts() -> tuple[list[str], list[str]]:
    """Every question and every answer the VQA dataset can produce."""
    from minigrid.core.constants import COLOR_NAMES

    questions = [VQA_QUESTION_OBJECT] + [VQA_QUESTION_COLOR.format(obj=k) for k in VQA_OBJECTS]
    return questions, [*VQA_OBJECTS, *COLOR_NAMES]


# -------------------------------------------------------------------------------- text files


def chunk_text(text: str, tok: TextTokenizer, max_tokens: int, where: str = "text") -> list[str]:
    """Split ``text`` on token boundaries of ``tok`` into pieces of at most ``max_tokens`` tokens.

    Every piece round-trips: ``tok.encode(piece)`` are exactly the ids of ``text``'s encoding it was cut
    from, so no piece splits a UTF-8 character (byte tokenizer) and ``"".join(pieces) == text``.
    Greedy: each piece is the longest prefix of the rest (at most ``max_tokens``) that round-trips.
    Loops once per piece, and per backed-off token at a boundary that does not round-trip.
    """
    ids = tok.encode(text)
    pieces, start, n = [], 0, len(ids)
    while start < n:
        end = min(start + max_tokens, n)
        while end > start:
            piece = tok.decode(ids[start:end])
            if np.array_equal(tok.encode(piece), ids[start:end]):
                break
            end -= 1  # the cut splits a character (or a BPE merge): back off one token
        if end == start:
            raise DatasetError(
                f"{where}: no cut of at most {max_tokens} tokens round-trips at token {start}; "
                "model.context is smaller than one character"
            )
        pieces.append(piece)
        start = end
    return pieces


def _read_utf8(path: Path) -> str:
    try:
        # Bytes, not read_text: universal newlines would rewrite "\r\n" and the chunks must match the file.
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _documents(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file has one ``{"text": str}`` object per non-blank line."""
    text = _read_utf8(path)
    if path.suffix == ".txt":
        return [text]
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DatasetError(f'{path} line {lineno}: expected an object with a string "text" field, got {line[:60]!r}')
        docs.append(obj["text"])
    return docs


def text_files(folder: str | Path) -> list[Path]:
    """Every non-hidden .txt and .jsonl file under ``folder``, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"text folder {folder} does not exist or is not a directory")
    found = sorted(
        p for p in folder.rglob("*")
        if p.suffix in (".txt", ".jsonl") and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not found:
        raise DatasetError(f"text folder {folder} holds no .txt or .jsonl files")
    return found


def text_file_episodes(folder: str | Path, task: str, cfg: Config) -> list[Episode]:
    """One episode per chunk of every document under ``folder`` (see :func:`text_files`).

    Chunks hold at most ``cfg.model.context`` tokens of ``cfg.tokenizer``'s text tokenizer; empty
    documents give no episode. Episode ids are ``<task>:<relative path>:<document>:<chunk>`` and seeds
    count the episodes in order. A malformed .jsonl line raises DatasetError naming the file and line.
    """
    folder = Path(folder)
    tok = make_text_tokenizer(cfg.tokenizer)
    out = []
    for path in text_files(folder):
        rel = path.relative_to(folder).as_posix()
        for d, doc in enumerate(_documents(path)):
            for c, piece in enumerate(chunk_text(doc, tok, cfg.model.context, where=f"{path} document {d}")):
                out.append(_episode(task, f"{task}:{rel}:{d}:{c}", len(out), {}, piece, 0.0))
    return out


def _text_file_folder(cfg: Config) -> Path:
    # data.text_folder is the config knob for this dataset; configs without it use the bundled samples.
    folder = cfg.data.text_folder
    return Path(folder) if folder else DEFAULT_TEXT_FOLDER


def _text_file_task_episodes(task: str, n: int, seed: int, cfg: Config) -> list[Episode]:
    """The first ``n`` chunks in file order; a corpus is fixed data, so ``seed`` does not change it."""
    return text_file_episodes(_text_file_folder(cfg), task, cfg)[:n]


DATASETS: dict[str, DatasetInfo] = {
    "arith": DatasetInfo(
        "arith", "text", "additions 'a+b=c' and reversals 'reverse: w -> w[::-1]', packed to the context",
        _arith_episodes, scorable=True, problem_type=arith_problem_type,
    ),
    "vqa_color": DatasetInfo(
        "vqa_color", "vqa", "MiniGrid room with one object: 'what color is the <obj>?' / 'what object is in the room?'",
        _vqa_episodes, scorable=True, problem_type=vqa_problem_type,
    ),
    "text_files": DatasetInfo(
        "text_files", "text", ".txt and .jsonl files of a folder, chunked to the context",
        _text_file_task_episodes, scorable=False,
    ),
}


# ---------------------------------------------------------------------------- public entry points


def resolve(name: str) -> DatasetInfo:
    """The dataset of a dataset name (a key of DATASETS) or of a dataset task's name (mugato_ray.tasks)."""
    if name in DATASETS:
        return DATASETS[name]
    try:
        info = get_task(name)
    except (KeyError, ValueError) as e:
        raise DatasetError(f"{name!r} is neither a dataset ({sorted(DATASETS)}) nor a task: {e}") from e
    if info.dataset not in DATASETS:
        raise DatasetError(f"task {name!r} has dataset {info.dataset!r}, expected one of {sorted(DATASETS)}")
    return DATASETS[info.dataset]


def text_field(key: str, tokens: int) -> FieldSpec:
    """A TEXT field of ``tokens`` ids per step (str entries in episodes)."""
    return FieldSpec(key=key, modality=Modality.TEXT, shape=(), dtype="str", tokens=int(tokens), channels=1)


def _check_fits(texts: list[str], tok: TextTokenizer, tokens: int, field: str, eos: bool) -> None:
    need = max(len(tok.encode(t)) for t in texts) + int(eos)
    if need > tokens:
        raise DatasetError(f"vqa_color: field {field!r} has {tokens} tokens but its texts need {need}")


def dataset_spec(task_name_or_dataset: str, cfg: Config) -> SpaceSpec:
    """How a dataset's episodes tokenize.

    text: ``observation=()``, ``action=(text "text" of model.context tokens,)``.
    vqa: ``observation=(text "question", image "image")`` (GATO order), ``action=(text "answer",)``.
    """
    info = resolve(task_name_or_dataset)
    tcfg = cfg.tokenizer
    tok = make_text_tokenizer(tcfg)
    vocab = make_vocab(tcfg, tok)
    if info.kind == "text":
        return SpaceSpec(observation=(), action=(text_field("text", cfg.model.context),), vocab=vocab,
                         mu=float(tcfg.mu), M=float(tcfg.M))
    from gymnasium import spaces

    side = VQA_ROOM * VQA_TILE
    obs_space = spaces.Dict({
        "image": spaces.Box(0, 255, (side, side, 3), np.uint8),
        "question": spaces.Text(max_length=256),
    })
    # space_spec rejects text actions (no env acts in text); here the answer is what the model produces,
    # so the observation side comes from space_spec and the action field is built directly.
    spec = space_spec(obs_space, spaces.Discrete(2), tcfg, vocab, text_tokens=VQA_QUESTION_TOKENS)
    questions, answers = _vqa_texts()
    _check_fits(questions, tok, VQA_QUESTION_TOKENS, "question", eos=False)
    _check_fits(answers, tok, VQA_ANSWER_TOKENS, "answer", eos=True)
    return dataclasses.replace(spec, action=(text_field("answer", VQA_ANSWER_TOKENS),))


def generate_episodes(task_name: str, n: int, seed: int, cfg: Config) -> list[Episode]:
    """``n`` episodes of a dataset task (or dataset name), for seeds ``seed .. seed + n - 1``.

    Deterministic: the same (name, n, seed, cfg) gives the same episodes. ``Episode.task`` is ``task_name``.
    """
    if n < 0:
        raise DatasetError(f"{task_name}: n must be non-negative, got {n}")
    return resolve(task_name).generate(task_name, n, seed, cfg)


def prompt_and_answer(task_name: str, episode: Episode) -> tuple[str, str]:
    """What to give the model and the exact answer expected, for a scorable episode.

    arith: the prompt is the episode's text up to the last problem's answer (earlier lines serve as
    examples); vqa: the question (the image is in ``episode.observations``) and the stored answer.
    """
    info = resolve(task_name)
    if not info.scorable:
        raise DatasetError(f"{task_name}: dataset {info.name!r} has no exact answers to score")
    (text,) = episode.actions
    if info.kind == "vqa":
        return episode.observations["question"][0], text
    lines = text.rstrip("\n").split("\n")
    last = lines[-1]
    m = _ADD.match(last) or _REVERSE.match(last)
    if m is None:
        raise DatasetError(f"{task_name}: episode {episode.episode_id!r}: last line {last!r} is not a problem")
    prompt = "\n".join([*lines[:-1], last[: m.end()]])
    return prompt, last[m.end():]


def problem_type(task_name: str, prompt: str) -> str | None:
    """The type of problem ``prompt`` poses, for a dataset that defines types (arith, vqa); else None."""
    info = resolve(task_name)
    return info.problem_type(prompt) if info.problem_type else None


def score_text_answer(task: str, prompt: str, generated: str, answer: str | None = None) -> bool:
    """Exact scoring of a generated answer: the text before the first newline must equal the answer.

    arith: the answer is computed from the prompt's last line (``answer`` is ignored); vqa: the image
    is not in the prompt, so ``answer`` (the episode's stored answer) is required.
    """
    info = resolve(task)
    if not info.scorable:
        raise DatasetError(f"{task}: dataset {info.name!r} has no exact answers to score")
    if info.kind == "vqa":
        if answer is None:
            raise DatasetError(f"{task}: scoring a VQA answer needs the reference answer")
        expected = answer
    else:
        expected = arith_answer(prompt)
    return generated.split("\n", 1)[0] == expected
