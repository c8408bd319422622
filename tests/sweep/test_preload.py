"""The module every worker of a sweep's own local cluster imports as it starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lasegseg.sweep import worker


@pytest.mark.parametrize("backbone_code", ["1", "0"])
def test_preload_module_warms_a_fresh_process_without_touching_store_or_weights(tmp_path, backbone_code):
    """What a worker of the local cluster runs as it starts: imports only (no sqlite store, no backbone), and no
    transformers when every trial of the sweep decodes cached features."""
    db = tmp_path / "mlflow.db"
    code = (
        "import sys; import lasegseg.sweep.preload; from lasegseg.sweep import worker as t; "
        "from lasegseg.models import segmenter as s; "
        "print(sorted(m for m in ('torch', 'transformers', 'mlflow.tracking', 'lasegseg.train.trial') "
        "if m in sys.modules), t.worker_info()['worker_prewarmed'], len(s._BACKBONE_TEMPLATE))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", worker.PREWARM_ENV: "tiny|False",
           worker.WARM_BACKBONE_CODE_ENV: backbone_code}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = ["lasegseg.train.trial", "mlflow.tracking", "torch"] + (["transformers"] if backbone_code == "1" else [])
    assert proc.stdout.split("\n")[0] == f"{imported} True 0"
    assert not db.exists()  # the driver creates the store; a worker racing it would run the migrations twice
