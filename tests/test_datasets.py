"""Non-environment datasets: text and vision-language episodes."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from minigrid.core.constants import COLORS

from mugato_ray import datasets as D
from mugato_ray.config import config_from_dict
from mugato_ray.episodes import read_episodes, write_episodes
from mugato_ray.tokenizer import ByteTokenizer, Modality, encode_text, train_bpe


def make_cfg(context: int = 64, **tokenizer) -> object:
    return config_from_dict({"model": {"context": context}, "tokenizer": tokenizer})


def episodes_equal(a, b) -> bool:
    same = (a.task, a.episode_id, a.source, a.seed, a.actions, a.success) == (
        b.task, b.episode_id, b.source, b.seed, b.actions, b.success)
    same &= sorted(a.observations) == sorted(b.observations) and np.array_equal(a.rewards, b.rewards)
    for k, v in a.observations.items():
        w = b.observations[k]
        same &= v == w if isinstance(v, list) else (v.dtype == w.dtype and np.array_equal(v, w))
    return bool(same)


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("name", ["arith", "vqa_color"])
def test_generation_is_deterministic_per_seed_and_extends(name):
    cfg = make_cfg()
    a, b = D.generate_episodes(name, 6, 10, cfg), D.generate_episodes(name, 6, 10, cfg)
    assert all(episodes_equal(x, y) for x, y in zip(a, b))
    # An episode depends on its own seed only: a shorter run starting later is a slice of a longer one.
    later = D.generate_episodes(name, 3, 13, cfg)
    assert all(episodes_equal(x, y) for x, y in zip(a[3:], later))
    other = D.generate_episodes(name, 6, 1000, cfg)
    assert sum(episodes_equal(x, y) for x, y in zip(a, other)) < 6
    assert [e.seed for e in a] == list(range(10, 16))
    assert len({e.episode_id for e in a}) == 6
    assert all(e.task == name and e.source == "expert" and e.length == 1 for e in a)


# ------------------------------------------------------------------------------------- arith


def test_arith_lines_are_correct_and_fill_the_context():
    context = 96
    tok = ByteTokenizer()
    for ep in D.generate_episodes("arith", 20, 0, make_cfg(context)):
        (text,) = ep.actions
        assert ep.observations == {} and ep.rewards.tolist() == [0.0]
        n_tokens = len(tok.encode(text))
        longest_line = len("reverse: abcdef -> fedcba\n")  # words have < ARITH_WORD_LENGTHS[1] letters
        assert context - longest_line < n_tokens <= context  # packed: the next line would not have fit
        lines = text.split("\n")
        assert lines[-1] == ""  # every line is complete
        for line in lines[:-1]:
            if "+" in line:
                a, rest = line.split("+")
                b, c = rest.split("=")
                assert int(a) + int(b) == int(c) and 0 <= int(a) < D.ARITH_MAX_OPERAND
            else:
                word, rev = line.removeprefix("reverse: ").split(" -> ")
                assert rev == word[::-1] and word.isalpha() and word.islower()


def test_arith_mixes_both_problem_kinds():
    problems = D.arith_problems(np.random.default_rng(0), 400)
    adds = sum(p.endswith("=") for p, _ in problems)
    assert 120 < adds < 280 and len({p for p, _ in problems}) > 300


def test_arith_prompt_and_scoring():
    for ep in D.generate_episodes("arith", 10, 5, make_cfg()):
        prompt, answer = D.prompt_and_answer("arith", ep)
        assert ep.actions[0] == prompt + answer + "\n"
        assert D.score_text_answer("arith", prompt, answer)
        assert D.score_text_answer("arith", prompt, answer + "\n12+1=13")  # scored up to the newline
        assert not D.score_text_answer("arith", prompt, answer + "0")
        assert not D.score_text_answer("arith", prompt, " " + answer)
        assert not D.score_text_answer("arith", prompt, "")
    assert D.score_text_answer("arith", "1+2=3\n40+2=", "42")
    assert D.score_text_answer("arith", "reverse: abc -> ", "cba")
    with pytest.raises(D.DatasetError, match="not 'a\\+b='"):
        D.score_text_answer("arith", "hello", "x")


def test_problem_types_name_what_each_prompt_asks():
    cfg = make_cfg()
    for ep in D.generate_episodes("arith", 20, 0, cfg):
        prompt, answer = D.prompt_and_answer("arith", ep)
        assert D.problem_type("arith", prompt) == ("addition" if answer.isdigit() else "reversal")
    assert D.problem_type("arith", "reverse: ab -> ba\n3+4=") == "addition"  # the last line decides
    assert D.problem_type("arith", "3+4=7\nreverse: ab -> ") == "reversal"
    with pytest.raises(D.DatasetError, match="not 'a\\+b='"):
        D.problem_type("arith", "3+4=7")
    assert D.problem_type("vqa_color", D.VQA_QUESTION_OBJECT) == "object"
    assert D.problem_type("vqa_color", D.VQA_QUESTION_COLOR.format(obj="key")) == "color"
    with pytest.raises(D.DatasetError, match="none of the dataset's questions"):
        D.problem_type("vqa_color", "what color is the sky?")
    assert D.problem_type("text_files", "any text") is None


def test_arith_context_too_small_is_an_error():
    with pytest.raises(D.DatasetError, match="model.context=4"):
        D.generate_episodes("arith", 1, 0, make_cfg(context=4))


# --------------------------------------------------------------------------------------- vqa


def test_vqa_answers_match_the_scene():
    env, counts = None, collections.Counter()
    for seed in range(60):
        env, image, question, answer = D.vqa_scene(seed, env)
        objects = [o for o in env.grid.grid if o is not None and o.type != "wall"]
        assert len(objects) == 1  # one object, so the questions are unambiguous
        (obj,) = objects
        if question == D.VQA_QUESTION_OBJECT:
            assert answer == obj.type
        else:
            assert question == D.VQA_QUESTION_COLOR.format(obj=obj.type) and answer == obj.color
        # The image shows it: the pixels of the object's cell that differ from an empty floor cell have,
        # on average, the hue of the object's color (boxes are dim outlines at this tile size: hue, not value).
        t = D.VQA_TILE
        tiles = image.reshape(D.VQA_ROOM, t, D.VQA_ROOM, t, 3).transpose(0, 2, 1, 3, 4).astype(float)
        (x, y), (ax, ay) = obj.cur_pos, env.agent_pos
        ex, ey = next((i, j) for i in range(1, 7) for j in range(1, 7) if (i, j) not in ((x, y), (ax, ay)))
        drawn = tiles[y, x].reshape(-1, 3)
        drawn = drawn[(drawn != tiles[ey, ex].reshape(-1, 3)).any(axis=1)]
        mean = drawn.mean(axis=0)
        cosine = {name: mean @ rgb / (np.linalg.norm(mean) * np.linalg.norm(rgb)) for name, rgb in COLORS.items()}
        assert max(cosine, key=cosine.get) == obj.color, (seed, obj.type, obj.color, cosine)
        counts[obj.type] += 1
        counts[obj.color] += 1
        counts[question == D.VQA_QUESTION_OBJECT] += 1
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert all(counts[k] > 0 for k in (*D.VQA_OBJECTS, "red", "green", "blue", "purple", "yellow", "grey", True, False))


def test_vqa_episodes_hold_the_scene_and_score():
    eps = D.generate_episodes("vqa_color", 8, 3, make_cfg())
    for ep in eps:
        _, image, question, answer = D.vqa_scene(ep.seed)
        assert np.array_equal(ep.observations["image"], image[None])
        assert ep.observations["question"] == [question] and ep.actions == [answer]
        assert ep.rewards.tolist() == [1.0] and ep.success is True
        prompt, ref = D.prompt_and_answer("vqa_color", ep)
        assert (prompt, ref) == (question, answer)
        assert D.score_text_answer("vqa_color", prompt, answer, answer)
        assert not D.score_text_answer("vqa_color", prompt, answer + "s", answer)
    with pytest.raises(D.DatasetError, match="reference answer"):
        D.score_text_answer("vqa_color", "what object is in the room?", "key")


# ------------------------------------------------------------------------------------- specs


def test_text_spec_shapes():
    cfg = make_cfg(context=128)
    for name in ("arith", "text_files"):
        spec = D.dataset_spec(name, cfg)
        assert spec.observation == ()
        (act,) = spec.action
        assert (act.key, act.modality, act.tokens, act.channels, act.dtype) == ("text", Modality.TEXT, 128, 1, "str")
        assert spec.vocab.text_size == 256


def test_vqa_spec_shapes_and_every_text_fits():
    cfg = make_cfg(patch_size=16)
    spec = D.dataset_spec("vqa_color", cfg)
    assert [f.key for f in spec.observation] == ["question", "image"]  # GATO order: text, then images
    question, image = spec.observation
    assert (image.modality, image.shape, image.tokens, image.channels, image.grid) == (
        Modality.IMAGE, (64, 64, 3), 16, 16 * 16 * 3, (4, 4))
    assert (question.modality, question.tokens) == (Modality.TEXT, D.VQA_QUESTION_TOKENS)
    (answer,) = spec.action
    assert (answer.key, answer.modality, answer.tokens) == ("answer", Modality.TEXT, D.VQA_ANSWER_TOKENS)
    questions, answers = D._vqa_texts()
    for texts, field in ((questions, question), (answers, answer)):
        ids = encode_text(texts, ByteTokenizer(), spec.vocab, field.tokens, append_eos=True)
        assert (ids[:, -1] == spec.vocab.pad).all()  # room left after every text (and its eos)


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(D.DatasetError, match="arith"):
        D.dataset_spec("no-such-dataset", make_cfg())


# -------------------------------------------------------------------------------- text files


def test_bundled_corpus_chunks_concatenate_to_each_document():
    cfg = make_cfg(context=48)
    eps = D.text_file_episodes(D.DEFAULT_TEXT_FOLDER, "text-files", cfg)
    by_doc = collections.defaultdict(list)
    for ep in eps:
        _, rel, doc, chunk = ep.episode_id.split(":")
        by_doc[(rel, int(doc))].append((int(chunk), ep.actions[0]))
        assert 0 < len(ep.actions[0].encode("utf-8")) <= 48 and "\ufffd" not in ep.actions[0]
    docs = {}
    for path in D.text_files(D.DEFAULT_TEXT_FOLDER):
        rel = path.name
        if path.suffix == ".txt":
            docs[(rel, 0)] = path.read_bytes().decode("utf-8")
        else:
            lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
            docs.update({(rel, i): json.loads(ln)["text"] for i, ln in enumerate(lines)})
    assert set(by_doc) == set(docs)
    for key, chunks in by_doc.items():
        assert [c for c, _ in chunks] == list(range(len(chunks)))
        assert "".join(text for _, text in chunks) == docs[key]
    # The samples include multi-byte characters, so some cut had to back off from the limit.
    assert any(len(ep.actions[0].encode("utf-8")) < 48 for ep in eps if not ep.actions[0].isascii())
    assert [e.seed for e in eps] == list(range(len(eps)))


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=0, max_size=300), max_tokens=st.integers(4, 40))
def test_byte_chunks_round_trip_and_are_greedy(text, max_tokens):
    tok = ByteTokenizer()
    pieces = D.chunk_text(text, tok, max_tokens)
    assert "".join(pieces) == text
    for i, piece in enumerate(pieces):
        n = len(tok.encode(piece))
        assert 0 < n <= max_tokens and tok.decode(tok.encode(piece)) == piece
        if i < len(pieces) - 1:
            assert n > max_tokens - 4  # backed off at most to the start of one UTF-8 character


def test_one_byte_context_cannot_hold_a_multibyte_character():
    with pytest.raises(D.DatasetError, match="smaller than one character"):
        D.chunk_text("é", ByteTokenizer(), 1)


def test_bpe_chunks_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = [p.read_bytes().decode("utf-8") for p in D.text_files(D.DEFAULT_TEXT_FOLDER)]
    bpe_path = tmp_path / "bpe.json"
    tok = train_bpe(corpus * 5, vocab_size=400, path=bpe_path)
    cfg = make_cfg(context=12, text="bpe", bpe_path=str(bpe_path))
    folder = tmp_path / "docs"
    folder.mkdir()
    doc = "Rain, rain — go away; 七転び八起き 🌱 → 🌳, naïve café.\r\nA second line."
    (folder / "a.txt").write_bytes(doc.encode("utf-8"))
    eps = D.text_file_episodes(folder, "text-files", cfg)
    assert "".join(ep.actions[0] for ep in eps) == doc  # "\r\n" kept: files are read as bytes
    assert len(eps) > 2
    for ep in eps:
        ids = tok.encode(ep.actions[0])
        assert 0 < len(ids) <= 12 and tok.decode(ids) == ep.actions[0]
    assert D.dataset_spec("text_files", cfg).vocab.text_size == tok.size


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"text": "fine"})
    for bad, problem in (("{not json", "not valid JSON"), (json.dumps({"txt": "x"}), '"text" field'),
                         (json.dumps({"text": 3}), '"text" field'), ("[1, 2]", '"text" field')):
        folder = tmp_path / f"case{abs(hash(bad))}"
        folder.mkdir()
        (folder / "b.jsonl").write_text(f"{good}\n\n{bad}\n{good}\n", encoding="utf-8")
        with pytest.raises(D.DatasetError, match=problem) as info:
            D.text_file_episodes(folder, "text-files", make_cfg())
        assert "b.jsonl line 3" in str(info.value)


def test_text_folder_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.text_file_episodes(tmp_path / "missing", "t", make_cfg())
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    with pytest.raises(D.DatasetError, match="no .txt or .jsonl"):
        D.text_file_episodes(tmp_path, "t", make_cfg())
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(D.DatasetError, match="latin1.txt: not UTF-8"):
        D.text_file_episodes(tmp_path, "t", make_cfg())


def test_text_files_dataset_takes_the_first_n_chunks():
    cfg = make_cfg(context=64)
    everything = D.text_file_episodes(D.DEFAULT_TEXT_FOLDER, "text_files", cfg)
    first = D.generate_episodes("text_files", 5, 123, cfg)
    assert len(first) == 5 and all(episodes_equal(a, b) for a, b in zip(first, everything))
    with pytest.raises(D.DatasetError, match="no exact answers"):
        D.score_text_answer("text_files", "x", "y")


# ------------------------------------------------------------------------------ store round-trip


@pytest.mark.parametrize("name", ["arith", "vqa_color", "text_files"])
def test_episodes_validate_and_round_trip_through_the_store(name, tmp_path):
    cfg = make_cfg(context=64)
    spec = D.dataset_spec(name, cfg)
    eps = D.generate_episodes(name, 4, 0, cfg)
    for ep in eps:
        ep.validate(spec)
    write_episodes(tmp_path, eps, name="part.parquet", spec=spec)
    back = read_episodes(tmp_path)
    assert len(back) == 4 and all(episodes_equal(a, b) for a, b in zip(eps, back))


def test_dataset_tasks_resolve_through_the_registry():
    tasks = pytest.importorskip("mugato_ray.tasks")
    cfg = make_cfg(context=64)
    for name, info in tasks.TASKS.items():
        if info.dataset is None:
            continue
        assert D.resolve(name) is D.DATASETS[info.dataset]
        assert D.dataset_spec(name, cfg) == D.dataset_spec(info.dataset, cfg)
        (ep,) = D.generate_episodes(name, 1, 0, cfg)
        assert ep.task == name
