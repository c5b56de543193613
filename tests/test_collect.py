"""Parallel collection into the store, through Ray actors; the shared job command line; the collect job."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import ray

from mugato_ray import tasks
from mugato_ray.cli import parse_job_args
from mugato_ray.collect import chunk_seeds, collect
from mugato_ray.config import config_from_dict
from mugato_ray.episodes import read_episodes, store_dir
from mugato_ray.resolve import resolve_task
from mugato_ray.rollout import FaultInjection, PolicySpec, actor_count, run_on_pool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def make_cfg(tmp_path, tasks, **rollout):
    return config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "rollout": {"num_actors": 2, "envs_per_actor": 2, "actor_cpus": 0.5, "max_episode_steps": 40, **rollout},
        "tasks": tasks,
    })


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_chunks_cover_the_seeds_once():
    cfg = config_from_dict({"rollout": {"num_actors": 3, "envs_per_actor": 2, "seed": 100},
                            "tasks": [{"name": "CartPole-v1", "episodes": 50}]})
    chunks = chunk_seeds(cfg, cfg.tasks[0])
    assert [s for c in chunks for s in c] == list(range(100, 150))
    assert max(len(c) for c in chunks) == 2 * 4  # envs_per_actor * CHUNK_ENVS
    small = config_from_dict({"rollout": {"num_actors": 2}, "tasks": [{"name": "CartPole-v1", "episodes": 4}]})
    assert len(chunk_seeds(small, small.tasks[0])) == 2  # every actor gets work


@pytest.fixture
def references(monkeypatch):
    """Fixed reference returns, so the filter tests do not depend on measured numbers."""
    table = {"CartPole-v1": (500.0, 20.0), "Pendulum-v1": (-150.0, -1200.0)}
    monkeypatch.setattr(tasks, "reference_returns", lambda task: table.get(tasks.get_task(task).name, (None, None)))
    return table


def test_gato_threshold_is_relative_to_random(references):
    cfg = config_from_dict({"data": {"min_return_fraction": 0.8}})
    expert, random = references["Pendulum-v1"]
    threshold = resolve_task("Pendulum-v1", cfg).min_return(0.8)
    assert random < threshold < expert  # f * expert would exceed the (negative) expert return
    assert threshold == pytest.approx(random + 0.8 * (expert - random))
    assert resolve_task("CartPole-v1", cfg).min_return(0.0) is None  # fraction 0: no filter
    assert resolve_task("Acrobot-v1", cfg).min_return(0.8) is None  # no expert reference: nothing to filter against


def test_two_actors_collect_every_episode(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, [{"name": "CartPole-v1", "episodes": 6}, {"name": "text-arith", "episodes": 3}])
    lines = []
    out = collect(cfg, log=lines.append)
    s = out["CartPole-v1"]
    assert (s.requested, s.kept, s.filtered, s.failed) == (6, 6, 0, 0)
    assert s.env_steps == 6 * 40 and s.mean_return == 40.0
    store = store_dir(cfg, "CartPole-v1")
    chunks = chunk_seeds(cfg, cfg.tasks[0])
    assert len(files_in(store)) == len(chunks) and s.files == sorted(str(store / f) for f in files_in(store))
    eps = read_episodes(store)
    assert sorted(ep.episode_id for ep in eps) == sorted(f"CartPole-v1-expert-{i}" for i in range(6))
    progress = [line for line in lines if line.startswith("collect CartPole-v1:")]
    assert len(progress) == len(chunks) and progress[-1].startswith("collect CartPole-v1: 6/6 episodes")
    assert out["text-arith"].kept == 3 and len(read_episodes(store_dir(cfg, "text-arith"))) == 3

    with pytest.raises(FileExistsError, match="already holds"):
        collect(cfg, log=lines.append)
    again = collect(cfg, resume=True, log=lines.append)  # nothing is run twice
    assert again["CartPole-v1"].kept == 6 and again["CartPole-v1"].env_steps == 0
    assert len(read_episodes(store)) == 6


def test_resume_with_another_pool_size_collects_each_episode_once(ray_local, tmp_path):
    """Episode identity is (task, source, seed): chunk files named by another pool split are still found."""
    tasks_ = [{"name": "CartPole-v1", "episodes": 6}, {"name": "text-arith", "episodes": 3}]
    collect(make_cfg(tmp_path, tasks_, num_actors=2), log=lambda _: None)
    more = [{"name": "CartPole-v1", "episodes": 9}, {"name": "text-arith", "episodes": 5}]
    bigger = make_cfg(tmp_path, more, num_actors=1, envs_per_actor=3)
    with pytest.raises(FileExistsError, match="6 of these episodes"):
        collect(bigger, log=lambda _: None)
    out = collect(bigger, resume=True, log=lambda _: None)
    assert out["CartPole-v1"].kept == 9 and out["CartPole-v1"].env_steps == 3 * 40  # only seeds 6..8 ran
    ids = [ep.episode_id for ep in read_episodes(store_dir(bigger, "CartPole-v1"))]
    assert sorted(ids) == sorted(f"CartPole-v1-expert-{i}" for i in range(9))
    text = [ep.episode_id for ep in read_episodes(store_dir(bigger, "text-arith"))]
    assert out["text-arith"].kept == 5 and sorted(text) == sorted(f"text-arith-s{i}" for i in range(5))
    again = collect(make_cfg(tmp_path, tasks_, num_actors=2), resume=True, log=lambda _: None)
    assert again["CartPole-v1"].env_steps == 0 and len(read_episodes(store_dir(bigger, "CartPole-v1"))) == 9


def test_dead_actor_run_completes_without_partial_files(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, [{"name": "CartPole-v1", "episodes": 8}])
    marker = tmp_path / "exited"
    s = collect(cfg, faults=FaultInjection(exit_seed=5, exit_marker=str(marker)), log=lambda _: None)["CartPole-v1"]
    assert marker.exists() and s.kept == 8 and s.failed == 0
    store = store_dir(cfg, "CartPole-v1")
    assert all(not name.startswith(".") for name in files_in(store))
    assert sorted(ep.seed for ep in read_episodes(store)) == list(range(8))  # each seed exactly once


def test_gato_filter_in_collection(ray_local, tmp_path, references):
    """Random play on CartPole stays far below the expert reference: every episode is filtered out."""
    cfg = make_cfg(tmp_path, [{"name": "CartPole-v1", "episodes": 4}], max_episode_steps=None, num_actors=1)
    cfg.data.min_return_fraction = 0.5
    s = collect(cfg, PolicySpec("random"), source="expert", log=lambda _: None)["CartPole-v1"]
    assert (s.kept, s.filtered) == (0, 4) and s.files == [] and s.mean_return is None
    assert not store_dir(cfg, "CartPole-v1").exists()
    online = collect(cfg, PolicySpec("random"), source="random", log=lambda _: None)["CartPole-v1"]
    assert (online.kept, online.filtered) == (4, 0)  # the filter applies to expert data only


def test_actor_count_fits_the_cluster(ray_local, tmp_path):
    assert actor_count(make_cfg(tmp_path, [], actor_cpus=0.5), 8, log=lambda _: None) == 4
    assert actor_count(make_cfg(tmp_path, [], actor_cpus=1.5), 2, log=lambda _: None) == 1
    with pytest.raises(ValueError, match="actor_cpus"):
        actor_count(make_cfg(tmp_path, [], actor_cpus=3.0), 1)


def test_pool_raises_a_failed_call_unless_told_otherwise(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, [], num_actors=1)
    got = []
    with pytest.raises(ValueError, match="distinct"):  # a bug in a call is not swallowed
        run_on_pool("CartPole-v1", PolicySpec("expert"), cfg, [[1, 1]], lambda c, r: got.append(c))
    run_on_pool("CartPole-v1", PolicySpec("expert"), cfg, [[1, 1], [2, 3]], lambda c, r: got.append(c),
                on_error=lambda c, e: got.append(("error", c)))
    assert sorted(map(str, got)) == sorted(map(str, [("error", [1, 1]), [2, 3]]))


def test_parse_job_args(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {tmp_path / 'x'}\nrollout: {{num_actors: 3}}\ntasks: [{{name: CartPole-v1}}]\n")
    resume = {"add_args": lambda p: p.add_argument("--resume", action="store_true")}
    cfg, args = parse_job_args(["--config", str(path), "rollout.seed=7", f"run_dir={tmp_path / 'y'}"], "d", **resume)
    assert (cfg.rollout.num_actors, cfg.rollout.seed, cfg.run_dir, args.resume) == (3, 7, str(tmp_path / "y"), False)
    # Overrides anywhere: after the job's own flags too.
    cfg, args = parse_job_args(["--resume", "rollout.seed=8", "--config", str(path), "eval.episodes=3"], "d", **resume)
    assert (cfg.rollout.seed, cfg.eval.episodes, args.resume) == (8, 3, True)
    with pytest.raises(SystemExit):
        parse_job_args(["--config", str(path), "rollout.nope=1"], "d")


def test_every_problem_is_reported_before_anything_starts(tmp_path, capsys):
    run_file = tmp_path / "a-file"
    run_file.write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {run_file}\ntasks: [{{name: CartPol-v1}}, {{name: Pendulum-v1}}]\n")
    with pytest.raises(SystemExit) as e:
        parse_job_args(["--config", str(path)], "d")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "2 problem(s)" in err
    assert "tasks[0].name: unknown task 'CartPol-v1'" in err and "CartPole-v1" in err  # a suggestion
    assert f"run_dir: {run_file} exists and is not a directory" in err
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "Pendulum-v1").write_text("")
    path.write_text(f"run_dir: {run_dir}\ntasks: [{{name: Pendulum-v1}}]\n")
    with pytest.raises(SystemExit):
        parse_job_args(["--config", str(path)], "d")
    assert "its store" in capsys.readouterr().err and not (run_dir / "config.yaml").exists()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        parse_job_args(["--config", str(empty)], "d")
    assert e.value.code == 2 and "'tasks' is empty" in capsys.readouterr().err


def test_collect_job_smoke(ray_local, tmp_path, capsys):
    """The job end to end, in this process (init_ray joins the running Ray instead of starting one)."""
    job = runpy.run_path(str(ROOT / "jobs" / "collect.py"), run_name="collect_job")
    run = tmp_path / "run"
    job["main"](["--config", str(ROOT / "configs" / "smoke.yaml"), f"run_dir={run}",
                 "tasks=[{name: CartPole-v1, episodes: 3}]", "rollout.num_actors=1", "--policy", "random"])
    assert (run / "config.yaml").exists()
    eps = read_episodes(run / "data" / "CartPole-v1")
    assert sorted(ep.episode_id for ep in eps) == [f"CartPole-v1-random-{i}" for i in range(3)]
    assert "CartPole-v1" in capsys.readouterr().out.splitlines()[-1]


def test_chunk_that_always_kills_its_actor_is_given_up(ray_local, tmp_path):
    """A seed that crashes the process on every retry costs its chunk only; collection goes on."""
    cfg = make_cfg(tmp_path, [{"name": "CartPole-v1", "episodes": 8}])
    s = collect(cfg, faults=FaultInjection(exit_seed=5), log=lambda _: None)["CartPole-v1"]
    bad = next(c for c in chunk_seeds(cfg, cfg.tasks[0]) if 5 in c)
    assert s.failed == len(bad) and s.kept == 8 - len(bad) and "actor died" in s.errors[0]
    kept = sorted(ep.seed for ep in read_episodes(store_dir(cfg, "CartPole-v1")))
    assert kept == sorted(set(range(8)) - set(bad))


def test_sigterm_shuts_the_local_ray_down(tmp_path):
    """A job's local Ray leaves no process behind when the job gets SIGTERM (as from a scheduler)."""
    import signal
    import subprocess
    import sys
    import time

    code = ("from mugato_ray.cli import init_ray; import ray, time; init_ray(); "
            "print(ray.get_runtime_context().gcs_address, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    gcs = proc.stdout.readline().strip()
    assert gcs, "the child did not start Ray"

    def ray_processes() -> list[str]:
        out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if gcs in line]

    assert ray_processes()  # its raylet and friends name the GCS address
    proc.send_signal(signal.SIGTERM)
    # Ray's driver handler: sys.exit(15), so atexit hooks run. On a machine loaded far past its cores (load
    # average 20 on 2 cores) Ray's core worker was seen to abort (-6) in that shutdown, with or without this
    # project's process watcher; either way the job ends and what it started must be gone.
    assert proc.wait(timeout=60) in (signal.SIGTERM, -signal.SIGABRT)
    deadline = time.time() + 30
    while ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert ray_processes() == []


