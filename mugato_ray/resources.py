"""How many train workers, tokenize actors and CPUs a run reserves, from the cluster's resources.

Why this exists: Ray Train reserves its workers' CPUs first, and Ray Data only schedules inside what is
left. If training reserves every CPU, Ray Data's read tasks stay "backpressured: ResourceBudget"
forever and the run hangs without an error (2 workers x 1 CPU on a 2-CPU machine did exactly that;
0.5 CPU each finished). :func:`plan_resources` therefore splits the logical CPUs up front.

The rule (CPU counts are Ray's *logical* reservations: they decide what can be scheduled, not how many
cores a process may use):

1. Data gets at most half of the cluster's CPUs (:data:`DATA_SHARE`). It needs, per task dataset,
   ``actors`` tokenize actors plus one read task in flight, each reserving ``tokenize_cpus``:
   ``n_tasks * (actors + 1) * tokenize_cpus``. If the configured ``data.tokenize_actor_cpus`` asks
   for more, every data reservation is scaled down to fit.
2. Training gets the rest: ``cpus_per_worker = (CPUs - data) / train_workers`` unless
   ``train.cpus_per_worker`` is set; an explicit value that leaves data less than its minimum raises
   an error naming the key instead of hanging.
   With ``train.eval_every > 0``, :data:`EVAL_SHARE` of the CPUs (at most one) is held back from training
   for the evaluator actor; with ``online.enabled``, ``online.num_actors * online.actor_cpus`` for the
   online rollout actors (at most :data:`ONLINE_SHARE` of the cluster, else an error naming the keys).
3. GPUs: with ``train.use_gpu`` every worker takes one GPU; asking for more workers than GPUs raises.
4. ``train.num_workers = 0`` runs the loop in the driver, which reserves nothing.

5. A sweep trial (``mugato_ray.sweep``) is planned by :func:`plan_trial` on ``1 / sweep.max_concurrent_trials``
   of the cluster, less what its final evaluation's rollout actors reserve; the rules above split the rest.

So training never holds all CPUs, and no data reservation needs a whole CPU (the read tasks reserve
fractions too; see ``mugato_ray.data.task_dataset``), so a cluster whose nodes each have one CPU
still schedules everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mugato_ray.config import Config

DATA_SHARE = 0.5
"""Largest fraction of the cluster's CPUs that tokenize actors and read tasks reserve together."""
MIN_DATA_CPUS = 0.02
"""Smallest reservation of one tokenize actor or read task. Reservations are logical (they decide what
Ray schedules, not how many cores a process uses); 0.02 lets the learning suite's 11 tasks x (1 actor + 1
read task) fit the data share of a 2-CPU laptop (1 CPU / 22 = 0.045 each)."""
EVAL_SHARE = 0.1
"""Fraction of the cluster's CPUs (at most one CPU) held back from training for the actor that evaluates
snapshots while training goes on (``train.eval_every > 0``; see mugato_ray.train_eval)."""
ONLINE_SHARE = 0.5
"""Largest fraction of the cluster's CPUs that online rollout actors may reserve (``online.enabled``)."""
MAX_AUTO_TOKENIZE_ACTORS = 8
"""Upper bound on tokenize actors per task when ``data.num_tokenize_actors = 0``."""


@dataclass(frozen=True)
class Plan:
    """Resources of one training run."""

    train_workers: int
    """Ray Train workers (0: the loop runs in the driver)."""
    cpus_per_worker: float
    """Logical CPUs each train worker reserves."""
    use_gpu: bool
    """One GPU per worker, NCCL, bf16 autocast."""
    tokenize_actors: int
    """Tokenize/pad actors per task dataset."""
    tokenize_cpus: float
    """Logical CPUs each tokenize actor (and each read task) reserves."""
    torch_threads: int
    """Intra-op threads of each train worker's torch."""
    eval_cpus: float = 0.0
    """Logical CPUs of the evaluator actor (0 when training evaluates nothing)."""
    online_cpus: float = 0.0
    """Logical CPUs of all online rollout actors together (0 without ``online.enabled``)."""

    @property
    def data_cpus(self) -> float:
        """What one task dataset reserves: its actors plus one read task."""
        return (self.tokenize_actors + 1) * self.tokenize_cpus


