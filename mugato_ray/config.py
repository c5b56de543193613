"""Typed experiment configuration.

Every knob lives in a YAML file under ``configs/``; the code holds the defaults. A config is a tree of
dataclasses, one section per concern, and each component receives only its own section.

``load_config(path, overrides)`` is strict: an unknown key, a value of the wrong type or a missing file
raises ``ConfigError`` naming the key and the file. Overrides are dotted ``key=value`` strings whose value
is parsed as YAML (``train.lr=3e-4``, ``run_dir=/tmp/x``, ``tasks.names=[CartPole-v1]``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

LoggerName = Literal["csv", "tensorboard", "wandb"]
"""A metric writer of ``train.loggers`` (see mugato_ray.metric_log)."""
ContinuousActions = Literal["mean", "argmax"]
"""How a greedy model policy picks a continuous action's value bin (``rollout.continuous_actions``)."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the key."""


@dataclass
class TokenizerConfig:
    """How raw observations, actions and text become ids (GATO section 2.1)."""

    text: Literal["byte", "bpe"] = "byte"
    """Text tokenizer: "byte" (256 ids, offline, exact) or "bpe" (a byte-level BPE trained locally)."""
    bpe_path: str | None = None
    """tokenizer.json of a locally trained BPE; only read when text="bpe"."""
    value_bins: int = 1024
    """Uniform bins on [-1, 1] for continuous values; also the id range of discrete values."""
    mu: float = 100.0
    """mu-law companding parameter mu."""
    M: float = 256.0
    """mu-law companding parameter M."""
    patch_size: int = 16
    """Side of the square, non-overlapping image patches."""
    max_text_tokens: int = 64
    """Tokens per step of a text observation (e.g. a BabyAI mission); longer strings are truncated."""


@dataclass
class ModelConfig:
    """The causal transformer. A preset fills the sizes; explicit values override it."""

    preset: Literal["tiny", "small", "gato-79m", "gato-364m", "gato-1.18b"] = "tiny"
    """Size preset: tiny (tests), small (CPU demo) or one of GATO's sizes."""
    n_layer: int | None = None
    """Transformer blocks (None: from the preset)."""
    n_embd: int | None = None
    """Model width D (None: from the preset)."""
    n_head: int | None = None
    """Attention heads (None: from the preset)."""
    d_ff: int | None = None
    """Feed-forward width (None: from the preset)."""
    context: int = 1024
    """Tokens in one training sequence and in the acting window (GATO: L=1024)."""
    dropout: float = 0.0
    """Dropout on attention and residual branches."""
    patch_position_bins: int = 128
    """Quantization of normalized patch row/column intervals for patch position encodings."""
    value_order: bool = True
    """Value-id embeddings (and so the tied head's logits) get a learned function of the bin centre."""
    continuous_target_sigma: float = 10.0
    """HL-Gauss: a continuous action's target is a Gaussian over value bins with this std in bins (0: one-hot)."""
    rotary: bool = False
    """Rotary position encoding (RoPE, Su et al. 2021) of each token's position within its timestep, applied to
    queries and keys in attention on top of the learned encodings: attention scores then depend on the
    relative offset of two tokens of a field (a text document, a mission), not only on learned absolute
    positions. Keys are cached rotated, so cached acting stays exact."""
    token_shift: bool = False
    """Each token's input also gets a learned linear map (D x D) of the input embedding of the previous valid
    token of its timestep (none for a timestep's first token), before the first block. A copy or induction
    circuit then needs one attention layer instead of two: attention can match a token and read the one
    before it. Text-arith (a copy task in reverse) gives exact answers after fewer steps with it
    (bench/README.md, "text-arith"). Cached acting keeps each row's last token, so it stays exact."""
    pack: bool = True
    """Training packs the real tokens of a batch's rows into as few rows as they fit, attention kept within
    each source row (mugato_ray.packing): exact, and pads cost no compute."""


