"""Distributed training end to end: DDP on CPU, checkpoints, resume, worker failure, clusters, job submit."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mugato_ray.checkpoints import TRAIN_MODEL_KEY, latest_checkpoint, read_state, verify_checkpoint
from mugato_ray.config import load_config
from mugato_ray.data import load_layouts, write_synthetic_store
from mugato_ray.learner import CRASH_ENV, lr_at, make_optimizer
from mugato_ray.model import GatoModel, load_model
from mugato_ray.resources import plan_resources
from mugato_ray.train import TrainingFailedError, ingest_config, scores_snapshot, train

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["text-arith", "BabyAI-GoToRedBall-v0", "Pendulum-v1"]


def make_cfg(run_dir, *overrides, tasks=TASKS):
    names = ", ".join(f"{{name: {t}}}" for t in tasks)
    return load_config(ROOT / "configs/smoke.yaml", [f"run_dir={run_dir}", f"tasks=[{names}]", *overrides])


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_snapshots_are_scored_every_eval_every_steps_once_every_task_has_joined(tmp_path):
    every = make_cfg(tmp_path, "train.steps=10", "train.eval_every=4")
    assert [d for d in range(1, 11) if scores_snapshot(every, d)] == [4, 8, 10]  # and at the last step
    assert not any(scores_snapshot(make_cfg(tmp_path, "train.steps=10"), d) for d in range(1, 11))  # eval_every 0
    # Pendulum joins at step 4 (0-based): after 4 steps it has not trained yet, after 8 it has.
    late = load_config(ROOT / "configs/smoke.yaml", [f"run_dir={tmp_path}", "train.steps=10", "train.eval_every=4",
                       "tasks=[{name: text-arith}, {name: Pendulum-v1, start_step: 4}, "
                       "{name: CartPole-v1, weight: 0, start_step: 9}]"])  # weight 0: never trains, never waited for
    assert [d for d in range(1, 11) if scores_snapshot(late, d)] == [8, 10]


def test_training_takes_blocks_in_the_stores_order_unless_told_otherwise(tmp_path):
    """What the Ray Train workers' dataset shards are executed with (the behaviour: a seed repeats a run
    on a four-file store, test_a_seed_repeats_a_training_run)."""
    def ordered(*overrides):
        return ingest_config(make_cfg(tmp_path, *overrides))._resolve_execution_options("any").preserve_order

    assert ordered() is True and ordered("data.preserve_order=false") is False


def test_lr_warms_up_then_decays_to_the_floor(tmp_path):
    t = make_cfg(tmp_path, "train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1").train
    lrs = [lr_at(s, t) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[100] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # cosine midpoint


def test_weight_decay_only_on_matrices(tmp_path):
    from mugato_ray.tokenizer import VocabLayout

    cfg = make_cfg(tmp_path)
    model = GatoModel(cfg.model, VocabLayout(256), cfg.tokenizer.patch_size)
    decay, no_decay = make_optimizer(model, cfg.train).param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "resources, workers, gpu",
    [({"CPU": 2.0}, 1, False), ({"CPU": 2.0}, 2, False), ({"CPU": 16.0, "GPU": 8.0}, 8, True),
     ({"CPU": 1.0}, 1, False), ({"CPU": 64.0, "GPU": 8.0}, 8, True)],
)
def test_plan_never_gives_training_every_cpu(tmp_path, resources, workers, gpu):
    four = ["text-arith", "BabyAI-GoToRedBall-v0", "Pendulum-v1", "CartPole-v1"]
    cfg = make_cfg(tmp_path, f"train.num_workers={workers}", f"train.use_gpu={str(gpu).lower()}",
                   "data.num_tokenize_actors=0", tasks=four)
    plan = plan_resources(cfg, resources)
    train_cpus = plan.train_workers * plan.cpus_per_worker
    data_cpus = len(four) * plan.data_cpus
    assert plan.train_workers == workers and plan.use_gpu == gpu
    assert plan.tokenize_actors >= 1 and 0 < plan.tokenize_cpus < 1  # no data reservation needs a whole CPU
    assert 0 < train_cpus < resources["CPU"]
    assert data_cpus > 0 and train_cpus + data_cpus <= resources["CPU"] + 1e-9
    assert plan.torch_threads >= 1


def test_plan_holds_cpus_back_for_the_evaluator_and_honours_torch_threads(tmp_path):
    base = plan_resources(make_cfg(tmp_path), {"CPU": 2.0})
    plan = plan_resources(make_cfg(tmp_path, "train.eval_every=10", "train.torch_threads=2"), {"CPU": 2.0})
    assert base.eval_cpus == 0 and plan.eval_cpus == pytest.approx(0.2)
    data = len(TASKS) * plan.data_cpus
    assert plan.cpus_per_worker + data + plan.eval_cpus <= 2.0 + 1e-9
    assert plan.cpus_per_worker == pytest.approx(base.cpus_per_worker - 0.2, abs=1e-3)
    assert plan.torch_threads == 2 and base.torch_threads == 1


@pytest.mark.parametrize("name", ["demo.yaml", "suite.yaml", "domains.yaml"])
def test_laptop_configs_plan_on_two_cpus(tmp_path, name):
    """The configs meant for a 2-core laptop fit it (the suite's 18 task datasets included)."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / name, [f"run_dir={tmp_path}"])
    plan = plan_resources(cfg, {"CPU": 2.0})
    used = plan.train_workers * plan.cpus_per_worker + len(cfg.tasks) * plan.data_cpus + plan.eval_cpus
    assert plan.tokenize_cpus > 0 and plan.cpus_per_worker > 0 and used <= 2.0 + 1e-9


def test_plan_rejects_what_cannot_fit(tmp_path):
    with pytest.raises(ValueError, match="train.use_gpu"):
        plan_resources(make_cfg(tmp_path, "train.use_gpu=true"), {"CPU": 8.0})
    with pytest.raises(ValueError, match="train.cpus_per_worker"):
        plan_resources(make_cfg(tmp_path, "train.num_workers=2", "train.cpus_per_worker=1"), {"CPU": 2.0})


# ---------------------------------------------------------------------------------------------
# Ray Train


def test_two_ddp_workers_learn_a_task_mixture_in_step(local_ray, tmp_path):
    """2 workers on CPU (gloo), micro-batches of a text task (no image: the patch embedding is unused),
    an image+mission+discrete task and a continuous task accumulated into every step."""
    cfg = make_cfg(tmp_path, "train.num_workers=2", "train.steps=16", "train.log_every=4", "train.lr=3e-3",
                   "train.checkpoint_every=16")
    write_synthetic_store(cfg, 8)
    result = train(cfg)
    assert result.final_step == 16
    first, last = result.history[0], result.history[-1]
    assert [h["step"] for h in result.history] == [4, 8, 12, 16]
    for task in TASKS:
        # A uniform predictor scores ln(vocab) = 7.2 nats. The text and the discrete action (7 ids) have
        # at most ln(7) = 1.9 nats of entropy, the continuous action at most ln(1024) = 6.9: each logged
        # loss (a mean over 4 steps) must drop, the first two by well over 0.5 nats.
        assert last[f"loss/{task}"] < first[f"loss/{task}"] - (0.05 if task == "Pendulum-v1" else 0.5), task
    # DDP kept both replicas identical at every log step (max - min of a parameter checksum over ranks).
    assert all(h["rank_param_spread"] == 0.0 for h in result.history)
    assert all(math.isfinite(h["grad_norm"]) and h["tokens_per_s"] > 0 for h in result.history)


def test_a_seed_repeats_a_training_run(local_ray, tmp_path):
    """Two runs with the same seed on the same store, each in its own Ray Train worker: the same initial
    weights and the same batches, so the same losses and the same final weights. The store is four files
    (four blocks per task) read by two tokenize actors, whose blocks finish in any order: training takes
    them in the store's order (data.preserve_order)."""
    runs = []
    for name in ("a", "b"):
        cfg = make_cfg(tmp_path / name, "train.steps=3", "train.log_every=1", "train.checkpoint_every=3",
                       "data.num_tokenize_actors=2", "data.one_block_mib=0")
        write_synthetic_store(cfg, 16, files=4)  # the same episodes in both: its seed is fixed
        result = train(cfg)
        runs.append((result.history, load_model(latest_checkpoint(cfg) / "model.pt").state_dict()))
    (history_a, weights_a), (history_b, weights_b) = runs
    losses = [[h[f"loss/{t}"] for t in TASKS] for h in history_a]
    assert len(losses) == 3 and losses == [[h[f"loss/{t}"] for t in TASKS] for h in history_b]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_killed_worker_recovers_and_a_rerun_resumes_at_the_checkpoint_step(local_ray, tmp_path, monkeypatch):
    """One run loses its worker and restores it from the last checkpoint (max_failures=1); running the
    same run again with more steps continues from its last checkpoint, not from step 0."""
    cfg = make_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
                   "train.keep_checkpoints=2", "train.max_failures=1",
                   tasks=["Pendulum-v1"])  # one task: one actor pool to start, three times
    write_synthetic_store(cfg, 4)
    monkeypatch.setenv(CRASH_ENV, "3")  # rank 0 exits hard when it reaches step 3, once
    first = train(cfg)
    assert (tmp_path / ".crashed_at_step_3").exists()
    assert first.final_step == 4 and Path(first.checkpoint_path).name == "checkpoint_00000004"
    assert [h["step"] for h in first.history] == [3, 4]  # the attempt that finished restarted at 2
    monkeypatch.delenv(CRASH_ENV)

    cfg.train.steps = 6
    second = train(cfg)
    assert [h["step"] for h in second.history] == [5, 6]  # started at 4, not at 0
    assert second.final_step == 6
    ckpt = latest_checkpoint(cfg)
    assert ckpt == Path(second.checkpoint_path) and ckpt.name == "checkpoint_00000006"
    kept = sorted(p.name for p in ckpt.parent.glob("checkpoint_[0-9]*"))
    assert kept == ["checkpoint_00000004", "checkpoint_00000006"]  # keep_checkpoints=2
    # Everything in a checkpoint loads without executing code.
    assert read_state(ckpt)["step"] == 6
    model = load_model(ckpt / "model.pt")
    specs, layouts = load_layouts(ckpt / "layouts.json")
    assert set(layouts) == {"Pendulum-v1"} and model.vocab == specs["Pendulum-v1"].vocab
    assert load_config(ckpt / "config.yaml").train.steps == 6
    state = read_state(ckpt)["optimizer"]["state"]
    assert state and all(int(s["step"]) == 6 for s in state.values())  # AdamW restored, then 2 more steps


