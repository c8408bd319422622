"""The sweep driver: what it hands the Ray cluster it starts, and a dry run from the command line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lasegseg.sweep import runner, worker

ROOT = Path(__file__).resolve().parents[2]


def test_a_dry_run_lists_the_trials_and_starts_nothing(phantom_dir, tmp_path, capsys):
    argv = ["--config", str(ROOT / "sweeps" / "configs" / "demo.yaml"), "--data", str(phantom_dir),
            "--storage-path", str(tmp_path / "runs"), "--frozen-gpus-per-trial", "0.5", "--dry-run"]  # fmt: skip
    assert runner.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep 'lasegseg-demo': 20 trials; results: {tmp_path / 'runs' / 'lasegseg-demo'}"
    assert all(line.startswith("  ") for line in out[1:21]) and out[21] == "trials: 20 = grid 20"  # then the plan
    assert not (tmp_path / "runs").exists()  # no folder, no store, no Ray


def test_workers_warm_the_backbone_only_when_a_trial_loads_one(fake_ray, tmp_path):
    """A sweep whose backbone trials all decode cached features spares its workers transformers; one trial that
    runs its backbone (fine-tuned here) makes every worker import it, and the setup hook load that backbone."""
    frozen = {"model.backbone": "tiny", "model.mode": "frozen", "model.decoder": "linear"}
    baseline = {"model.backbone": "none", "model.decoder": "unet"}
    tuned = {"model.backbone": "tiny", "model.mode": "finetune", "model.decoder": "conv", "model.registers": True}
    res = SimpleNamespace(max_concurrent=1, cpus_per_trial=1.0)
    for trials, warm, prewarm in (([baseline, frozen], "0", None), ([frozen, baseline, tuned], None, "tiny|True")):
        fake_ray.calls.clear()
        runner._start_ray(SimpleNamespace(trials=trials, spec=SimpleNamespace(resources=res)), "sqlite:////s/m.db")
        ((_, env),) = fake_ray.calls
        assert env.get(worker.WARM_BACKBONE_CODE_ENV) == warm and env.get(worker.PREWARM_ENV) == prewarm


def test_the_stand_in_switch_goes_to_the_workers_and_is_announced(fake_ray, monkeypatch, capsys):
    """On a cluster the workers get it in the runtime env (a local cluster's inherit this process's environment)."""
    from lasegseg.models.sources import STAND_IN_ENV

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    res = SimpleNamespace(max_concurrent=1, cpus_per_trial=1.0)
    plan = SimpleNamespace(trials=[], spec=SimpleNamespace(resources=res))
    for value, sent in (("0", None), ("1", "1")):
        monkeypatch.setenv(STAND_IN_ENV, value)
        fake_ray.calls.clear()
        runner._start_ray(plan, "sqlite:////s/m.db")
        ((kwargs, _),) = fake_ray.calls
        assert kwargs["runtime_env"]["env_vars"].get(STAND_IN_ENV) == sent
        assert ("stand-ins" in capsys.readouterr().out) == (sent == "1")
