"""Minari datasets in and out of the episode store: a tiny CartPole dataset recorded by Minari's own DataCollector
is imported (and checked episode by episode against what Minari reads), imported again, refused for a task whose
spaces differ, carries its reference scores into normalization, and round-trips through an export; a BabyAI store
(Dict observations: image, direction, mission text) round-trips through export and import."""

from __future__ import annotations

import os
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest

minari = pytest.importorskip("minari", reason="Minari is an optional extra: pip install 'mugato-ray[minari]'")

from mugato_ray.config import config_from_dict  # noqa: E402
from mugato_ray.episodes import read_episodes, store_dir  # noqa: E402
from mugato_ray.evaluate import markdown_report, summarize_task  # noqa: E402
from mugato_ray.minari_io import MinariIOError, export_task, import_dataset, plan_export, plan_import  # noqa: E402
from mugato_ray.resolve import resolve_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIG_SEED = 2**64 - 5  # Minari auto-seeds with 64 random bits; the store's seed column is int64
DATASET_ID = "test/cartpole/random-v0"


def record_cartpole(root: Path, dataset_id: str, refs: tuple[float, float] | None = (500.0, 10.0), actions: int = 0,
                    data_format: str = "arrow"):
    """Four episodes of random actions (drawn from seed ``actions``) through Minari's DataCollector: seeds 3 and
    4, one reset without a seed, and one with a seed above 2**63 cut after 5 steps (Minari marks it truncated)."""
    pytest.importorskip("jax", reason="Minari's DataCollector needs jax (the minari[create] extra, in our dev extra)")
    import gymnasium as gym

    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        env = minari.DataCollector(gym.make("CartPole-v1"), data_format=data_format)
        env.action_space.seed(actions)
        for seed, steps in ((3, None), (4, None), (None, None), (BIG_SEED, 5)):
            env.reset(seed=seed, options=None if seed is not None else {"minari_autoseed": False})
            for _ in range(steps or 500):
                *_, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    break
        kwargs = {} if refs is None else {"ref_max_score": refs[0], "ref_min_score": refs[1]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return env.create_dataset(dataset_id, **kwargs)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH") if old is None else os.environ.update(MINARI_DATASETS_PATH=old)


@pytest.fixture(autouse=True)
def no_remote(monkeypatch):
    """Nothing here may reach Minari's remote: its download and cloud-storage entry points raise if called."""
    import minari.storage.hosting as hosting
    import minari.storage.local as local

    def refuse(*args, **kwargs):
        raise AssertionError(f"Minari's remote was called with {args} {kwargs}")

    for module, name in ((minari, "download_dataset"), (hosting, "download_dataset"), (local.hosting, "download_dataset"),
                         (hosting, "get_cloud_storage"), (hosting, "list_remote_datasets")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    return record_cartpole(root, DATASET_ID), root


def cfg_for(run_dir: Path, *tasks: str):
    return config_from_dict({"run_dir": str(run_dir), "rollout": {"max_episode_steps": 8},
                             "tasks": [{"name": t} for t in tasks or ("CartPole-v1",)]})


def collect(cfg, name: str, policy: str, seeds: list[int]):
    """Episodes of ``policy`` ("expert" or "random") on ``seeds``, written to the task's store and read back."""
    from mugato_ray.rollout import PolicySpec, RolloutWorker

    worker = RolloutWorker(name, PolicySpec(policy), cfg, num_envs=2)
    try:
        worker.sample(seeds, source=policy, store_dir=store_dir(cfg, name))
    finally:
        worker.close()
    return read_episodes(store_dir(cfg, name))


def by_seed(episodes):
    return {ep.seed: ep for ep in episodes}


def test_import_equals_the_dataset(cartpole, tmp_path):
    dataset, _ = cartpole
    cfg = cfg_for(tmp_path / "run")
    logs = []
    summary = import_dataset(plan_import(cfg, dataset.storage.data_path), log=logs.append)
    stored = by_seed(read_episodes(store_dir(cfg, "CartPole-v1")))
    # Seeds from Minari's episode metadata; the unseeded episode's index stands in; 2**64 - 5 wraps into int64.
    assert sorted(stored) == sorted([3, 4, 2, BIG_SEED - 2**64])
    assert summary.written == 4 and summary.seeds_from_index == 1 and any("no seed" in line for line in logs)
    for minari_ep, seed in zip(dataset.iterate_episodes(), [3, 4, 2, BIG_SEED - 2**64]):
        ep = stored[seed]
        assert ep.episode_id == f"CartPole-v1-expert-{seed}" and ep.source == "expert"
        np.testing.assert_array_equal(ep.observations["observation"], minari_ep.observations[:-1])  # final dropped
        np.testing.assert_array_equal(ep.actions, minari_ep.actions)
        np.testing.assert_array_equal(ep.rewards, minari_ep.rewards.astype(np.float32))
        assert ep.terminated == bool(minari_ep.terminations[-1]) and ep.length == len(minari_ep.rewards)
        assert ep.success is False  # CartPole's criterion (return >= 475) on a random policy's return
    assert not stored[BIG_SEED - 2**64].terminated and stored[BIG_SEED - 2**64].length == 5  # cut: truncated


def test_an_hdf5_dataset_imports_the_same(cartpole, tmp_path):
    """Minari's other storage (many published datasets use it) gives the same store as the arrow one."""
    pytest.importorskip("h5py", reason="Minari's hdf5 storage needs h5py (the minari extra)")
    dataset, root = cartpole
    hdf5 = record_cartpole(root, "test/cartpole/hdf5-v0", data_format="hdf5")
    arrow_cfg, hdf5_cfg = cfg_for(tmp_path / "arrow"), cfg_for(tmp_path / "hdf5")
    import_dataset(plan_import(arrow_cfg, dataset.storage.data_path), log=lambda _: None)
    import_dataset(plan_import(hdf5_cfg, hdf5.storage.data_path), log=lambda _: None)
    assert_same_episodes(read_episodes(store_dir(hdf5_cfg, "CartPole-v1")),
                         read_episodes(store_dir(arrow_cfg, "CartPole-v1")))


def test_importing_again_neither_duplicates_nor_loses(cartpole, tmp_path):
    dataset, root = cartpole
    cfg = cfg_for(tmp_path / "run")
    import_dataset(plan_import(cfg, dataset.storage.data_path), log=lambda _: None)
    files = sorted(store_dir(cfg, "CartPole-v1").iterdir())
    with pytest.raises(MinariIOError, match="already holds 4 of its 4 episodes.*--resume"):
        plan_import(cfg, dataset.storage.data_path)
    summary = import_dataset(plan_import(cfg, dataset.storage.data_path, resume=True), log=lambda _: None)
    assert (summary.written, summary.skipped) == (0, 4)
    assert sorted(store_dir(cfg, "CartPole-v1").iterdir()) == files
    assert len(read_episodes(store_dir(cfg, "CartPole-v1"))) == 4
    # Another episode under a stored id (same seed and source, another length) is refused even with resume.
    other = record_cartpole(root, "test/cartpole/other-v0", refs=None, actions=1)
    with pytest.raises(MinariIOError, match="share an id but differ"):
        plan_import(cfg, other.storage.data_path, resume=True)


def test_a_task_with_other_spaces_is_refused_before_any_write(cartpole, tmp_path):
    dataset, _ = cartpole
    cfg = cfg_for(tmp_path / "run", "Pendulum-v1")
    with pytest.raises(MinariIOError) as e:
        plan_import(cfg, dataset.storage.data_path, task="Pendulum-v1")
    assert "(4,), float32" in str(e.value) and "(3,), float32" in str(e.value) and "'Pendulum-v1'" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_bad_inputs_exit_2_before_anything_is_written(cartpole, tmp_path, capsys, monkeypatch):
    _, root = cartpole
    job = runpy.run_path(str(ROOT / "jobs" / "import_minari.py"), run_name="import_job")
    config, run = str(ROOT / "configs" / "smoke.yaml"), tmp_path / "run"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    for args, expected in ((["--dataset", str(tmp_path / "nothing")], str(tmp_path / "nothing")),
                           (["--dataset", DATASET_ID, "--task", "NoSuchTask-v0"], "--task 'NoSuchTask-v0'")):
        with pytest.raises(SystemExit) as e:
            job["main"](["--config", config, f"run_dir={run}", *args])
        assert e.value.code == 2 and expected in capsys.readouterr().err
    assert not run.exists()
    job["main"](["--config", config, f"run_dir={run}", "--dataset", DATASET_ID])  # a dataset id under the root
    assert len(read_episodes(run / "data" / "CartPole-v1")) == 4 and (run / "config.yaml").exists()


def test_the_datasets_references_normalize_the_task(cartpole, tmp_path):
    dataset, root = cartpole
    cfg = cfg_for(tmp_path / "run")
    assert resolve_task("CartPole-v1", cfg).reference_origin == "references.yaml"
    import_dataset(plan_import(cfg, dataset.storage.data_path), log=lambda _: None)
    task = resolve_task("CartPole-v1", cfg)
    assert task.references == (500.0, 10.0) and DATASET_ID in task.reference_origin
    entry = summarize_task(cfg, task.name, [{"seed": 0, "return": 255.0, "length": 255, "success": False}], [], 255,
                           1.0, task.references)
    assert entry["normalized_score"] == pytest.approx((255 - 10) / (500 - 10))
    entry["reference_origin"] = task.reference_origin
    report = {"checkpoint": "x", "seeds": {"offset": 0, "episodes": 1}, "tasks": {task.name: entry},
              "iqm_normalized_score": entry["normalized_score"]}
    assert f"- {task.reference_origin}: CartPole-v1" in markdown_report(report)
    # Another dataset with other references for the same store is refused before it writes anything.
    other = record_cartpole(root, "test/cartpole/refs-v0", refs=(400.0, 0.0))
    with pytest.raises(MinariIOError, match="differ from the references the store keeps"):
        plan_import(cfg, other.storage.data_path, source="random")


def test_export_then_import_round_trips(cartpole, tmp_path):
    dataset, _ = cartpole
    cfg, out = cfg_for(tmp_path / "run"), tmp_path / "out"
    import_dataset(plan_import(cfg, dataset.storage.data_path), log=lambda _: None)
    original = by_seed(read_episodes(store_dir(cfg, "CartPole-v1")))
    job = runpy.run_path(str(ROOT / "jobs" / "export_minari.py"), run_name="export_job")
    job["main"](["--config", str(ROOT / "configs" / "smoke.yaml"), f"run_dir={cfg.run_dir}", "--task", "CartPole-v1",
                 "--out", str(out), "--dataset-id", "mugato/cartpole/expert-v0"])
    exported = minari.MinariDataset(out / "mugato/cartpole/expert-v0" / "data")
    meta = exported.storage.metadata
    assert (meta["ref_max_score"], meta["ref_min_score"], meta["final_observation"]) == (500.0, 10.0, "repeated_last")
    assert exported.env_spec.id == "CartPole-v1" and exported.observation_space == dataset.observation_space
    seeds = [m["seed"] for m in exported.storage.get_episode_metadata(exported.episode_indices)]
    assert sorted(seeds) == sorted([3, 4, 2, BIG_SEED])  # seeds back in Minari's unsigned range
    for ep, seed in zip(exported.iterate_episodes(), seeds):
        mine = original[seed - 2**64 if seed >= 2**63 else seed]
        np.testing.assert_array_equal(ep.observations[:-1], mine.observations["observation"])
        np.testing.assert_array_equal(ep.observations[-1], mine.observations["observation"][-1])  # repeated
        np.testing.assert_array_equal(ep.actions, mine.actions)
        assert (bool(ep.terminations[-1]), bool(ep.truncations[-1])) == (mine.terminated, not mine.terminated)
    with pytest.raises(MinariIOError, match="already exists"):  # an export never overwrites a dataset
        plan_export(cfg, "CartPole-v1", out, dataset_id="mugato/cartpole/expert-v0")
    again = cfg_for(tmp_path / "again")
    import_dataset(plan_import(again, out / "mugato/cartpole/expert-v0"), log=lambda _: None)
    assert_same_episodes(read_episodes(store_dir(again, "CartPole-v1")), original.values())


def assert_same_episodes(got, want):
    got, want = {ep.episode_id: ep for ep in got}, {ep.episode_id: ep for ep in want}
    assert sorted(got) == sorted(want)
    for eid, ep in want.items():
        g = got[eid]
        assert (g.source, g.seed, g.terminated, g.success, g.policy_step) == (
            ep.source, ep.seed, ep.terminated, ep.success, ep.policy_step)
        assert sorted(g.observations) == sorted(ep.observations)
        for key, value in ep.observations.items():
            if isinstance(value, list):
                assert g.observations[key] == value
            else:
                np.testing.assert_array_equal(g.observations[key], value)
                assert g.observations[key].dtype == value.dtype
        np.testing.assert_array_equal(g.actions, ep.actions)
        assert (g.executed is None) == (ep.executed is None)
        if ep.executed is not None:
            np.testing.assert_array_equal(g.executed, ep.executed)
            assert g.executed.dtype == ep.executed.dtype
        np.testing.assert_array_equal(g.rewards, ep.rewards)


@pytest.mark.parametrize("name, noise", [("CartPole-v1", 0.5), ("Pendulum-v1", 0.6)])
def test_dart_episodes_export_the_executed_actions_and_the_labels(tmp_path, name, noise):
    """A DART store (the expert's labels, the perturbed actions the env took): the Minari actions replay each
    episode from its seed, the labels are the mugato_label info, and importing the export gives the episodes back."""
    import gymnasium as gym

    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "rollout": {"max_episode_steps": 12},
                            "tasks": [{"name": name, "expert_noise": noise}]})
    original = collect(cfg, name, "expert", [5, 6])
    assert all(ep.executed is not None for ep in original)  # the noise changed what some steps executed
    path = export_task(plan_export(cfg, name, tmp_path / "out"), log=lambda _: None)
    exported = minari.MinariDataset(path / "data")
    mine = by_seed(original)
    for ep, meta in zip(exported.iterate_episodes(), exported.storage.get_episode_metadata(exported.episode_indices)):
        stored = mine[meta["seed"]]
        np.testing.assert_array_equal(ep.actions, stored.executed)
        labels = np.asarray(ep.infos["mugato_label"])
        np.testing.assert_array_equal(labels[:-1], stored.actions)
        np.testing.assert_array_equal(labels[-1], stored.actions[-1])  # one per observation: the last repeated
        env = gym.make(name)  # the dataset's actions, replayed from the seed, visit its observations
        obs, _ = env.reset(seed=meta["seed"])
        for t, action in enumerate(ep.actions):
            np.testing.assert_allclose(obs, ep.observations[t], rtol=1e-6)
            obs, *_ = env.step(action)
        env.close()
    again = cfg_for(tmp_path / "again", name)
    import_dataset(plan_import(again, path), log=lambda _: None)
    assert_same_episodes(read_episodes(store_dir(again, name)), original)


