"""Evaluation at scale: expert ~1 and random ~0 through the whole harness, the report schema, determinism over
actor counts, env crashes, a model checkpoint end to end, a two-node cluster, and the job's command line."""

from __future__ import annotations

import collections
import dataclasses
import json
import re

import numpy as np
import pytest
import ray
import torch

from mugato_ray import rollout, tasks, video
from mugato_ray.config import config_from_dict
from mugato_ray.datasets import generate_episodes, problem_type, prompt_and_answer
from mugato_ray.envs import make_env
from mugato_ray.episodes import store_dir
from mugato_ray.evaluate import (
    TEXT_SHOWN,
    answer_lines,
    check_seeds_disjoint,
    eval_dir,
    eval_seeds,
    evaluate,
    generate_answers,
    held_out_seeds,
    md_text,
    resolve_checkpoint,
    score_dataset_chunk,
    score_figure,
    summarize_task,
    summary_lines,
    video_dir,
    write_report,
)
from mugato_ray.metric_log import read_metrics, score_metrics
from mugato_ray.metrics import iqm
from mugato_ray.model import GatoModel, save_model
from mugato_ray.rollout import FaultInjection, PolicySpec, RolloutWorker, measure_returns, split_seeds
from mugato_ray.tokenizer import make_text_tokenizer, make_vocab
from mugato_ray.video import VideoRequest, read_video

QUIET = dict(log=lambda _: None)


@pytest.fixture
def ray_local():
    if not ray.is_initialized():  # the cluster test shuts its own Ray down
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield


@pytest.fixture(scope="module", autouse=True)
def _shutdown_ray():
    yield
    ray.shutdown()


def make_cfg(tmp_path, names, *, episodes=4, **sections):
    data = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "context": 128},
        "tokenizer": {"max_text_tokens": 32},
        "rollout": {"num_actors": 2, "envs_per_actor": 2, "actor_cpus": 0.5},
        "eval": {"episodes": episodes, "bootstrap_samples": 200},
        "tasks": [{"name": n, "episodes": 4} for n in names],
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


def reference_seeds(name: str) -> int:
    """How many seeds (0..n-1) the task's stored reference returns were measured on."""
    return int(tasks._references()[name]["episodes"])


# ------------------------------------------------------------------------------------------- seeds


def test_eval_seeds_are_held_out():
    cfg = config_from_dict({"eval": {"episodes": 5, "seed_offset": 100},
                            "tasks": [{"name": "CartPole-v1", "episodes": 100}]})
    assert eval_seeds(cfg) == [100, 101, 102, 103, 104]
    check_seeds_disjoint(cfg)  # collection uses seeds 0..99
    overlapping = config_from_dict({"eval": {"episodes": 5, "seed_offset": 99},
                                    "tasks": [{"name": "CartPole-v1", "episodes": 100}]})
    with pytest.raises(ValueError, match="eval.seed_offset"):
        check_seeds_disjoint(overlapping)


def test_held_out_seeds_take_their_own_count_and_offset_and_refuse_collection_seeds():
    cfg = config_from_dict({"eval": {"episodes": 5, "seed_offset": 100},
                            "tasks": [{"name": "CartPole-v1", "episodes": 100}]})
    assert held_out_seeds(cfg, 3) == [100, 101, 102]
    assert held_out_seeds(cfg, 2, seed_offset=500) == [500, 501]
    with pytest.raises(ValueError, match="eval.seed_offset"):
        held_out_seeds(cfg, 2, seed_offset=98)  # 98..99 are collection seeds


# ------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("name", ["CartPole-v1", "BabyAI-GoToRedBall-v0"])
def test_expert_scores_one_and_random_zero_through_the_harness(ray_local, tmp_path, name):
    """The stored references were measured on seeds 0..n-1 with the same expert and RandomPolicy. Evaluating on
    exactly those seeds through actors, seeds and references must reproduce them: normalized 1 and 0 up to the
    references' rounding. (On other seeds BabyAI's random return has a std of ~0.3 against an expert-random
    spread of ~0.8, so +-0.05 would need hundreds of episodes on each side; CartPole is checked on held-out
    seeds below.) Collection seeds are moved away so the disjointness check holds."""
    n = reference_seeds(name)
    cfg = make_cfg(tmp_path, [name], episodes=n, eval={"seed_offset": 0}, rollout={"seed": 10 * n})
    expert = evaluate(cfg, PolicySpec("expert"), **QUIET)["tasks"][name]
    random = evaluate(cfg, PolicySpec("random"), **QUIET)["tasks"][name]
    assert expert["episodes"] == random["episodes"] == n
    assert expert["normalized_score"] == pytest.approx(1.0, abs=0.05)
    assert random["normalized_score"] == pytest.approx(0.0, abs=0.05)
    assert expert["success_rate"] > random["success_rate"]


