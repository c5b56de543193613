"""deploy/: the cluster launcher config checked by Ray's own schema and config preparation, the runtime env by
the parser `ray job submit` uses, the KubeRay RayJob by the fields of KubeRay's CRD; and each agrees with the
project (configs/cluster.yaml's shared paths and GPU count, .rayignore, what the image installs)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import yaml

from mugato_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLUSTER = load_config(ROOT / "configs" / "cluster.yaml")
SHARED_PATHS = [Path(CLUSTER.run_dir), Path(CLUSTER.train.storage_path)]

# The RayJob fields of KubeRay's CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml, ray.io/v1): the CRD's
# schema is over 1 MB and not in Ray's wheel, so this test checks the manifest against these names and the CRD's
# required fields instead of vendoring it.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
               "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "managedBy", "networkPolicy", "rayVersion", "suspend",
                   "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
HEAD_GROUP = {"enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType", "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
                "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}


def load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def under_shared(mount: str) -> bool:
    return all(p == Path(mount) or Path(mount) in p.parents for p in SHARED_PATHS)


# ------------------------------------------------------------------------------------------- ray up


def test_the_cluster_launcher_config_passes_ray_ups_own_checks():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster.yaml")
    jsonschema.validate(raw, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before it reaches the cloud
    validate_config(config)

    head_type = config["head_node_type"]
    nodes = config["available_node_types"]
    assert nodes[head_type]["resources"].get("GPU", 0) == 0  # a CPU head
    workers = [n for name, n in nodes.items() if name != head_type]
    assert all(n["resources"]["GPU"] > 0 for n in workers)  # GPU workers, enough for configs/cluster.yaml
    assert sum(n["resources"]["GPU"] * n["max_workers"] for n in workers) >= CLUSTER.train.num_workers
    # The project is synced from the project root and installed by the setup commands of both node kinds.
    (project,) = [remote for remote, local in raw["file_mounts"].items() if local == "."]
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(f'pip install -q "{project}[envs]"' in c for c in raw[key]), key
    assert ".rayignore" in raw["rsync_filter"]
    # run_dir and Ray Train's storage on the filesystem every container mounts.
    mounts = [opt.split()[1].split(":")[1] for opt in raw["docker"]["run_options"] if opt.startswith("-v ")]
    assert any(under_shared(m) for m in mounts), mounts
    # Token authentication: the local token on every node, and every `ray start` in token mode.
    assert "~/.ray/auth_token" in raw["file_mounts"]
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in raw[key]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


# ------------------------------------------------------------------------------------------- ray job submit


def rayignore_patterns() -> list[str]:
    lines = (ROOT / ".rayignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_runtime_env_file_is_accepted_by_ray_job_submit():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # `ray job submit --runtime-env deploy/runtime_env.yaml` reads the file with this function, then Ray validates
    # the dictionary as a RuntimeEnv.
    env = parse_runtime_env_args(runtime_env=str(DEPLOY / "runtime_env.yaml"))
    parsed = RuntimeEnv(**env)
    assert parsed["working_dir"] == "." and parsed["excludes"] == rayignore_patterns()
    assert not {"pip", "conda", "uv"} & set(env)  # the nodes' image holds the dependencies
    assert all(isinstance(v, str) for v in env["env_vars"].values())


# ------------------------------------------------------------------------------------------- KubeRay


def pod_specs(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def test_the_rayjob_manifest_has_the_crds_structure_and_shared_storage_for_run_dir():
    from ray.runtime_env import RuntimeEnv

    docs = list(yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text()))
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert set(spec) <= RAYJOB_SPEC and set(cluster) <= RAYCLUSTER_SPEC and "headGroupSpec" in cluster
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP and "template" in cluster["headGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert WORKER_GROUP_REQUIRED <= set(group) <= WORKER_GROUP
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert isinstance(spec["shutdownAfterJobFinishes"], bool) and isinstance(spec["ttlSecondsAfterFinished"], int)
    assert cluster["authOptions"]["mode"] in ("disabled", "token")
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values())  # the CRD's rayStartParams map strings to strings
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))

    # Shared storage: every pod mounts the claim (ReadWriteMany) where configs/cluster.yaml keeps run_dir.
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in pod_specs(cluster):
        volumes = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                   == claim["metadata"]["name"]}
        assert all(c["name"] and c["image"] for c in pod["containers"])
        mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in volumes]
        assert any(under_shared(m) for m in mounts), mounts
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
               for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert gpus >= CLUSTER.train.num_workers

    # The entrypoint names a job and a config that the image (deploy/Dockerfile) holds at the path it uses.
    args = shlex.split(spec["entrypoint"])
    home = re.search(r"^WORKDIR (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert args[0] == "python" and args[2] == "--config"
    for path in (args[1], args[3]):
        assert path.startswith(home + "/") and (ROOT / path[len(home) + 1:]).is_file(), path


def test_the_readme_cluster_sequence_is_the_script_ci_runs():
    """README "On a cluster" and deploy/submit_local.sh cannot drift: each command line of the README's block
    (but the final `ray stop`, which the test does through its own process group) is a line of the script."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## On a cluster"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
    script = [line.strip() for line in (ROOT / "deploy" / "submit_local.sh").read_text().splitlines()]
    commands = [line for line in block if line and line != "ray stop"]
    assert commands[:2] == ["export RAY_AUTH_MODE=token", "ray get-auth-token --generate > /dev/null"]
    for line in commands[:2]:
        assert line in script, line
    assert any(s.startswith("ray start --head") for s in script)
    assert 'ray job submit --working-dir . -- "$@"' in script and commands[3].startswith(
        "ray job submit --working-dir . -- python jobs/")