def test_labels_in_a_datasets_infos_are_checked(cartpole, tmp_path):
    """A mugato_label info of the wrong length is refused, naming the episode; without it the actions are the labels."""
    from types import SimpleNamespace

    from mugato_ray.minari_io import _labels

    executed = np.array([0, 1, 1], np.int64)
    assert _labels(SimpleNamespace(infos={}), executed, "d: episode 0") is executed
    good = SimpleNamespace(infos={"mugato_label": np.array([1, 1, 0, 0])})
    np.testing.assert_array_equal(_labels(good, executed, "d: episode 0"), [1, 1, 0])
    with pytest.raises(MinariIOError, match=r"d: episode 3: infos\['mugato_label'\] has shape \(3,\)"):
        _labels(SimpleNamespace(infos={"mugato_label": np.array([1, 1, 0])}), executed, "d: episode 3")
    with pytest.raises(MinariIOError, match="fractions"):
        _labels(SimpleNamespace(infos={"mugato_label": np.array([0.5, 1, 0, 0])}), executed, "d: episode 0")


def test_a_dict_observation_store_round_trips(tmp_path):
    """BabyAI: image (56x56x3, stored losslessly), direction and mission text, 8-step random episodes."""
    name = "BabyAI-GoToRedBall-v0"
    cfg, out = cfg_for(tmp_path / "run", name), tmp_path / "out"
    original = collect(cfg, name, "random", [0, 1])
    path = export_task(plan_export(cfg, name, out), log=lambda _: None)
    assert path == out / "mugato/BabyAI-GoToRedBall-v0/random-v0"
    exported = minari.MinariDataset(path / "data")
    first = next(exported.iterate_episodes())
    assert sorted(first.observations) == ["direction", "image", "mission"] and isinstance(first.observations["mission"][0], str)
    again = cfg_for(tmp_path / "again", name)
    import_dataset(plan_import(again, path), log=lambda _: None)  # source "random" from the export's metadata
    assert_same_episodes(read_episodes(store_dir(again, name)), original)