@dataclass
class TaskEntry:
    """One task of the mixture."""

    name: str
    """A task name from the registry (mugato_ray.tasks)."""
    weight: float = 1.0
    """Relative sampling weight in the training mixture."""
    lr_scale: float = 1.0
    """This task's learning rate as a multiple of train.lr, with train.task_moments (each task then steps in its
    own Adam geometry, so its rate is its own; without per-task moments the tasks share one step and this must
    stay 1). A task that learns fast and early can step smaller, so it disturbs the weights it shares less."""
    episodes: int = 10
    """Episodes to collect for the store."""
    expert_noise: float = 0.0
    """DART (Laskey et al., 2017): while the expert collects, the env executes its action perturbed (Gaussian
    noise of this std times a Box action's half-range; a random Discrete action with this probability) and
    the episode records the expert's own action. Demonstrations then cover the states a slightly wrong
    policy reaches, where plain behaviour cloning has no labels and compounds its errors."""
    batch_size: int | None = None
    """Rows per micro-batch of this task (None: data.batch_size); short windows want more rows."""
    window: int | None = None
    """Timesteps in a training window and in the acting history (None: as many as model.context holds).
    A Markov task needs little history; a short window spends no compute on stale steps."""
    start_step: int = 0
    """The optimizer step at which this task joins the training mixture (0: from the start). A curriculum:
    a task that must learn something the other tasks' updates disturb (the suite's text-arith learns to add
    alone, not among ten other tasks) can learn it first, the others joining later. Before its step a task
    takes no micro-batches and is not counted in the step's ``M`` (``train.grad_accum`` 0); with
    ``train.task_moments`` a joining task's rate warms up linearly over ``train.warmup_steps`` from its step,
    as the run's did from step 0, so fresh Adam moments do not take full-size steps on the weights the
    tasks already training share. Evaluation and snapshot selection see every task throughout."""
    temperature: float | None = None
    """Sampling temperature of the model policy on this task (None: rollout.temperature), wherever a model
    acts on it: evaluation, snapshot selection, online rollouts, collection. A greedy policy repeats its
    action while the observation stays the same (BabyAI: walking into an object it did not see, until the
    step limit); sampling leaves such loops. Continuous actions decode best greedily (bench/README.md,
    "Learning")."""


@dataclass
class DataConfig:
    """Ray Data: reading the store, tokenizing, windowing and padding."""

    batch_size: int = 8
    """Sequences per micro-batch (each micro-batch holds one task)."""
    num_tokenize_actors: int = 1
    """Size of the tokenize/pad actor pool per task dataset (0: from the cluster's free CPUs)."""
    tokenize_actor_cpus: float = 0.5
    """CPUs reserved by each tokenize actor."""
    one_block_mib: float = 64.0
    """A task's store of at most this many MiB on disk is read as one block: every tokenize-actor call sees
    all its episodes, and one pass of windows lasts the whole run, so the trainer never waits for a pass to
    restart (seconds each). Bigger stores: one block per file (0: one block per file always)."""
    preserve_order: bool = True
    """Blocks reach training in the order the store lists them, whichever tokenize actor finishes first, and
    train workers split them by that order: a seed then repeats a run with several store files, tokenize
    actors and train workers (with one block per task and one worker the order is fixed anyway). Off, Ray
    Data hands on whichever block is ready first and may keep blocks on the worker's node (its default);
    the cost of waiting for order: bench/README.md, "Training"."""
    prompt_prob: float = 0.25
    """Fraction of sequences that get a prompt (a demonstration from the same task), as in GATO."""
    prompt_end_fraction: float = 0.5
    """Of prompted sequences, the fraction whose prompt is taken from an episode's end (the rest: uniform)."""
    min_return_fraction: float = 0.0
    """GATO's filter: collection keeps, and training reads, only expert (and policy) episodes whose return is
    at least this fraction of the way from the random to the expert reference (0: no filter)."""
    sources: list[str] = field(default_factory=lambda: ["expert", "dagger"])
    """Episode sources (the store's ``source`` column) that training reads: expert, dagger, policy, random.
    Random and policy episodes are never mixed into the demonstrations unless listed here."""
    text_folder: str | None = None
    """Folder of .txt/.jsonl files for the text_files dataset (None: the samples shipped with the package)."""
    on_bad_file: Literal["error", "skip"] = "error"
    """A store file that is not readable Parquet, or lacks the store's columns for its task, or a row that
    does not validate: stop before training starts, naming every one and why (error), or leave it out and
    say so in the log and the report (skip). See ``mugato_ray.store_check``."""
    check_rows: bool = True
    """Validate every row of the store before training (a full read of the store). Off: only footers and
    columns are checked, and a bad row stops training when it is read, named."""
    store_root: str | None = None
    """Folder that holds the episode store's task folders (None: <run_dir>/data). A sweep's trials point it at
    the base run's store, which they read and never write (mugato_ray.sweep)."""


