"""Shipped cluster configs: Ray cluster-launcher schema, KubeRay manifests, token auth everywhere, no secrets."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY_UP = sorted((ROOT / "cluster").glob("*.yaml"))
KUBE = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
IMAGE = "ghcr.io/your-org/lasegseg:latest"


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_there_are_configs_for_aws_gcp_and_kuberay():
    assert {p.name for p in RAY_UP} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBE} == {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_yaml_passes_the_ray_schema_and_is_secure(path):
    import jsonschema

    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, _ray_schema())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = {name: t for name, t in types.items() if name.startswith("gpu-")}
    assert set(gpu) == {"gpu-1xh100", "gpu-8xh100"}
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu.values())
    assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu.values())
    assert any("pip install" in c and "~/lasegseg" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    head = next(c for c in cfg["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head


def _cluster_specs(doc: dict) -> list[dict]:
    return [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"]["rayClusterSpec"]]


@pytest.mark.parametrize("path", KUBE, ids=lambda p: p.name)
def test_kuberay_manifests_parse_and_use_token_auth(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all(d["apiVersion"] == "ray.io/v1" for d in docs)
    for doc in docs:
        for spec in _cluster_specs(doc):
            assert spec["authOptions"] == {"mode": "token"}
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
            pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
            containers = [c for g in pods for c in g["template"]["spec"]["containers"]]
            assert {c["image"] for c in containers} == {IMAGE}
            assert all({"secretRef": {"name": "lasegseg-mlflow"}} in c["envFrom"] for c in containers)
            gpus = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                    for g in spec["workerGroupSpecs"]}  # fmt: skip
            assert gpus == {"gpu-1xh100": "1", "gpu-8xh100": "8"}
            assert all(g["minReplicas"] <= g["maxReplicas"] for g in spec["workerGroupSpecs"])


@pytest.mark.parametrize("path,scheme", [("aws.yaml", "s3://"), ("gcp.yaml", "gs://")])
def test_cloud_configs_store_sweeps_in_object_storage(path, scheme):
    cfg = yaml.safe_load((ROOT / "cluster" / path).read_text())
    head = " ".join(c for c in cfg["head_start_ray_commands"] if "--head" in c)
    assert f"LASEGSEG_STORAGE={scheme}" in head  # the driver's default --storage-path, on the head
    keys = {"aws.yaml": "IamInstanceProfile", "gcp.yaml": "serviceAccounts"}[path]
    assert all(keys in t["node_config"] for t in cfg["available_node_types"].values())  # node identity, no keys


@pytest.mark.parametrize("path", KUBE, ids=lambda p: p.name)
def test_kuberay_stores_sweeps_in_an_s3_compatible_bucket(path):
    for doc in yaml.safe_load_all(path.read_text()):
        for spec in _cluster_specs(doc):
            head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
            storage = {e["name"]: e["value"] for e in head["env"]}["LASEGSEG_STORAGE"]
            assert storage.startswith("s3://")
            pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
            containers = [c for g in pods for c in g["template"]["spec"]["containers"]]
            assert all({"secretRef": {"name": "lasegseg-s3"}} in c["envFrom"] for c in containers)


def test_rayjob_runs_the_paper_sweep():
    (job,) = yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert "python sweeps/fewshot.py --config sweeps/configs/paper.yaml" in job["spec"]["entrypoint"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


SECRET = re.compile(r"(password|secret|token|key)[\w.]*\s*[:=]\s*['\"]?(?!CHANGE_ME|\$|\{|$)[A-Za-z0-9+/_\-]{8,}", re.I)


def test_no_secret_literal_is_shipped():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "cluster", "mlflow_server"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert files
    assert SECRET.search("MLFLOW_AUTH_ADMIN_PASSWORD=hunter2hunter2") and not SECRET.search("PGPASSWORD=CHANGE_ME")
    hits = [f"{f}: {m.group(0)}" for f in files for m in SECRET.finditer((ROOT / f).read_text())]
    assert not hits, hits


def test_local_head_submit_line_names_credentials_without_printing_them(monkeypatch):
    env = {"PATH": f"{Path(__import__('sys').executable).parent}:/usr/bin:/bin", "HOME": str(ROOT),
           "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-value-xyz"}  # fmt: skip
    out = subprocess.run([str(ROOT / "cluster" / "local.sh"), "submit-line"], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.startswith("RAY_AUTH_MODE=token ray job submit --address=http://127.0.0.1:8265 --working-dir=. ")
    assert "$MLFLOW_TRACKING_URI" in out and "$MLFLOW_TRACKING_PASSWORD" in out
    assert "s3cr3t" not in out and "alice" not in out
    assert out.rstrip().endswith("python sweeps/fewshot.py --config sweeps/configs/demo.yaml")
