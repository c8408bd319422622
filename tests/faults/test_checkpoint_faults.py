"""Checkpoint writes that are interrupted — the process killed at every rename, or the disk full — never cost the
previous checkpoint: a reader always finds the last complete one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

# Saves version 1 of a training state (or model folder), then version 2 with a fault injected: SIGKILL right
# before or right after the N-th os.replace of the second save, or a file-size limit that makes the kernel
# refuse the write (EFBIG, as a full disk refuses with ENOSPC).
_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from pathlib import Path
    import torch
    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train import checkpoint as ck

    kind, fault, arg, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    cfg = Config().replace(**{"model.decoder": "linear", "model.mode": "finetune"})
    seg = build_segmenter(cfg.model)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-3)

    def save(version):
        with torch.no_grad():
            for p in seg.parameters():
                p.fill_(float(version))
        if kind == "state":
            ck.save_train_state(folder, seg, opt, {"epoch": version}, None)
        else:
            ck.save_model(seg, cfg, folder, extra={"version": version})

    save(1)
    calls = 0
    real_replace = os.replace

    def replace(src, dst):
        global calls
        calls += 1
        if fault == "kill-before" and calls == arg:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if fault == "kill-after" and calls == arg:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    if fault == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (arg, arg))
    try:
        save(2)
    except ck.ModelError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(3)
    print(json.dumps({"replaces": calls}))
    """
)


def _run(tmp_path: Path, kind: str, fault: str, arg: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, kind, fault, str(arg), str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _save_version(tmp_path: Path, kind: str, version: int) -> None:
    import torch

    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train import checkpoint as ck

    cfg = Config().replace(**{"model.decoder": "linear", "model.mode": "finetune"})
    seg = build_segmenter(cfg.model)
    with torch.no_grad():
        for p in seg.parameters():
            p.fill_(float(version))
    if kind == "state":
        ck.save_train_state(tmp_path / "ckpt", seg, torch.optim.AdamW(seg.parameters()), {"epoch": version}, None)
    else:
        ck.save_model(seg, cfg, tmp_path / "ckpt", extra={"version": version})


def _load_version(tmp_path: Path, kind: str) -> int:
    """Read the folder back the way resume/predict do; every parameter must hold one version's value."""
    import torch

    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train import checkpoint as ck

    folder = tmp_path / "ckpt"
    if kind == "state":
        cfg = Config().replace(**{"model.decoder": "linear", "model.mode": "finetune"})
        seg = build_segmenter(cfg.model)
        opt = torch.optim.AdamW(seg.parameters(), lr=1e-3)
        scalars, _ = ck.load_train_state(folder, seg, opt)
        version = scalars["epoch"]
    else:
        seg, _, meta = ck.load_model(folder)
        version = meta["version"]
    values = torch.cat([p.detach().flatten() for p in seg.parameters()]).unique()
    assert values.tolist() == [float(version)], "weights of two versions mixed in one checkpoint"
    return version


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpt")


@pytest.fixture(scope="module")
def replaces_per_save(tmp_path_factory) -> dict[str, int]:
    """How many renames one save makes (the kill points to cover), learned from an unfaulted run."""
    out = {}
    for kind in ("state", "model"):
        tmp = tmp_path_factory.mktemp(kind)
        proc = _run(tmp, kind, "none", 0)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])["replaces"]
        assert out[kind] >= 2  # at least the inner file and the folder swap
    return out


@pytest.mark.parametrize("kind", ["state", "model"])
def test_kill_at_every_rename_leaves_a_complete_checkpoint(kind, replaces_per_save, tmp_path):
    n = replaces_per_save[kind]
    seen = []
    for point in range(1, n + 1):
        for fault in ("kill-before", "kill-after"):
            case = tmp_path / f"{fault}-{point}"
            case.mkdir()
            proc = _run(case, kind, fault, point)
            assert proc.returncode == -signal.SIGKILL, (fault, point, proc.stderr[-2000:])
            version = _load_version(case, kind)
            # Killed before the final rename, the old version must be there; after it, the new one.
            assert version == (2 if (fault == "kill-after" and point == n) else 1), (fault, point)
            seen.append(version)
            # The next save after recovery works and leaves nothing behind but the folder itself.
            _save_version(case, kind, 3)
            assert _load_version(case, kind) == 3
            assert _leftovers(case) == [], _leftovers(case)
    assert set(seen) == {1, 2}


@pytest.mark.parametrize("kind", ["state", "model"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(kind, tmp_path):
    proc = _run(tmp_path, kind, "fsize", 4096)  # any weights file is larger: the kernel refuses the write
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    message = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert str(tmp_path / "ckpt") in message and "File too large" in message and "previous one is unchanged" in message
    assert _load_version(tmp_path, kind) == 1
    assert _leftovers(tmp_path) == []  # the half-written temporary folder was removed


def test_json_write_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    from lasegseg.train.checkpoint import write_json_atomic

    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})  # fails half-way through serialising
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
