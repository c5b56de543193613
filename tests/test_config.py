"""Configs are strict: unknown keys, wrong types and missing files name the key and the file."""

from pathlib import Path

import pytest
import yaml

from mugato_ray.config import Config, ConfigError, TrainConfig, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.tasks, f"{path.name} lists no tasks"


def test_smoke_config_exists_and_is_tiny():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "smoke.yaml")
    assert cfg.model.preset == "tiny"


def test_values_and_nested_sections(tmp_path):
    p = write(tmp_path, {"run_dir": "x", "train": {"lr": 1e-3, "steps": 5}, "tasks": [{"name": "CartPole-v1", "weight": 2}]})
    cfg = load_config(p)
    assert cfg.run_dir == "x" and cfg.train.lr == 1e-3 and cfg.train.steps == 5
    assert cfg.tasks[0].name == "CartPole-v1" and cfg.tasks[0].weight == 2.0
    assert cfg.model.context == Config().model.context  # defaults fill the rest


@pytest.mark.parametrize(
    "data, key",
    [
        ({"trian": {"lr": 1}}, "trian"),
        ({"train": {"lrr": 1}}, "train.lrr"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"steps": 1.5}}, "train.steps"),
        ({"train": {"use_gpu": "yes"}}, "train.use_gpu"),
        ({"model": {"preset": "huge"}}, "model.preset"),
        ({"tasks": [{"name": "CartPole-v1", "bogus": 1}]}, "tasks[0].bogus"),
        ({"tasks": {"name": "CartPole-v1"}}, "tasks"),
        ({"tasks": [{}]}, "tasks[0].name"),
        ({"tasks": [{"name": "CartPole-v1"}, {"weight": 2}]}, "tasks[1].name"),
        ({"data": {"prompt_prob": 1.5}}, "data.prompt_prob"),
        ({"model": "tiny"}, "model"),
        ({"tasks": [{"name": "CartPole-v1", "window": 0}]}, "tasks[0].window"),
        ({"tasks": [{"name": "CartPole-v1", "batch_size": 0}]}, "tasks[0].batch_size"),
        ({"tasks": [{"name": "CartPole-v1", "expert_noise": 1.5}]}, "tasks[0].expert_noise"),
        ({"tasks": [{"name": "CartPole-v1", "temperature": -0.5}]}, "tasks[0].temperature"),
        ({"data": {"sources": ["expert", "demos"]}}, "data.sources"),
        ({"data": {"min_return_fraction": 2}}, "data.min_return_fraction"),
        ({"train": {"eval_every": -1}}, "train.eval_every"),
        ({"train": {"grad_balance": "pcgrad"}}, "train.grad_balance"),
        ({"model": {"continuous_target_sigma": -1}}, "model.continuous_target_sigma"),
        ({"rollout": {"actor_gpus": -0.5}}, "rollout.actor_gpus"),
        ({"rollout": {"actor_cpus": 0}}, "rollout.actor_cpus"),
        ({"data": {"tokenize_actor_cpus": 0}}, "data.tokenize_actor_cpus"),
        ({"data": {"one_block_mib": -1}}, "data.one_block_mib"),
    ],
)
def test_bad_keys_and_types_name_key_and_file(tmp_path, data, key):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(p)