def test_cartpole_references_hold_on_held_out_seeds(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, ["CartPole-v1"], episodes=24)
    expert = evaluate(cfg, PolicySpec("expert"), **QUIET)
    random = evaluate(cfg, PolicySpec("random"), **QUIET)
    assert {o["seed"] for o in random["tasks"]["CartPole-v1"]["per_episode"]} == set(eval_seeds(cfg))
    assert expert["tasks"]["CartPole-v1"]["normalized_score"] == pytest.approx(1.0, abs=0.05)
    assert random["tasks"]["CartPole-v1"]["normalized_score"] == pytest.approx(0.0, abs=0.05)


# ------------------------------------------------------------------------------------------- report


def check_schema(report: dict, label: str) -> None:
    """eval.json's contract: every key and type (extra fields are allowed)."""
    assert report["checkpoint"] == label
    assert report["iqm_normalized_score"] is None or isinstance(report["iqm_normalized_score"], float)
    assert isinstance(report["tasks"], dict) and report["tasks"]
    for name, t in report["tasks"].items():
        assert isinstance(t["episodes"], int) and t["episodes"] > 0, name
        assert isinstance(t["mean_return"], float), name
        lo, hi = t["ci95"]
        assert isinstance(lo, float) and isinstance(hi, float) and lo <= t["mean_return"] <= hi, name
        for key in ("success_rate", "normalized_score", "expert_return", "random_return"):
            assert t[key] is None or isinstance(t[key], float), (name, key)
        assert (t["normalized_score"] is None) == (t["expert_return"] is None or t["random_return"] is None)


def test_report_files_and_schema(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, ["CartPole-v1", "text-arith", "vqa-minigrid-color", "text-files"])
    report = evaluate(cfg, PolicySpec("random"), **QUIET)
    paths = write_report(report, eval_dir(cfg))
    loaded = json.loads(paths["json"].read_text())
    check_schema(loaded, "policy:random")
    assert set(loaded["tasks"]) == {"CartPole-v1", "text-arith", "vqa-minigrid-color"}
    assert "text-files" in loaded["skipped"]  # nothing to score exactly: reported, not faked
    arith = loaded["tasks"]["text-arith"]
    assert (arith["expert_return"], arith["random_return"]) == (1.0, 0.0) and arith["mean_return"] == arith["success_rate"]
    assert loaded["iqm_normalized_score"] == pytest.approx(iqm([t["normalized_score"] for t in loaded["tasks"].values()]))
    md = paths["md"].read_text()
    assert all(name in md for name in ("CartPole-v1", "text-arith", "text-files")) and "| task |" in md
    assert loaded["tasks"]["CartPole-v1"]["reference_origin"] == "references.yaml"  # where normalization came from
    assert "- references.yaml: CartPole-v1" in md and "- exact answers (1.0 right, 0.0 random): text-arith" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 1000
    assert sorted(p.name for p in eval_dir(cfg).iterdir()) == ["eval.json", "eval.md", "normalized_scores.png"]

    expert = evaluate(cfg, PolicySpec("expert"), **QUIET)
    check_schema(expert, "policy:expert")
    for name in ("text-arith", "vqa-minigrid-color"):  # the data's own answers score exactly 1
        assert expert["tasks"][name]["mean_return"] == 1.0 and expert["tasks"][name]["normalized_score"] == 1.0


def test_the_score_chart_title_shows_the_iqm_inside_the_figure():
    """A long checkpoint path used to push the title, and the IQM at its end, out of the chart."""
    import matplotlib.pyplot as plt

    task = {"normalized_score": 0.5, "normalized_ci95": [0.4, 0.6]}
    path = "/home/someone/experiments/a-rather-long-run-directory-name/checkpoints/run/checkpoint_00000600/model.pt"
    fig = score_figure({"checkpoint": path, "iqm_normalized_score": 0.51234, "tasks": {"CartPole-v1": task}})
    try:
        fig.canvas.draw()
        title = fig.axes[0].title
        assert "0.512" in title.get_text() and "checkpoint_00000600/model.pt" in title.get_text()
        box = title.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    finally:
        plt.close(fig)