def test_a_sigkilled_job_leaves_no_ray_process_behind(tmp_path):
    """SIGKILL runs no handler; the watcher that init_ray starts stops what the job's Ray left running
    (without it, Ray's agents and workers outlive the driver by about 90 s)."""
    import subprocess
    import sys
    import time

    import psutil

    code = ("from mugato_ray.cli import init_ray; import ray, time; init_ray(); "
            "a = ray.remote(lambda: 1).remote(); ray.get(a); print('ready', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    driver = psutil.Process(proc.pid)
    deadline = time.time() + 30
    while True:  # the agents start with the raylet; wait until they are there
        tree = driver.children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        if ("DashboardAgent" in names and "RuntimeEnvAgent" in names) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert "mugato_ray.reaper" in names and "raylet" in names and "DashboardAgent" in names, names
    time.sleep(1.5)  # one poll of the watcher after the last process started

    def running() -> list[str]:
        return [" ".join(p.cmdline())[:80] for p in tree
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    proc.kill()
    proc.wait(timeout=10)
    deadline = time.time() + 20
    while running() and time.time() < deadline:
        time.sleep(0.5)
    assert running() == []


def test_a_jobs_ray_processes_look_up_their_own_cluster_when_another_ray_runs(tmp_path):
    """A job run while a `ray start` cluster runs on the machine (as README "On a cluster" has users do): Ray
    Train's placement-group cleaner asks the State API whether its controller lives, from a Ray worker that
    finds "the" cluster on its own, which is the one `ray start` last recorded, not its own. It saw its
    controller missing there and removed the job's training workers. The recorded address is simulated in
    the probe (the machine's own record is left alone); the other Ray is real."""
    import subprocess
    import sys

    job = ("from mugato_ray.cli import init_ray; import ray, sys; init_ray()\n"
           "@ray.remote\nclass Probe:\n"
           "    def state(self, recorded):\n"
           "        import ray._private.services as services\n"
           "        from ray.util.state import get_actor\n"
           "        services.find_bootstrap_address = lambda temp_dir: recorded  # what `ray start` records\n"
           "        a = get_actor(ray.get_runtime_context().get_actor_id(), timeout=30)\n"
           "        return a.state if a is not None else 'not found'\n"
           "p = Probe.remote(); print('ready', flush=True)\n"
           "print('state', ray.get(p.state.remote(sys.stdin.readline().strip())), flush=True)\n")
    other = ("import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=True); "
             "print(ray.get_runtime_context().gcs_address, flush=True); time.sleep(120)")
    first = subprocess.Popen([sys.executable, "-c", job], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    second = None
    try:
        assert first.stdout.readline().strip() == "ready"
        second = subprocess.Popen([sys.executable, "-c", other], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        first.stdin.write(second.stdout.readline())
        first.stdin.flush()
        assert first.stdout.readline().strip() == "state ALIVE"
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