@dataclass
class TrainConfig:
    """Ray Train TorchTrainer and the optimization loop."""

    steps: int = 100
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    grad_accum: int = 0
    """Micro-batches per optimizer step (0: one per task, so every step mixes all tasks)."""
    grad_balance: Literal["none", "norm"] = "none"
    """How the micro-batches' gradients are combined: none (their sum, each loss weighted 1/M), norm (each
    micro-batch's gradient scaled to the mean of their norms, so no task's gradient dominates the shared
    weights; see mugato_ray.learner)."""
    task_moments: bool = False
    """Keep AdamW's moments per task: each task's gradient is normalized by its own running size and the step
    is the sum of the tasks' Adam directions, so each task steps at lr (times its tasks[].lr_scale) as it would
    alone, however small its gradient beside the others' (mugato_ray.task_moments). Each task's gradient is
    clipped to grad_clip on its own. Costs two moments per parameter per task."""
    ema_decay: float = 0.0
    """0: off. Otherwise the run acts with an exponential moving average of its weights over about
    1 / (1 - ema_decay) steps (0.99: the last 100): snapshots and checkpoints' model.pt hold the average, the
    training weights go into state.pt (mugato_ray.weight_average)."""
    num_workers: int = 1
    """Ray Train workers (0: run the loop in the driver)."""
    cpus_per_worker: float = 0.0
    """CPUs per train worker (0: sized from the cluster so Ray Data keeps CPUs; see mugato_ray.resources)."""
    torch_threads: int = 0
    """Intra-op threads of each train worker's torch (0: the worker's reserved CPUs, at least 1). Logical
    reservations are not cores: on a 2-core laptop, 2 threads train faster while data actors sit idle."""
    use_gpu: bool = False
    """Train on GPUs (NCCL; bf16 autocast unless train.precision is fp32)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Matrix products of the training step (autocast; weights, optimizer state and the loss stay fp32): auto
    (bf16 on a GPU, fp32 on a CPU), bf16 (also on a CPU, where that CPU multiplies bf16 matrices faster than
    fp32 ones, measured once per process, else fp32 with a warning; the attention product stays fp32 on a CPU),
    fp32 (everywhere). Acting and evaluation are fp32 on a CPU either way (mugato_ray.learner.training_autocast)."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept by Ray Train."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from by restarting the workers from the newest verified
    checkpoint (-1: without limit). A deterministic error (a bug, a bad input) is then raised after as many
    retries, naming this key."""
    storage_path: str | None = None
    """Where Ray Train stores checkpoints (None: <run_dir>/checkpoints); use shared storage on a cluster."""
    log_every: int = 10
    """Steps between reported metrics."""
    loggers: list[LoggerName] = field(default_factory=lambda: ["csv", "tensorboard"])
    """Metric writers of training and evaluation reports, under <run_dir>/metrics/ (mugato_ray.metric_log): csv
    (train.csv, eval.csv), tensorboard (tb/<stream>/ event files), wandb (offline runs; needs the wandb package)."""
    eval_every: int = 0
    """Steps between evaluations of the current weights while training goes on (0: none); the main job
    then evaluates the snapshot with the best IQM, or the latest within select_margin of it (see
    mugato_ray.train_eval)."""
    eval_episodes: int = 4
    """Episodes per task of each evaluation during training, on the validation seeds."""
    select_margin: float = 0.0
    """Which snapshot the main job evaluates: the latest whose validation IQM is within this of the best
    (0: the best, the latest of equals). A few validation episodes per task make IQMs noisy, and a later
    snapshot has trained longer: an earlier one is chosen only when it leads by more than the margin."""
    seed: int | None = None
    """Seed of the training loop (None: the top-level ``seed``; see :func:`resolve_seeds`)."""