def plan_resources(cfg: Config, cluster_resources: Mapping[str, float]) -> Plan:
    """Split ``cluster_resources`` (e.g. ``ray.cluster_resources()``) between training and data; see the
    module docstring for the rule. Pure function; raises ValueError naming the config key that cannot fit.
    """
    cpus = float(cluster_resources.get("CPU", 0.0))
    gpus = float(cluster_resources.get("GPU", 0.0))
    n_tasks = max(1, len(cfg.tasks))
    workers = cfg.train.num_workers
    if cpus <= 0:
        raise ValueError(f"the cluster reports no CPUs ({dict(cluster_resources)}); Ray Data needs some")
    if cfg.train.use_gpu and gpus < max(workers, 1):
        raise ValueError(
            f"train.use_gpu=true with train.num_workers={workers} needs {max(workers, 1)} GPUs, "
            f"the cluster has {gpus:g}"
        )
    actors, actor_cpus = _data_share(cfg, cpus * DATA_SHARE, n_tasks)
    slots = n_tasks * (actors + 1)
    eval_cpus = math.floor(min(1.0, cpus * EVAL_SHARE) * 1e4) / 1e4 if cfg.train.eval_every > 0 else 0.0
    online_cpus = _online_share(cfg, cpus, gpus)
    per_worker, actor_cpus = _train_share(cfg, cpus, cpus - eval_cpus - online_cpus, n_tasks, actors, actor_cpus)
    # Ray rounds reservations to 1e-4 CPU; round down so that the sum never exceeds the cluster.
    actor_cpus = math.floor(actor_cpus * 1e4) / 1e4
    per_worker = math.floor(per_worker * 1e4) / 1e4
    if cfg.train.torch_threads > 0:
        threads = cfg.train.torch_threads
    elif workers == 0:
        threads = max(1, math.floor(cpus - slots * actor_cpus))
    else:
        threads = max(1, round(per_worker))
    return Plan(
        train_workers=workers,
        cpus_per_worker=per_worker,
        use_gpu=cfg.train.use_gpu,
        tokenize_actors=actors,
        tokenize_cpus=actor_cpus,
        torch_threads=threads,
        eval_cpus=eval_cpus,
        online_cpus=online_cpus,
    )


@dataclass(frozen=True)
class TrialPlan:
    """Resources of one sweep trial: its training run's plan and what it reserves through Ray Tune."""

    plan: Plan
    """Train workers, tokenize actors and the evaluator, planned on the trial's share less ``eval_cpus``."""
    share_cpus: float
    """The trial's share of the cluster: its CPUs over ``sweep.max_concurrent_trials``."""
    eval_cpus: float
    """The final evaluation's rollout actors: ``rollout.num_actors * rollout.actor_cpus``."""
    eval_gpus: float
    """Their GPUs: ``rollout.num_actors * rollout.actor_gpus``."""
    n_tasks: int
    """Task datasets of the trial's training (each reserves ``plan.data_cpus``)."""

    @property
    def tune_bundle(self) -> dict[str, float]:
        """What the trial's Tune placement group holds for the actors the trial starts itself (the final
        evaluation's and the snapshot evaluator): Ray schedules them inside the trial's group."""
        cpus = math.floor((self.eval_cpus + self.plan.eval_cpus) * 1e4) / 1e4
        return {"CPU": cpus} | ({"GPU": self.eval_gpus} if self.eval_gpus else {})

    @property
    def reserved_cpus(self) -> float:
        """Everything the trial reserves at once: its Tune bundle, train workers and data reservations."""
        data = max(1, self.n_tasks) * self.plan.data_cpus
        return self.tune_bundle["CPU"] + self.plan.train_workers * self.plan.cpus_per_worker + data


def plan_trial(cfg: Config, cluster_resources: Mapping[str, float], concurrent: int) -> TrialPlan:
    """Rule 5: the resources of one of ``concurrent`` sweep trials running at once on ``cluster_resources``.

    Each trial gets ``1 / concurrent`` of the CPUs and GPUs. Its final evaluation's rollout actors
    (``rollout.num_actors * rollout.actor_cpus``) come off that share first, since Ray Tune holds them for the
    trial's whole life; :func:`plan_resources` splits the rest between train workers, data and the snapshot
    evaluator. A share that cannot hold them is a ValueError naming ``sweep.max_concurrent_trials`` and the
    keys that do not fit. Pure function.
    """
    cpus, gpus = float(cluster_resources.get("CPU", 0.0)), float(cluster_resources.get("GPU", 0.0))
    share_cpus, share_gpus = cpus / concurrent, gpus / concurrent
    eval_cpus = cfg.rollout.num_actors * cfg.rollout.actor_cpus
    eval_gpus = cfg.rollout.num_actors * cfg.rollout.actor_gpus
    where = (f"sweep.max_concurrent_trials={concurrent} gives each trial {share_cpus:g} of the cluster's {cpus:g} "
             f"CPUs ({share_gpus:g} of {gpus:g} GPUs)")
    if eval_cpus >= share_cpus * DATA_SHARE or eval_gpus > share_gpus + 1e-9:
        raise ValueError(
            f"{where}; its evaluation's rollout.num_actors={cfg.rollout.num_actors} x rollout.actor_cpus="
            f"{cfg.rollout.actor_cpus:g} (x rollout.actor_gpus={cfg.rollout.actor_gpus:g}) would take "
            f"{eval_cpus:g} CPUs ({eval_gpus:g} GPUs), more than {DATA_SHARE:g} of the CPUs or all the GPUs: lower "
            "sweep.max_concurrent_trials or rollout.num_actors"
        )
    try:
        plan = plan_resources(cfg, {"CPU": share_cpus - eval_cpus, "GPU": share_gpus - eval_gpus})
    except ValueError as e:
        raise ValueError(f"{where}, {share_cpus - eval_cpus:g} CPUs after its evaluation's rollout actors; "
                         f"training does not fit in them (lower sweep.max_concurrent_trials): {e}") from e
    return TrialPlan(plan, share_cpus, eval_cpus, eval_gpus, len(cfg.tasks))