def test_dotted_overrides(tmp_path):
    p = write(tmp_path, {"train": {"lr": 1e-3}})
    cfg = load_config(p, ["train.lr=3e-4", "run_dir=/tmp/x", "model.n_layer=3", "tasks=[{name: Pendulum-v1}]"])
    assert cfg.train.lr == 3e-4 and cfg.run_dir == "/tmp/x" and cfg.model.n_layer == 3
    assert [t.name for t in cfg.tasks] == ["Pendulum-v1"]
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(p, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"steps": 7}, "tasks": [{"name": "CartPole-v1"}]}), ["model.context=128"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(path)
    assert again == cfg


def test_ppo_section_defaults_overrides_and_ranges(tmp_path):
    """PPO's knobs are the ppo section: the defaults of the former job flags, overridable as ppo.x=y."""
    ppo = Config().ppo
    assert (ppo.iterations, ppo.target_return, ppo.num_env_runners, ppo.num_envs_per_env_runner) == (50, None, 0, 1)
    assert (ppo.train_batch_size, ppo.minibatch_size, ppo.num_epochs, ppo.lr) == (4000, 128, 10, 3e-4)
    assert (ppo.hidden, ppo.eval_episodes) == ([64, 64], 10)
    cfg = load_config(write(tmp_path, {}), ["ppo.iterations=3", "ppo.lr=1e-3", "ppo.target_return=450"])
    assert (cfg.ppo.iterations, cfg.ppo.lr, cfg.ppo.target_return) == (3, 1e-3, 450.0)
    for key, bad in [("iterations", 0), ("train_batch_size", 0), ("minibatch_size", 0), ("num_epochs", 0),
                     ("num_env_runners", -1), ("num_envs_per_env_runner", 0), ("lr", 0), ("hidden", []),
                     ("eval_episodes", 0)]:
        with pytest.raises(ConfigError, match=f"ppo.{key}' must be"):
            load_config(write(tmp_path, {"ppo": {key: bad}}))


def test_section_seeds_derive_from_the_root_seed(tmp_path):
    """Unset section seeds follow the root seed; an explicit one is kept; the defaults are the old values."""
    default = Config()
    assert (default.seed, default.train.seed, default.rollout.seed, default.ppo.seed) == (0, 0, 0, 0)
    assert load_config(write(tmp_path, {})) == default
    cfg = load_config(write(tmp_path, {"seed": 5}))
    assert (cfg.train.seed, cfg.rollout.seed, cfg.ppo.seed) == (5, 5, 5)
    cfg = load_config(write(tmp_path, {"seed": 5, "rollout": {"seed": 7}}), ["train.seed=0"])
    assert (cfg.train.seed, cfg.rollout.seed, cfg.ppo.seed) == (0, 7, 5)
    assert load_config(write(tmp_path, {}), ["seed=3"]).train.seed == 3  # an override derives too
    # Built directly: the same rule; a shared section object is not changed behind another config's back.
    train = TrainConfig()
    a, b = Config(seed=1, train=train), Config(seed=2, train=train)
    assert (a.train.seed, b.train.seed, train.seed) == (1, 2, None)
    # The saved config holds the resolved seeds, so reloading it reproduces them.
    again = load_config(save_config(cfg, tmp_path / "run"))
    assert (again.train.seed, again.rollout.seed, again.ppo.seed) == (0, 7, 5)


def test_running_interpreter_satisfies_requires_python():
    """pyproject.toml's requires-python holds for the interpreter running the tests, and the Python
    classifiers (if any) name only versions it allows."""
    import sys
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    spec = project["requires-python"]
    assert spec.startswith(">="), f"requires-python {spec!r}: only a lower bound is checked here"
    minimum = tuple(int(p) for p in spec[2:].strip().split("."))
    assert sys.version_info[: len(minimum)] >= minimum, f"Python {sys.version.split()[0]} does not satisfy {spec}"
    for c in project.get("classifiers", []):
        parts = c.split(" :: ")
        if parts[:2] == ["Programming Language", "Python"] and len(parts) == 3 and parts[2].count(".") == 1:
            assert tuple(int(p) for p in parts[2].split(".")) >= minimum, f"classifier {c!r} is below {spec}"


def test_video_episodes_default_and_range(tmp_path):
    assert Config().eval.video_episodes == 0  # no videos unless asked
    assert load_config(write(tmp_path, {}), ["eval.video_episodes=3"]).eval.video_episodes == 3
    with pytest.raises(ConfigError, match="eval.video_episodes' must be non-negative"):
        load_config(write(tmp_path, {"eval": {"video_episodes": -1}}))
    with pytest.raises(ConfigError, match="eval.video_episodes"):
        load_config(write(tmp_path, {}), ["eval.video_episodes=two"])