@dataclass
class RolloutConfig:
    """Rollout actors: collection, online experience and evaluation share them."""

    num_actors: int = 2
    """Rollout actors in the pool."""
    envs_per_actor: int = 4
    """Vectorized environments per actor."""
    actor_cpus: float = 0.5
    """CPUs reserved by each rollout actor."""
    actor_gpus: float = 0.0
    """GPUs reserved by each rollout actor that runs the model (evaluation, online experience); the policy
    acts on the GPU when Ray gives it one. Expert and random collection reserve none."""
    max_episode_steps: int | None = None
    """Step limit per episode (None: the task's own limit)."""
    temperature: float = 0.0
    """Sampling temperature of the model policy (0: greedy)."""
    continuous_actions: ContinuousActions = "mean"
    """How a greedy model policy (temperature 0) picks a continuous action's value bin: "mean", the bin
    nearest the expected value of its distribution; "argmax", the most likely bin (mugato_ray.policy)."""
    seed: int | None = None
    """Base seed; episode seeds are derived deterministically from it (None: the top-level ``seed``; see
    :func:`resolve_seeds`)."""


@dataclass
class EvalConfig:
    """Evaluation at scale."""

    episodes: int = 10
    """Episodes per task."""
    seed_offset: int = 1_000_000
    """Evaluation seeds start here, disjoint from collection seeds."""
    validation_seed_offset: int = 2_000_000
    """Seeds of the evaluations during training (snapshot selection) start here, disjoint from both."""
    prompt: bool = False
    """Prompt the model with a successful expert demonstration (GATO's prompt conditioning)."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples for 95% confidence intervals."""
    video_episodes: int = 0
    """Record the first K evaluation episodes (the K lowest seeds) of each environment task as videos under
    ``<run_dir>/eval/videos/<task>/``, linked from eval.md; text and VQA tasks show their first K items' prompt,
    answer and reference there instead (0: no videos, and 5 items)."""


@dataclass
class PPOConfig:
    """RLlib PPO experts (new API stack), trained by jobs/train_expert.py (see mugato_ray.experts)."""

    iterations: int = 50
    """PPO training iterations."""
    target_return: float | None = None
    """Stop once the sampled mean return reaches it (None: run every iteration)."""
    num_env_runners: int = 0
    """Remote RLlib env runners (0: sample in the driver)."""
    num_envs_per_env_runner: int = 1
    """Vectorized envs per env runner."""
    train_batch_size: int = 4000
    """Env steps per iteration."""
    minibatch_size: int = 128
    """SGD minibatch size."""
    num_epochs: int = 10
    """SGD passes over each iteration's batch."""
    lr: float = 3e-4
    """Learning rate."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the policy and value MLPs."""
    eval_episodes: int = 10
    """Greedy episodes that score the saved expert (on evaluation seeds, ``eval.seed_offset + i``)."""
    seed: int | None = None
    """RLlib's seed (None: the top-level ``seed``; see :func:`resolve_seeds`)."""


@dataclass
class OnlineConfig:
    """Online experience: rollout actors run the current policy while training goes on (mugato_ray.online)."""

    enabled: bool = False
    """Run the online loop beside training (jobs/main.py and jobs/train.py; jobs/online.py sets it)."""
    mode: Literal["dagger", "self_imitation"] = "dagger"
    """dagger: the task's expert labels every state the policy visits (source=dagger); self_imitation: the
    policy's own episodes whose return reaches ``min_return_fraction`` are kept (source=policy)."""
    num_actors: int = 1
    """Online rollout actors (one task each at a time), planned beside training workers and tokenize actors."""
    actor_cpus: float = 0.25
    """CPUs reserved by each online actor."""
    actor_gpus: float = 0.0
    """GPUs reserved by each online actor (a fraction shares one); the model acts on the GPU when Ray gives
    the actor one."""
    envs_per_actor: int = 4
    """Environments each online actor steps in lockstep."""
    episodes_per_round: int = 8
    """Episodes of one task an actor runs with one set of weights before it checks for newer ones."""
    publish_every: int = 50
    """Rank 0 publishes its weights to the actors every this many optimizer steps (and at step 0)."""
    beta: float = 0.5
    """DAgger: probability that a whole episode is driven by the expert instead of the policy, in round 0."""
    beta_decay: float = 0.5
    """DAgger: beta is multiplied by this at every publish (round r drives with beta * decay**r)."""
    fraction: float = 0.5
    """Share of each task's training episodes drawn from online data once it exists (the rest: the
    demonstrations); online episodes are resampled at each pass to reach it."""
    keep_episodes: int = 400
    """Retention: online episodes kept per task; the oldest files go first once a task has more."""
    min_return_fraction: float = 0.5
    """Self-imitation: keep a policy episode when its return is at least this far from the random to the
    expert reference (as ``data.min_return_fraction``; 0 when the task has no expert reference)."""
    seed_offset: int = 3_000_000
    """Online episode seeds start here, disjoint from collection and evaluation seeds."""


