"""The documented ``ray job submit`` lines, run verbatim through a shell on a head started by ``cluster/local.sh``.

The line ``cluster/local.sh start`` prints is run with ``MLFLOW_TRACKING_URI`` pointing at a tracking server and
with it unset, and so is the README's line; after ``cluster/local.sh stop`` the results are still where each job
said they would be, outside Ray's temporary copy of the working dir.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cluster.conftest import ROOT, LocalCluster, trial_runs
from tests.helpers import dinov2_demo

pytestmark = pytest.mark.cluster
QUICK = ["--set", "train.epochs=1", *dinov2_demo(28), "--set", "model.decoder=linear",
         "--set", "model.mode=finetune", "--set", "seed=0"]  # fmt: skip


def _readme_submit_line() -> str:
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if "ray job submit --working-dir" in ln]
    assert len(lines) == 1, lines
    return lines[0].split("  #")[0].strip()


def _results(output: str) -> Path:
    found = re.findall(r"^results: (\S+)", output, flags=re.M)
    assert len(found) == 1, output[-3000:]
    return Path(found[0])


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """One head that runs the trials itself, with one logical GPU the CPU-only demo trials must not use."""
    cluster = LocalCluster(tmp_path_factory.mktemp("head"), {"RAY_NUM_CPUS": "2", "RAY_NUM_GPUS": "1"})
    try:
        cluster.submit_line = cluster.start("--", *QUICK)
        yield cluster
    finally:
        cluster.stop()
    cluster.assert_stopped()


def test_printed_and_readme_lines_succeed_and_results_outlive_ray(head, servers):
    _, mlflow = servers
    assert head.submit_line.startswith("RAY_AUTH_MODE=token ray job submit")
    with_server = {**head.env, "MLFLOW_TRACKING_URI": mlflow.url}
    unset = {k: v for k, v in head.env.items() if k != "MLFLOW_TRACKING_URI"}
    readme_env = {**unset, "RAY_ADDRESS": f"http://127.0.0.1:{head.dash}"}
    outputs = {}
    for name, line, env in (("printed, tracking server", head.submit_line, with_server),
                            ("printed, no tracking URI", head.submit_line, unset),
                            ("README", _readme_submit_line(), readme_env)):  # fmt: skip
        job = head.shell(line, env=env)
        outputs[name] = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in outputs[name].lower(), (name, outputs[name][-4000:])

    _, _, parents, trials = trial_runs(mlflow.url, "lasegseg-demo")
    assert len(parents) == 1 and len(trials) == 2  # the first job tracked to the server
    assert {r.data.tags["lasegseg.device"] for r in trials} == {"cpu"}  # no GPU share: CPU on a GPU node
    head.stop()
    head.assert_stopped()
    for name, output in outputs.items():
        where = _results(output)
        assert where.is_relative_to(head.home / "lasegseg" / "runs"), (name, where)
        assert "runtime_resources" not in where.parts and not str(where).startswith("/tmp/ray")
        assert (where / "summary.md").is_file() and (where / "sweep_state.json").is_file(), name