def test_the_report_draws_loss_and_score_curves_from_its_training_section(tmp_path):
    report = {"checkpoint": "policy:expert", "iqm_normalized_score": 0.5, "seeds": {"offset": 0, "episodes": 2},
              "tasks": {"CartPole-v1": {"episodes": 2, "mean_return": 250.0, "ci95": [200.0, 300.0],
                                        "success_rate": None, "normalized_score": 0.5, "expert_return": 500.0,
                                        "random_return": 0.0}}}
    plain = write_report(report, tmp_path / "plain")
    assert set(plain) == {"json", "md", "png"} and "## Training" not in plain["md"].read_text()
    history = [{"step": s, "loss": 3.0 / s, "loss/CartPole-v1": 2.0 / s} for s in (2, 4, 6)]
    report["training"] = {"history": history}
    losses = write_report(report, tmp_path / "losses")
    assert set(losses) == {"json", "md", "png", "losses"} and "](loss_curves.png)" in losses["md"].read_text()
    report["training"] |= {"evaluations": [{"step": 4, "iqm": 0.5, "tasks": {"CartPole-v1": {"normalized": 0.5}}},
                                           {"step": 6, "iqm": 0.7, "tasks": {"CartPole-v1": {"normalized": 0.7}}}],
                           "chosen_step": 6, "chosen_iqm": 0.7, "episodes": 2}
    paths = write_report(report, tmp_path / "both")
    md = paths["md"].read_text()
    assert "](loss_curves.png)" in md and "](score_curves.png)" in md and "| 6 | 0.700 | 0.700 |" in md
    assert "the snapshot of step 6 (IQM 0.700), the best IQM of 2 snapshots" in md
    report["training"] |= {"select_margin": 0.25}
    assert "step 6 (IQM 0.700), the latest within 0.25 of the best IQM of 2" in \
        write_report(report, tmp_path / "margin")["md"].read_text()
    for key in ("losses", "scores"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 1000

# ------------------------------------------------------------------------------------------- videos and answers


def md_links(md: str) -> list[str]:
    return re.findall(r"\]\((videos/[^)]+)\)", md)


def render_shape(task: str) -> tuple[int, ...]:
    env = make_env(task, render_mode="rgb_array")
    try:
        env.reset(seed=0)
        return env.render().shape
    finally:
        env.close()


def test_videos_of_the_first_episodes_are_linked_and_change_no_result(ray_local, tmp_path):
    """eval.video_episodes=3: the 3 lowest seeds' episodes, whichever actor ran them, as MP4s of length + 1 frames
    of the env's render size, at its frame rate; eval.md links exactly them; every result equals a run without."""
    name, fps = "CartPole-v1", 50
    cfg = make_cfg(tmp_path, [name], eval={"video_episodes": 3})
    assert split_seeds(eval_seeds(cfg), 2, 2) == [eval_seeds(cfg)[:2], eval_seeds(cfg)[2:]]  # both actors record
    lines = []
    report = evaluate(cfg, PolicySpec("random"), log=lines.append)
    t = report["tasks"][name]
    plain = measure_returns(name, PolicySpec("random"), cfg, eval_seeds(cfg))  # no video, in this process
    assert [(o["seed"], o["return"], o["length"]) for o in t["per_episode"]] == list(
        zip(plain.seeds.tolist(), plain.returns.tolist(), plain.lengths.tolist()))  # rendering changed nothing
    lengths = {o["seed"]: o["length"] for o in t["per_episode"]}
    assert [v["seed"] for v in t["videos"]] == eval_seeds(cfg)[:3] and t["video_errors"] == []
    assert any(f"3 of 3 videos in {eval_dir(cfg) / 'videos' / name}" in line for line in lines)
    paths = write_report(report, eval_dir(cfg))
    for v in t["videos"]:
        assert v["file"] == f"videos/{name}/seed-{v['seed']}.mp4" and v["format"] == "mp4"
        frames, durations = read_video(eval_dir(cfg) / v["file"])
        assert frames.shape == (lengths[v["seed"]] + 1, *render_shape(name)) == (v["frames"], *v["shape"])
        assert sum(durations) == pytest.approx(len(frames) * 1000 / fps)
        assert frames.std() > 10  # a picture, not a blank
    md = paths["md"].read_text()
    assert "## Videos" in md and md_links(md) == [v["file"] for v in t["videos"]]
    assert all((eval_dir(cfg) / link).is_file() for link in md_links(md))
    assert json.loads(paths["json"].read_text())["tasks"][name]["videos"] == t["videos"]
    assert sorted(p.name for p in (eval_dir(cfg) / "videos" / name).iterdir()) == [
        f"seed-{s}.mp4" for s in eval_seeds(cfg)[:3]]  # no temporary file left


def test_without_an_mp4_encoder_videos_are_gifs_and_the_report_says_so(ray_local, tmp_path, monkeypatch):
    """No MP4 encoder (the lookup patched to find none): a GIF that shows each of the length + 1 frames for 1/fps
    (Pillow merges identical consecutive frames, summing their time); the log and eval.md say why it is a GIF.
    An earlier evaluation's video and a dead actor's partial file are removed: the folder holds what the report
    lists."""
    name = "CartPole-v1"
    cfg = make_cfg(tmp_path, [name], episodes=2, eval={"video_episodes": 1})
    stale = eval_dir(cfg) / "videos" / name / f"seed-{eval_seeds(cfg)[1]}.mp4"
    partial = stale.with_name(f".seed-{eval_seeds(cfg)[0]}.tmp.mp4")  # an actor that died mid-episode
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    partial.write_bytes(b"half")
    monkeypatch.setattr(video, "mp4_encoder", lambda: None)
    lines = []
    report = evaluate(cfg, PolicySpec("random"), log=lines.append)
    t = report["tasks"][name]
    (v,) = t["videos"]
    assert v["file"] == f"videos/{name}/seed-{eval_seeds(cfg)[0]}.gif"
    assert [p.name for p in stale.parent.iterdir()] == [f"seed-{eval_seeds(cfg)[0]}.gif"]
    frames, durations = read_video(eval_dir(cfg) / v["file"])
    length = t["per_episode"][0]["length"]
    assert frames.shape[1:] == render_shape(name) and len(frames) <= length + 1 == v["frames"]
    assert sum(durations) == pytest.approx((length + 1) * 1000 / 50)
    assert any("no MP4 encoder is installed, so videos are GIFs" in line for line in lines)
    md = write_report(report, eval_dir(cfg))["md"].read_text()
    assert "No MP4 encoder is installed, so videos are GIFs (pip install imageio-ffmpeg" in md
    assert md_links(md) == [v["file"]]


def test_a_video_that_cannot_be_rendered_is_named_and_the_episodes_kept(tmp_path, monkeypatch):
    """An env that cannot render (MuJoCo without an OpenGL backend, say) loses its videos, named with the
    reason, never its episodes, and leaves no file behind."""
    cfg = make_cfg(tmp_path, ["CartPole-v1"])
    seeds, folder = [3, 4, 5], tmp_path / "videos"
    request = VideoRequest(str(folder), (3, 5), "mp4")
    worker = RolloutWorker("CartPole-v1", PolicySpec("random"), cfg, num_envs=2)
    plain = worker.sample(seeds, return_episodes=False)

    def no_gl(self):
        raise RuntimeError("no OpenGL context")

    monkeypatch.setattr(rollout._EnvSlot, "render", no_gl)
    broken = worker.sample(seeds, return_episodes=False, video_request=request)
    assert broken.outcomes == plain.outcomes and broken.videos == []
    assert broken.video_errors == [{"seed": 3, "error": "RuntimeError: no OpenGL context"},
                                   {"seed": 5, "error": "RuntimeError: no OpenGL context"}]
    assert not folder.exists() or list(folder.iterdir()) == []


def test_mujoco_renders_off_screen_or_says_why(tmp_path):
    """MuJoCo renders without a display (EGL, unless MUJOCO_GL says otherwise); where it cannot, the video is
    named with the reason. The episode is the same either way."""
    name, seeds = "InvertedPendulum-v5", [7]
    cfg = make_cfg(tmp_path, [name])
    worker = RolloutWorker(name, PolicySpec("random"), cfg, num_envs=1)
    plain = worker.sample(seeds, return_episodes=False)
    recorded = worker.sample(seeds, return_episodes=False, video_request=VideoRequest(str(tmp_path / "v"), (7,)))
    assert recorded.outcomes == plain.outcomes and len(recorded.videos) + len(recorded.video_errors) == 1
    for v in recorded.videos:
        frames, _ = read_video(v["file"])
        assert frames.shape == (plain.outcomes[0]["length"] + 1, *render_shape(name)) and frames.std() > 10


def test_text_answers_are_shown_with_prompt_and_reference(ray_local, tmp_path):
    """eval.md's Answers: the first items of text-arith and VQA, each with the end of its prompt, the answer
    and the reference, escaped so that no text breaks the table (a random policy's answers are any bytes)."""
    names = ["text-arith", "vqa-minigrid-color"]
    cfg = make_cfg(tmp_path, names, episodes=3, eval={"video_episodes": 3})
    report = evaluate(cfg, PolicySpec("random"), **QUIET)
    md = write_report(report, eval_dir(cfg))["md"].read_text()
    assert "## Answers" in md and "## Videos" not in md
    for name in names:
        items = report["tasks"][name]["per_episode"]
        section = md.split(f"### {md_text(name, 80)}\n\n")[1]
        assert section.startswith("Exact by problem type, over all 3 items: ")
        rows = section[section.index("| seed |"):].split("\n\n")[0].splitlines()[2:]
        assert len(rows) == 3
        for item, row in zip(items, rows):
            assert row == (f"| {item['seed']} | {md_text(item['prompt'], TEXT_SHOWN, tail=True)} "
                           f"| {md_text(item['answer'], TEXT_SHOWN)} | {md_text(item['expected'], TEXT_SHOWN)} "
                           f"| {'yes' if item['success'] else 'no'} |")
            assert item["answer"] != item["expected"] and item["prompt"] and item["expected"]
            assert len(re.findall(r"(?<!\\)\|", row)) == 6  # five cells, whatever the texts hold
    arith = report["tasks"]["text-arith"]["per_episode"][0]
    prompt, expected = prompt_and_answer("text-arith", generate_episodes("text-arith", 1, arith["seed"], cfg)[0])
    assert (arith["prompt"], arith["expected"]) == (prompt, expected)  # the item's own prompt and reference
    for name in names:  # each item carries its problem type, and the task counts them
        t = report["tasks"][name]
        types = collections.Counter(problem_type(name, o["prompt"]) for o in t["per_episode"])
        assert {k: v["items"] for k, v in t["by_type"].items()} == dict(types)


def test_exact_match_is_reported_per_problem_type(tmp_path):
    """A dataset task's outcomes counted per problem type (eval.json's by_type, eval.md, the console, metrics):
    an overall 0.5 that is every reversal and no addition must be visible as such."""
    outcomes = [{"seed": i, "return": float(i < 2), "length": 1, "success": i < 2, "prompt": "p", "answer": "a",
                 "expected": "e", "type": "reversal" if i < 2 else "addition"} for i in range(4)]
    t = summarize_task(make_cfg(tmp_path, ["text-arith"]), "text-arith", outcomes, [], 4, 1.0, (1.0, 0.0))
    assert t["normalized_score"] == 0.5
    assert t["by_type"] == {"addition": {"items": 2, "right": 0, "exact": 0.0},
                            "reversal": {"items": 2, "right": 2, "exact": 1.0}}
    report = {"tasks": {"text-arith": t}, "iqm_normalized_score": 0.5, "video_episodes": 0}
    assert "text-arith                   by problem type: addition 0 of 2 (0.00), reversal 2 of 2 (1.00)" in (
        summary_lines(report))
    assert "Exact by problem type, over all 4 items: addition 0 of 2 (0.00), reversal 2 of 2 (1.00)." in (
        answer_lines(report))
    assert score_metrics("eval", report["tasks"], 0.5)["eval/text-arith/exact/addition"] == 0.0
    env = summarize_task(make_cfg(tmp_path, ["CartPole-v1"]), "CartPole-v1",
                         [{"seed": 0, "return": 9.0, "length": 9, "success": None}], [], 9, 1.0, (500.0, 20.0))
    assert "by_type" not in env  # environment tasks have no problem types


def test_a_task_name_is_one_folder_of_videos(tmp_path):
    cfg = make_cfg(tmp_path, ["CartPole-v1"])
    assert video_dir(cfg, "ALE/Pong-v5") == eval_dir(cfg) / "videos" / "ALE_Pong-v5"
    assert [video.task_folder_name(n) for n in ("../up", "a b:c", "..")] == ["_up", "a_b_c", "_"]


def test_markdown_text_is_literal():
    assert md_text("a|b *c* _d_ [e](f) `g` <h> &amp; $x$ \\", 200) == (
        "a\\|b \\*c\\* \\_d\\_ \\[e\\](f) \\`g\\` &lt;h&gt; &amp;amp; \\$x\\$ \\\\")
    assert md_text("1\n2\x00", 200) == "1\\\\n2\\\\x00"  # one line, the characters shown as escapes
    assert md_text("  x ", 200) == "&nbsp; x&nbsp;" and md_text("", 5) == "*(empty)*"  # no space trimmed
    assert md_text("0123456789", 4) == "0123…" and md_text("0123456789", 4, tail=True) == "…6789"


# ------------------------------------------------------------------------------------------- determinism and faults


def test_two_actors_give_the_same_episodes_as_one(ray_local, tmp_path):
    one = make_cfg(tmp_path, ["BabyAI-GoToRedBall-v0"], episodes=8, rollout={"num_actors": 1, "envs_per_actor": 3})
    two = make_cfg(tmp_path, ["BabyAI-GoToRedBall-v0"], episodes=8, rollout={"num_actors": 2, "envs_per_actor": 2})
    a = evaluate(one, PolicySpec("random"), **QUIET)["tasks"]["BabyAI-GoToRedBall-v0"]
    b = evaluate(two, PolicySpec("random"), **QUIET)["tasks"]["BabyAI-GoToRedBall-v0"]
    assert [o["seed"] for o in a["per_episode"]] == eval_seeds(one)
    assert a["per_episode"] == b["per_episode"]
    assert len({o["return"] for o in a["per_episode"]}) > 1  # the seeds really differ


def test_crashing_env_is_counted_not_fatal(ray_local, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, ["CartPole-crash"], episodes=6)
    seeds = eval_seeds(cfg)
    crash = dataclasses.replace(tasks.get_task("CartPole-v1"), name="CartPole-crash",
                                wrappers=(f"crash_at_step:3:{seeds[1]},{seeds[4]}",))
    monkeypatch.setitem(tasks.TASKS, crash.name, crash)  # the actors receive the TaskInfo itself
    lines = []
    t = evaluate(cfg, PolicySpec("random"), log=lines.append)["tasks"]["CartPole-crash"]
    assert (t["episodes"], t["failed"]) == (4, 2)
    assert [o["seed"] for o in t["per_episode"]] == [s for s in seeds if s not in (seeds[1], seeds[4])]
    assert all("crash_at_step" in e for e in t["errors"]) and len(t["errors"]) == 2
    assert any("failed 2" in line for line in lines)


def test_actor_that_always_dies_loses_only_its_chunk(ray_local, tmp_path):
    """The rollout hook kills the actor process on one seed at every attempt: Ray restarts it and retries
    until it gives up; that chunk's episodes are counted as failed and the other chunk is reported."""
    cfg = make_cfg(tmp_path, ["CartPole-v1"], episodes=6)
    seeds = eval_seeds(cfg)
    chunks = split_seeds(seeds, cfg.rollout.num_actors, cfg.rollout.envs_per_actor)
    assert len(chunks) == 2
    t = evaluate(cfg, PolicySpec("random"), faults=FaultInjection(exit_seed=chunks[1][0]), **QUIET)["tasks"]["CartPole-v1"]
    assert (t["episodes"], t["failed"]) == (len(chunks[0]), len(chunks[1]))
    assert [o["seed"] for o in t["per_episode"]] == chunks[0]
    assert all("ActorDiedError" in e or "RayActorError" in e for e in t["errors"])


# ------------------------------------------------------------------------------------------- the model


def save_tiny_model(cfg, folder):
    torch.manual_seed(0)
    model = GatoModel(cfg.model, make_vocab(cfg.tokenizer), patch_size=cfg.tokenizer.patch_size)
    return save_model(model, folder / "model.pt")


def test_untrained_model_checkpoint_end_to_end(ray_local, tmp_path):
    names = ["BabyAI-GoToRedBall-v0", "text-arith", "vqa-minigrid-color", "Pendulum-v1"]
    cfg = make_cfg(tmp_path, names, episodes=3, eval={"prompt": True})
    cfg.tasks[0].temperature = 0.5  # tasks[].temperature: this task's actions are sampled, the others greedy
    ckpt = tmp_path / "ckpt"
    path = save_tiny_model(cfg, ckpt)
    assert resolve_checkpoint(ckpt) == path.resolve()  # a checkpoint directory or the file itself
    lines = []
    report = evaluate(cfg, PolicySpec("model", str(ckpt)), log=lines.append)
    check_schema(report, str(path.resolve()))
    assert set(report["tasks"]) == set(names) and report["policy"]["prompt"]
    assert any(store_dir(cfg, names[0]).glob("expert-*.parquet"))  # prompting collected demonstrations first
    assert report["tasks"][names[0]]["prompted"] is True
    assert any(line.startswith(f"eval {names[0]}: 3/3 episodes") for line in lines)
    assert [report["tasks"][n]["temperature"] for n in names] == [0.5, 0.0, 0.0, 0.0]
    # Only a greedy continuous action is decoded by its mean (rollout.continuous_actions).
    assert [report["tasks"][n]["continuous_actions"] for n in names] == [None, None, None, "mean"]
    write_report(report, eval_dir(cfg))
    md = (eval_dir(cfg) / "eval.md").read_text()
    assert ("The model's actions were sampled on BabyAI-GoToRedBall-v0 at temperature 0.5 and greedily on the "
            "others.") in md
    assert ("Greedy continuous actions (Pendulum-v1) took the value bin nearest the expected value of the model's "
            "distribution (`rollout.continuous_actions: mean`).") in md
    with pytest.raises(FileNotFoundError, match="model.pt"):
        evaluate(cfg, PolicySpec("model", str(tmp_path / "missing")), **QUIET)


def test_a_tasks_temperature_reaches_its_text_answers(tmp_path):
    """Dataset answering acts at the task's own temperature: the same answers as a policy of that temperature,
    not the greedy ones."""
    plain = make_cfg(tmp_path, ["text-arith"])
    sampled = make_cfg(tmp_path, ["text-arith"])
    sampled.tasks[0].temperature = 1.0
    ckpt = str(save_tiny_model(plain, tmp_path))
    seeds = [1000000, 1000001, 1000002, 1000003]

    def answers(cfg, policy):
        return [o["answer"] for o in score_dataset_chunk(cfg, "text-arith", policy, seeds)]

    by_task = answers(sampled, PolicySpec("model", ckpt))
    assert by_task == answers(plain, PolicySpec("model", ckpt, temperature=1.0))
    assert by_task != answers(plain, PolicySpec("model", ckpt))


@pytest.mark.parametrize("rotary,token_shift", [(False, False), (True, False), (False, True)])
def test_batched_generation_matches_one_prompt_at_a_time(tmp_path, rotary, token_shift):
    """Cached, batched greedy decoding of prompts of different lengths = uncached decoding of each alone
    (with rotary positions too: the batch right-aligns prompts, so only their local positions are right;
    with the token shift, a prompt's first token follows pads and must see none of them)."""
    from mugato_ray.datasets import generate_episodes, prompt_and_answer

    cfg = make_cfg(tmp_path, ["text-arith"], model={"context": 96, "rotary": rotary, "token_shift": token_shift})
    torch.manual_seed(1)
    model = GatoModel(cfg.model, make_vocab(cfg.tokenizer)).eval()
    if token_shift:  # a previous token as loud as the token itself, so a wrong previous token shows
        with torch.no_grad():
            model.shift.weight.mul_(20.0)
    if rotary:  # sharper attention than the 0.02-std init, so a wrong position would change the answers
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(20.0)
    tok = make_text_tokenizer(cfg.tokenizer)
    episodes = generate_episodes("text-arith", 4, 500, cfg)
    prompts = [prompt_and_answer("text-arith", ep)[0] for ep in episodes]
    assert len({len(p) for p in prompts}) > 1  # the batch really mixes lengths
    batched = generate_answers("text-arith", cfg, episodes, prompts, tok, model=model, max_new=[6] * 4)
    vocab, field = model.vocab, "act/text"
    from mugato_ray.sequence import LayoutField
    from mugato_ray.tokenizer import Modality, decode_text

    act = LayoutField(field, "action", Modality.TEXT, cfg.model.context, 1)
    legal = torch.zeros(vocab.size, dtype=torch.bool)
    legal[: vocab.text_size] = True
    legal[vocab.eos] = True
    for prompt, got in zip(prompts, batched):
        ids = list(tok.encode(prompt))
        new = []
        with torch.no_grad():
            for _ in range(min(6, cfg.model.context - len(ids))):  # the text field ends at the context
                x, valid, _, pos = model.embed(
                    {field: torch.tensor(ids + new).view(1, 1, -1, 1)}, [act], step_index_BxE=torch.zeros((1, 1))
                )
                logits = model.logits(model.trunk(x, valid, pos_BxL=pos)[:, -1])[0].masked_fill(~legal, float("-inf"))
                new.append(int(logits.argmax()))
        assert got == decode_text(np.asarray(new), tok, vocab)


# ------------------------------------------------------------------------------------------- the job


def test_evaluate_job_writes_the_report(ray_local, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run = tmp_path / "run"
    job.main(["--config", "configs/smoke.yaml", "--policy", "expert", f"run_dir={run}",
              "tasks=[{name: CartPole-v1, episodes: 2}]", "eval.episodes=2"])
    out = capsys.readouterr().out
    assert "CartPole-v1" in out and "IQM normalized score" in out and str(run / "eval" / "eval.json") in out
    check_schema(json.loads((run / "eval" / "eval.json").read_text()), "policy:expert")
    with pytest.raises(SystemExit):
        job.main(["--config", "configs/smoke.yaml"])  # --checkpoint or --policy is required


# ------------------------------------------------------------------------------------------- a cluster


def test_two_node_cluster_runs_an_evaluation(tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # One CPU per actor: the two actors cannot share a node, so both nodes run episodes.
        cfg = make_cfg(tmp_path, ["CartPole-v1"], episodes=8, rollout={"actor_cpus": 1.0})
        report = evaluate(cfg, PolicySpec("random"), **QUIET)
        check_schema(report, "policy:random")
        assert report["tasks"]["CartPole-v1"]["episodes"] == 8
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_checkpoint_evaluates_after_its_run_config_and_bpe_file_are_gone(ray_local, tmp_path, capsys):
    """A checkpoint carries what acting needs (config, layouts, BPE tokenizer): copied elsewhere, with its run
    directory, config file and BPE file deleted, the evaluation job still scores it on its tasks."""
    import importlib.util
    import shutil
    from pathlib import Path

    from mugato_ray.checkpoints import TOKENIZER_FILE, write_checkpoint
    from mugato_ray.data import task_layouts
    from mugato_ray.datasets import generate_episodes, prompt_and_answer
    from mugato_ray.learner import make_optimizer
    from mugato_ray.tokenizer import train_bpe

    byte_cfg = make_cfg(tmp_path, ["text-arith"])
    corpus = ["".join(prompt_and_answer("text-arith", ep)) for ep in generate_episodes("text-arith", 200, 0, byte_cfg)]
    bpe = tmp_path / "bpe" / "tokenizer.json"
    train_bpe(corpus, vocab_size=300, path=bpe)
    cfg = make_cfg(tmp_path, ["CartPole-v1", "text-arith"], episodes=2,
                   tokenizer={"text": "bpe", "bpe_path": str(bpe)})
    specs, layouts = task_layouts(cfg)
    torch.manual_seed(0)
    model = GatoModel(cfg.model, specs["CartPole-v1"].vocab, patch_size=cfg.tokenizer.patch_size)
    original = tmp_path / "run" / "checkpoints" / "checkpoint_00000001"
    original.mkdir(parents=True)
    write_checkpoint(original, model, make_optimizer(model, cfg.train), 1, cfg, specs, layouts)
    assert (original / TOKENIZER_FILE).is_file()
    moved = tmp_path / "elsewhere" / "checkpoint_00000001"
    shutil.copytree(original, moved)
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(bpe.parent)

    path = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out_dir = tmp_path / "eval_run"
    job.main(["--checkpoint", str(moved), f"run_dir={out_dir}"])  # no --config: the checkpoint's own
    report = json.loads((out_dir / "eval" / "eval.json").read_text())
    assert set(report["tasks"]) == {"CartPole-v1", "text-arith"}
    assert all(t["episodes"] == 2 and t["failed"] == 0 for t in report["tasks"].values())
    assert report["checkpoint"] == str((moved / "model.pt").resolve())
    # The checkpoint's folder names its step: the scores join the run's eval metrics at it.
    (row,) = read_metrics(out_dir / "metrics" / "eval.csv")
    assert row["step"] == 1 and row["eval/CartPole-v1/episodes"] == 2
    assert row["eval/text-arith/mean_return"] == report["tasks"]["text-arith"]["mean_return"]
    assert any((out_dir / "metrics" / "tb" / "eval").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_64_env_evaluation_over_2_actors_stays_under_the_stated_memory_bound():
    """README "Reliability": the demo's tasks, an untrained demo-size model (long episodes), 64 envs over 2
    actors; the job's processes together stay under the bound bench/eval_memory.py prints the ratio to."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "eval_memory.py"), run_name="bench")
    peaks = bench["measure"]("configs/demo.yaml", actors=2, envs_per_actor=32, episodes=64)
    assert peaks["rss"] < bench["BOUND_MIB"] * 2**20, peaks