SweepDistribution = Literal["choice", "grid", "uniform", "loguniform"]
"""How a swept key's values are drawn: one of a list (choice), every one of a list (grid: each sample runs them
all), or a number between two bounds (uniform, loguniform; loguniform needs positive bounds)."""


@dataclass
class SweepConfig:
    """Hyperparameter sweeps with Ray Tune (jobs/sweep.py, mugato_ray.sweep); no other job reads it."""

    space: dict[str, dict[SweepDistribution, list[Any]]] = field(default_factory=dict)
    """Dotted config key -> one distribution, e.g. ``train.lr: {loguniform: [1.0e-4, 3.0e-3]}``,
    ``model.n_embd: {choice: [64, 128]}``. Keys are those a ``key=value`` override accepts; every value is
    checked through that override path before Tune starts."""
    num_samples: int = 1
    """Samples drawn from the space (a grid key multiplies them by its number of values)."""
    max_concurrent_trials: int = 1
    """Trials run at once; each gets 1/max_concurrent_trials of the cluster (mugato_ray.resources.plan_trial)."""
    metric: Literal["iqm", "validation_iqm"] = "iqm"
    """What ranks the trials (higher is better): iqm, the IQM of the normalized scores of each trial's final
    evaluation (eval.episodes per task); validation_iqm, the best IQM of its snapshots scored during training
    (needs train.eval_every)."""
    scheduler: Literal["none", "asha"] = "none"
    """asha: stop trials whose validation IQM lags at a snapshot step (needs train.eval_every); none: run every
    trial to its end."""
    grace_steps: int = 0
    """ASHA: training steps before a trial may be stopped (0: train.eval_every)."""