def test_driver_mode_keeps_and_resumes_its_own_checkpoints(local_ray, tmp_path):
    """train.num_workers=0 runs the loop in the driver, where Ray Train persists no checkpoint."""
    cfg = make_cfg(tmp_path, "train.num_workers=0", "train.steps=2", "train.checkpoint_every=1",
                   "train.keep_checkpoints=1", "train.ema_decay=0.5", tasks=["Pendulum-v1"])
    write_synthetic_store(cfg, 4)
    first = train(cfg)
    assert Path(first.checkpoint_path) == latest_checkpoint(cfg) and read_state(latest_checkpoint(cfg))["step"] == 2
    # train.ema_decay: model.pt holds the weights' average, state.pt the training weights.
    acting, trained = load_model(latest_checkpoint(cfg) / "model.pt").state_dict(), \
        read_state(latest_checkpoint(cfg))[TRAIN_MODEL_KEY]
    assert acting.keys() == trained.keys() and any(not torch.equal(acting[k], trained[k]) for k in acting)
    cfg.train.steps = 3
    second = train(cfg)
    assert [h["step"] for h in second.history] == [3]
    assert [p.name for p in latest_checkpoint(cfg).parent.glob("checkpoint_*")] == ["checkpoint_00000003"]


def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(local_ray, tmp_path):
    """Ray's bookkeeping names checkpoint 4 as the latest; its model.pt is cut short, so the rerun resumes
    from checkpoint 2 (verified against its manifest) instead of failing, and writes 4 again."""
    cfg = make_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
                   "train.keep_checkpoints=3", tasks=["Pendulum-v1"])
    write_synthetic_store(cfg, 4)
    train(cfg)
    newest = latest_checkpoint(cfg)
    assert newest.name == "checkpoint_00000004" and verify_checkpoint(newest) is None
    model = newest / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a real truncated file
    assert "model.pt has" in verify_checkpoint(newest)
    assert latest_checkpoint(cfg).name == "checkpoint_00000002"
    first = pd.read_csv(tmp_path / "metrics" / "train.csv")
    cfg.train.steps = 6
    again = train(cfg)
    assert [h["step"] for h in again.history] == [3, 4, 5, 6]  # resumed at 2, not 4 and not 0
    assert verify_checkpoint(newest) is None and latest_checkpoint(cfg).name == "checkpoint_00000006"
    # Rank 0 logged every report; the rows of steps 3 and 4 that the first run logged past checkpoint 2 gave
    # way to the second run's, in the CSV and in TensorBoard's reading of both runs' event files.
    df = pd.read_csv(tmp_path / "metrics" / "train.csv")
    assert df["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert df["tokens_per_s"].iloc[:2].tolist() == first["tokens_per_s"].iloc[:2].tolist()
    for key in ("loss", "loss/Pendulum-v1", "nonpad/Pendulum-v1", "tokens_per_s", "lr", "grad_norm"):
        assert df[key].iloc[2:].tolist() == [h[key] for h in again.history], key
    acc = EventAccumulator(str(tmp_path / "metrics" / "tb" / "train"))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("tokens_per_s")]
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tb] == pytest.approx(df["tokens_per_s"].tolist(), rel=1e-6)  # float32 in the file