def _online_share(cfg: Config, cpus: float, gpus: float) -> float:
    """CPUs held back for the online rollout actors; ValueError naming the keys when they (or their GPUs,
    next to one per training worker with ``train.use_gpu``) do not fit."""
    if not cfg.online.enabled:
        return 0.0
    need_gpus = cfg.online.num_actors * cfg.online.actor_gpus
    train_gpus = max(cfg.train.num_workers, 1) if cfg.train.use_gpu else 0
    if need_gpus and train_gpus + need_gpus > gpus + 1e-9:
        raise ValueError(
            f"online.num_actors={cfg.online.num_actors} x online.actor_gpus={cfg.online.actor_gpus:g} GPUs next to "
            f"{train_gpus} for training exceed the cluster's {gpus:g}: lower online.actor_gpus (a fraction shares "
            "a GPU) or train.num_workers"
        )
    need = cfg.online.num_actors * cfg.online.actor_cpus
    if need > cpus * ONLINE_SHARE:
        raise ValueError(
            f"online.num_actors={cfg.online.num_actors} x online.actor_cpus={cfg.online.actor_cpus:g} = {need:g} "
            f"CPUs exceeds {ONLINE_SHARE:g} of the cluster's {cpus:g}; training and data need the rest: lower "
            "online.num_actors or online.actor_cpus"
        )
    return need


def _data_share(cfg: Config, data_budget: float, n_tasks: int) -> tuple[int, float]:
    """Rule 1: (tokenize actors per task, CPUs of each) so that every task's actors and read task fit in
    ``data_budget`` CPUs."""
    actor_cpus = cfg.data.tokenize_actor_cpus
    if actor_cpus <= 0:
        raise ValueError(f"data.tokenize_actor_cpus must be positive, got {actor_cpus}")
    actors = cfg.data.num_tokenize_actors
    if actors <= 0:  # auto: as many as the share holds at the configured CPUs, at least one
        actors = int(min(MAX_AUTO_TOKENIZE_ACTORS, max(1, math.floor(data_budget / (n_tasks * actor_cpus)) - 1)))
    slots = n_tasks * (actors + 1)
    return actors, min(actor_cpus, data_budget / slots)


def _train_share(cfg: Config, cpus: float, cpus_for_train: float, n_tasks: int, actors: int,
                 actor_cpus: float) -> tuple[float, float]:
    """Rule 2: (CPUs per train worker, CPUs per data reservation): training gets ``cpus_for_train`` less
    what data reserves, or the configured ``train.cpus_per_worker`` if it leaves data its minimum."""
    workers = cfg.train.num_workers
    slots = n_tasks * (actors + 1)
    if workers == 0:
        per_worker = 0.0
    elif cfg.train.cpus_per_worker > 0:
        per_worker = cfg.train.cpus_per_worker
        left = cpus_for_train - workers * per_worker
        if left < slots * MIN_DATA_CPUS:
            raise ValueError(
                f"train.cpus_per_worker={per_worker:g} x train.num_workers={workers} leaves {left:g} of "
                f"{cpus:g} CPUs for data, which needs at least {slots * MIN_DATA_CPUS:g} "
                f"({n_tasks} tasks x ({actors} tokenize actors + 1 read task) x {MIN_DATA_CPUS}); "
                "lower train.cpus_per_worker (0 sizes it automatically)"
            )
        actor_cpus = min(actor_cpus, left / slots)
    else:
        per_worker = (cpus_for_train - slots * actor_cpus) / workers
    if actor_cpus < MIN_DATA_CPUS:
        raise ValueError(
            f"{n_tasks} tasks x ({actors} tokenize actors + 1 read task) do not fit in {cpus:g} CPUs at "
            f"{MIN_DATA_CPUS} CPU each next to training; lower data.num_tokenize_actors or train.num_workers"
        )
    return per_worker, actor_cpus


def describe(plan: Plan, n_tasks: int) -> str:
    """One line for logs and the README."""
    return (
        f"{plan.train_workers} train workers x {plan.cpus_per_worker:g} CPU"
        f"{' + 1 GPU' if plan.use_gpu else ''} ({plan.torch_threads} torch threads); "
        f"{n_tasks} tasks x {plan.tokenize_actors} tokenize actors x {plan.tokenize_cpus:g} CPU"
        + (f"; evaluator {plan.eval_cpus:g} CPU" if plan.eval_cpus else "")
        + (f"; online actors {plan.online_cpus:g} CPU" if plan.online_cpus else "")
    )