@dataclass
class Config:
    """A whole experiment. Every job writes under run_dir."""

    run_dir: str = "runs/default"
    """Output directory: config.yaml, data/, checkpoints/, eval/."""
    seed: int = 0
    """Root seed: every section seed left unset (``train.seed``, ``rollout.seed``, ``ppo.seed``) is derived
    from it by :func:`resolve_seeds`."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tasks: list[TaskEntry] = field(default_factory=list)
    """The task mixture."""

    def __post_init__(self) -> None:
        resolve_seeds(self)

    def task(self, name: str) -> TaskEntry | None:
        """The entry of task ``name`` in ``tasks`` (None when the config does not list it)."""
        return next((t for t in self.tasks if t.name == name), None)

    def task_temperature(self, name: str, default: float | None = None) -> float:
        """The sampling temperature a model acts with on task ``name``: its ``tasks[].temperature`` when set,
        else ``default`` (the acting policy's own), else ``rollout.temperature``."""
        entry = self.task(name)
        if entry is not None and entry.temperature is not None:
            return entry.temperature
        return self.rollout.temperature if default is None else default

    def store_root(self) -> Path:
        """The folder of the task stores: ``data.store_root``, else ``<run_dir>/data``."""
        return Path(self.data.store_root) if self.data.store_root else Path(self.run_dir) / "data"


SECTION_SEEDS = ("train", "rollout", "ppo")
"""Sections whose ``seed`` defaults to the root ``seed``."""


def resolve_seeds(cfg: Config) -> None:
    """Fill every section seed left unset (None) from the root ``cfg.seed``; an explicit one is kept.

    The derivation is the identity, ``<section>.seed = seed``, so the default config (``seed: 0``) keeps
    the seeds every section had before they were derived (all 0), and changing only ``seed`` moves them
    all. The sections still draw separate streams: each mixes its seed with its own counters (training
    with the step and rank, collection adds the episode index). Evaluation seeds (``eval.seed_offset``,
    ``eval.validation_seed_offset``) are not derived: every run is scored on the same held-out episodes.

    Runs when a Config is constructed (so after overrides); a section is replaced, never mutated, so a
    section object shared between configs keeps its own value. A saved config.yaml holds the resolved
    values, so reloading it reproduces them.
    """
    for name in SECTION_SEEDS:
        section = getattr(cfg, name)
        if section.seed is None:
            setattr(cfg, name, dataclasses.replace(section, seed=cfg.seed))


# ---------------------------------------------------------------------------------------------
# Strict construction from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: key '{key}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' expects a mapping ({tp.__name__}), got {value!r}")
        return _build(tp, value, key, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' expects a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {_convert(k, k_tp, key, where): _convert(v, v_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp in (float, int, bool, str):
        return _convert_scalar(value, tp, key, where)
    raise ConfigError(f"{where}: key '{key}' has an unsupported annotation {tp!r}")


def _convert_union(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` as the first member of the union ``tp`` it converts to (None for an optional's None)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key, where)
        except ConfigError:
            pass
    raise ConfigError(f"{where}: key '{key}' expects {_type_name(tp)}, got {value!r}")


def _convert_scalar(value: Any, tp: type, key: str, where: str) -> Any:
    """``value`` checked as a float (an int or a numeric string is converted), int, bool or str."""
    if tp is float:
        # YAML reads "1e-3" as a string and "3" as an int; both are fine for a float field.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' expects a number, got {value!r}")
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, float):
            return value
        raise ConfigError(f"{where}: key '{key}' expects a number, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' expects an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' expects true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' expects a string, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{full}' (known: {sorted(names)})")
        kwargs[k] = _convert(v, hints[k], full, where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        full = ", ".join(f"'{prefix}.{m}'" if prefix else f"'{m}'" for m in missing)
        raise ConfigError(f"{where}: missing required key {full}")
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "<dict>") -> Config:
    """Build a Config from plain data, strictly. ``where`` names the source in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
    cfg = _build(Config, data, "", where)
    validate(cfg, where)
    return cfg


def _set_dotted(data: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or JSON, when the file ends in ``.json``: an export's ``config.json``) strictly and
    apply dotted ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # JSON is read as JSON: YAML 1.1 would read a float such as 1e-05 as a string.
        data = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(data, overrides, str(path))


def apply_overrides(data: dict, overrides: typing.Sequence[str], where: str) -> Config:
    """The Config of plain ``data`` (a config file's content, or ``config_to_dict`` of a Config) with dotted
    ``key=value`` overrides applied, strictly; ``data`` is not modified."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where}: override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: override '{item}': value is not valid YAML: {e}") from e
        _set_dotted(data, key.strip(), value, f"{where} (override '{item}')")
    return config_from_dict(data, where)


_NO_BALANCE = "false when train.grad_balance is set (per-task moments already give each task its own scale)"


def validate(cfg: Config, where: str = "<config>") -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.tokenizer.value_bins >= 2, "tokenizer.value_bins", "at least 2"),
        (cfg.tokenizer.patch_size >= 1, "tokenizer.patch_size", "at least 1"),
        (cfg.tokenizer.max_text_tokens >= 1, "tokenizer.max_text_tokens", "at least 1"),
        (cfg.model.context >= 2, "model.context", "at least 2"),
        (cfg.model.continuous_target_sigma >= 0, "model.continuous_target_sigma", "non-negative"),
        (0.0 <= cfg.data.prompt_prob <= 1.0, "data.prompt_prob", "in [0, 1]"),
        (0.0 <= cfg.data.prompt_end_fraction <= 1.0, "data.prompt_end_fraction", "in [0, 1]"),
        (cfg.data.batch_size >= 1, "data.batch_size", "at least 1"),
        (0.0 <= cfg.data.min_return_fraction <= 1.0, "data.min_return_fraction", "in [0, 1]"),
        (bool(cfg.data.sources) and set(cfg.data.sources) <= {"expert", "dagger", "policy", "random"},
         "data.sources", "a non-empty list of expert, dagger, policy, random"),
        (cfg.train.steps >= 0, "train.steps", "non-negative"),
        (cfg.train.num_workers >= 0, "train.num_workers", "non-negative"),
        (cfg.train.lr > 0, "train.lr", "positive"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every", "at least 1"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "at least 1"),
        (cfg.train.log_every >= 1, "train.log_every", "at least 1"),
        (cfg.train.eval_every >= 0, "train.eval_every", "non-negative"),
        (len(set(cfg.train.loggers)) == len(cfg.train.loggers), "train.loggers",
         f"a list without repeats of {list(typing.get_args(LoggerName))}"),
        (cfg.train.max_failures >= -1, "train.max_failures", "at least -1 (-1: retry without limit)"),
        (cfg.train.torch_threads >= 0, "train.torch_threads", "non-negative"),
        (cfg.train.eval_episodes >= 1, "train.eval_episodes", "at least 1"),
        (cfg.train.select_margin >= 0.0, "train.select_margin", "non-negative"),
        (0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", "in [0, 1) (0: off)"),
        (cfg.train.grad_balance == "none" or not cfg.train.task_moments, "train.task_moments", _NO_BALANCE),
        (cfg.rollout.num_actors >= 1, "rollout.num_actors", "at least 1"),
        (cfg.rollout.envs_per_actor >= 1, "rollout.envs_per_actor", "at least 1"),
        (cfg.rollout.actor_cpus > 0, "rollout.actor_cpus", "positive"),
        (cfg.rollout.actor_gpus >= 0, "rollout.actor_gpus", "non-negative"),
        (cfg.data.tokenize_actor_cpus > 0, "data.tokenize_actor_cpus", "positive"),
        (cfg.data.one_block_mib >= 0, "data.one_block_mib", "non-negative"),
        (cfg.data.num_tokenize_actors >= 0, "data.num_tokenize_actors", "non-negative"),
        (cfg.rollout.temperature >= 0, "rollout.temperature", "non-negative"),
        (cfg.eval.episodes >= 1, "eval.episodes", "at least 1"),
        (cfg.eval.video_episodes >= 0, "eval.video_episodes", "non-negative"),
        *_ppo_checks(cfg.ppo),
        *_online_checks(cfg),
        *_sweep_checks(cfg),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{where}: key '{key}' must be {expected}")
    _validate_tasks(cfg, where)


def _validate_tasks(cfg: Config, where: str) -> None:
    """Checks of each ``tasks[]`` entry, and that no task is listed twice."""
    for i, t in enumerate(cfg.tasks):
        if t.weight < 0:
            raise ConfigError(f"{where}: key 'tasks[{i}].weight' must be non-negative")
        if not t.lr_scale > 0:
            raise ConfigError(f"{where}: key 'tasks[{i}].lr_scale' must be positive")
        if t.lr_scale != 1.0 and not cfg.train.task_moments:
            raise ConfigError(f"{where}: key 'tasks[{i}].lr_scale' must be 1 unless train.task_moments is true "
                              "(a per-task rate needs per-task moments)")
        if t.start_step < 0:
            raise ConfigError(f"{where}: key 'tasks[{i}].start_step' must be non-negative")
        if t.start_step > 0 and t.start_step >= cfg.train.steps:
            raise ConfigError(f"{where}: key 'tasks[{i}].start_step' is {t.start_step}, but the run has "
                              f"train.steps={cfg.train.steps}: the task would never train")
        if t.episodes < 1:
            raise ConfigError(f"{where}: key 'tasks[{i}].episodes' must be at least 1")
        if not 0.0 <= t.expert_noise <= 1.0:
            raise ConfigError(f"{where}: key 'tasks[{i}].expert_noise' must be in [0, 1]")
        if t.batch_size is not None and t.batch_size < 1:
            raise ConfigError(f"{where}: key 'tasks[{i}].batch_size' must be at least 1 (or null)")
        if t.window is not None and t.window < 1:
            raise ConfigError(f"{where}: key 'tasks[{i}].window' must be at least 1 (or null)")
        if t.temperature is not None and not t.temperature >= 0:
            raise ConfigError(f"{where}: key 'tasks[{i}].temperature' must be non-negative (or null)")
    if cfg.tasks and not any(t.start_step == 0 and t.weight > 0 for t in cfg.tasks):
        raise ConfigError(f"{where}: key 'tasks': no task with a positive weight has start_step 0, so the "
                          "first steps would have nothing to train on")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: key 'tasks' lists a task twice: {names}")


def _ppo_checks(ppo: PPOConfig) -> list[tuple[bool, str, str]]:
    return [
        (ppo.iterations >= 1, "ppo.iterations", ">= 1"),
        (ppo.num_env_runners >= 0, "ppo.num_env_runners", ">= 0"),
        (ppo.num_envs_per_env_runner >= 1, "ppo.num_envs_per_env_runner", ">= 1"),
        (ppo.train_batch_size >= 1, "ppo.train_batch_size", ">= 1"),
        (ppo.minibatch_size >= 1, "ppo.minibatch_size", ">= 1"),
        (ppo.num_epochs >= 1, "ppo.num_epochs", ">= 1"),
        (ppo.lr > 0, "ppo.lr", "positive"),
        (bool(ppo.hidden) and min(ppo.hidden) >= 1, "ppo.hidden", "a non-empty list of widths >= 1"),
        (ppo.eval_episodes >= 1, "ppo.eval_episodes", ">= 1"),
    ]


def _online_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    o = cfg.online
    wanted = "dagger" if o.mode == "dagger" else "policy"
    return [
        (o.num_actors >= 1, "online.num_actors", "at least 1"),
        (o.actor_cpus > 0, "online.actor_cpus", "positive"),
        (o.actor_gpus >= 0, "online.actor_gpus", "non-negative"),
        (o.envs_per_actor >= 1, "online.envs_per_actor", "at least 1"),
        (o.episodes_per_round >= 1, "online.episodes_per_round", "at least 1"),
        (o.publish_every >= 1, "online.publish_every", "at least 1"),
        (0.0 <= o.beta <= 1.0, "online.beta", "in [0, 1]"),
        (0.0 <= o.beta_decay <= 1.0, "online.beta_decay", "in [0, 1]"),
        (0.0 <= o.fraction < 1.0, "online.fraction", "in [0, 1)"),
        (o.keep_episodes >= 1, "online.keep_episodes", "at least 1"),
        (0.0 <= o.min_return_fraction <= 1.0, "online.min_return_fraction", "in [0, 1]"),
        (o.seed_offset >= 0, "online.seed_offset", "non-negative"),
        (not o.enabled or wanted in cfg.data.sources, "data.sources",
         f"a list including {wanted!r} when online.enabled with online.mode={o.mode!r} (training must read "
         "the online episodes)"),
    ]


def sweep_bounds(values: list[Any]) -> tuple[float, float] | None:
    """``[low, high]`` of a uniform or loguniform key as floats (YAML reads ``1e-4`` as a string); None when
    they are not two numbers."""
    if len(values) != 2 or any(isinstance(v, bool) for v in values):
        return None
    try:
        return float(values[0]), float(values[1])
    except (TypeError, ValueError):
        return None


def _sweep_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """Ranges of the sweep section; whether its keys exist is checked by ``sweep.check_space`` (through
    :func:`apply_overrides`, against the whole config)."""
    s, checks = cfg.sweep, []
    for key, dist in s.space.items():
        name, values = next(iter(dist.items()), (None, []))
        checks.append((len(dist) == 1, f"sweep.space.{key}",
                       f"one distribution of {list(typing.get_args(SweepDistribution))}, e.g. {{choice: [64, 128]}}"))
        if name in ("choice", "grid"):
            checks.append((len(values) >= 1, f"sweep.space.{key}.{name}", "a non-empty list of values"))
        elif name in ("uniform", "loguniform"):
            bounds = sweep_bounds(values)
            ordered = bounds is not None and bounds[0] < bounds[1] and (name == "uniform" or bounds[0] > 0)
            checks.append((ordered, f"sweep.space.{key}.{name}",
                           "[low, high] with low < high" + (" and low > 0" if name == "loguniform" else "")))
    needs_snapshots = s.metric == "validation_iqm" or s.scheduler == "asha"
    return checks + [
        (s.num_samples >= 1, "sweep.num_samples", "at least 1"),
        (s.max_concurrent_trials >= 1, "sweep.max_concurrent_trials", "at least 1"),
        (s.grace_steps >= 0, "sweep.grace_steps", "non-negative"),
        (not needs_snapshots or cfg.train.eval_every > 0, "train.eval_every",
         f"positive with sweep.metric={s.metric!r} and sweep.scheduler={s.scheduler!r} (the validation IQM comes "
         "from the snapshots scored during training)"),
    ]


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """Write the resolved config to <run_dir>/config.yaml (atomically) and return its path."""
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path