def test_a_failure_past_max_failures_names_the_key(local_ray, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "train.steps=3", "train.max_failures=0", tasks=["Pendulum-v1"])
    write_synthetic_store(cfg, 4)
    monkeypatch.setenv(CRASH_ENV, "1")
    with pytest.raises(TrainingFailedError, match=r"train\.max_failures=0 restarts"):
        train(cfg)


def test_resume_skips_unfinished_and_corrupt_checkpoints_and_says_which(local_ray, tmp_path, caplog):
    cfg = make_cfg(tmp_path, "train.num_workers=0", "train.steps=3", "train.checkpoint_every=1",
                   "train.keep_checkpoints=3", tasks=["Pendulum-v1"])
    write_synthetic_store(cfg, 4)
    train(cfg)
    c1, c2, c3 = sorted(latest_checkpoint(cfg).parent.glob("checkpoint_*"))
    (c3 / "manifest.json").unlink()  # killed before its manifest was written: never completed
    (c2 / "state.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="mugato_ray.checkpoints"):
        assert latest_checkpoint(cfg) == c1
    assert c3.name in caplog.text and "no manifest.json" in caplog.text and c2.name in caplog.text
    assert "state.pt" in verify_checkpoint(c2)
    (c1 / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="skipped 3 that do not verify"):
        latest_checkpoint(cfg)
    cfg.train.steps = 4
    assert [h["step"] for h in train(cfg).history] == [1, 2, 3, 4]  # nothing verifies: from step 0


@pytest.mark.slow
def test_a_two_node_cluster_completes_a_run(tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cluster.wait_for_nodes()
        cfg = make_cfg(tmp_path, "train.num_workers=2", "train.steps=4", "train.checkpoint_every=4")
        write_synthetic_store(cfg, 4)
        result = train(cfg)
        assert result.final_step == 4
        assert read_state(latest_checkpoint(cfg))["step"] == 4
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------------------------------------
# ray job submit against a real head node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_group(pgid: int) -> list:
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def _stop_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, to the process group ``pgid`` (a head's processes stay in the
    group of the shell that ran ``ray start``; its GCS was seen to ignore SIGTERM). ``ray stop`` would stop every
    Ray on the machine, other test runs' too."""
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        _, alive = psutil.wait_procs(_process_group(pgid), timeout=grace_s)
        if not alive:
            return


def test_ray_job_submit_trains_and_leaves_a_checkpoint(tmp_path):
    """The README's cluster sequence, ``deploy/submit_local.sh``, run as it is against a fresh head with Ray's
    default authentication (token authentication, turned on by the script): a job submitted with
    ``ray job submit --working-dir .`` trains and leaves a checkpoint.

    The head is this test's own: free ports and its own temp dir (``RAY_HEAD_OPTIONS``), on 127.0.0.1, its token
    in a temporary HOME (never the machine's ~/.ray, which other runs share), stopped through the process group of
    the script, which this test started.
    """
    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"run_dir={run_dir}"])
    write_synthetic_store(cfg, 4)
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "home"
    home.mkdir()
    # Every port of this head is a free one: other Rays on the machine hold the defaults (the job agent's
    # 52365 above all: without it the job server answers "No available agent").
    port, dash, agent, agent_grpc, metrics, runtime_env, client = (_free_port() for _ in range(7))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head_options = (
        f"--num-cpus=2 --port={port} --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 "
        f"--dashboard-port={dash} --dashboard-agent-listen-port={agent} --dashboard-agent-grpc-port={agent_grpc} "
        f"--metrics-export-port={metrics} --runtime-env-agent-port={runtime_env} --ray-client-server-port={client} "
        f"--temp-dir={temp_dir} --disable-usage-stats")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
           "RAY_HEAD_OPTIONS": head_options, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)  # Ray's defaults, as on a fresh machine
    script = subprocess.Popen(
        ["bash", "deploy/submit_local.sh", "python", "jobs/train.py", "--config", "configs/smoke.yaml",
         f"run_dir={run_dir}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = script.communicate(timeout=420)
        assert script.returncode == 0, out[-3000:]
        assert "succeeded" in out, out[-3000:]
        assert f"trained {cfg.train.steps} steps" in out, out[-3000:]
        # The calm console (mugato_ray.console): the project's progress lines, not Ray Train's per-report ones.
        assert f"train step {cfg.train.steps}/{cfg.train.steps} (100%)" in out, out[-3000:]
        assert "Reporting training result" not in out and "Requesting resources" not in out, out[-3000:]
        assert (home / ".ray" / "auth_token").is_file()  # the token the head and the submission used
        with pytest.raises(urllib.error.HTTPError) as refused:  # the head does authenticate: no token, no entry
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        ckpt = latest_checkpoint(cfg)
        assert read_state(ckpt)["step"] == cfg.train.steps
        assert isinstance(load_model(ckpt / "model.pt"), torch.nn.Module)
    finally:
        script.kill()  # no-op when it has exited
        script.wait()
        _stop_process_group(script.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_every_task_gets_a_dataset_name_ray_data_can_log_under():
    """Ray Data names log files after the dataset: "ALE/Pong-v5" stopped training with FileNotFoundError."""
    from mugato_ray import tasks
    from mugato_ray.train import dataset_name

    names = [dataset_name(t) for t in tasks.TASKS]
    assert all("/" not in n for n in names) and len(set(names)) == len(names)
    assert dataset_name("ALE/Pong-v5") == "ALE_Pong-v5" and dataset_name("CartPole-v1") == "CartPole-v1"
