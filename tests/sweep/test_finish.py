"""The sweep's tail: how to open it in MLflow's UI, and a comparison that fails without failing the sweep."""

from __future__ import annotations

from lasegseg.sweep import finish


def test_the_ui_hint_opens_the_model_training_view():
    page = "#/experiments/7/runs?workflowType=machine_learning"
    assert finish.ui_hint("http://mlflow:5000/", "7") == f"MLflow UI: http://mlflow:5000/{page}"
    assert finish.ui_hint("sqlite:////s/mlflow.db", "7") == (
        f"MLflow UI: mlflow ui --backend-store-uri sqlite:////s/mlflow.db  then open http://127.0.0.1:5000/{page}"
    )


def test_a_bug_in_the_comparison_is_one_line_and_never_raises(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise KeyError("cell")

    monkeypatch.setattr(finish, "compare", broken)
    finish.print_comparison("sqlite:////s/mlflow.db", "demo", tmp_path, "parent")
    captured = capsys.readouterr()
    assert captured.err == "comparison: KeyError: 'cell'\n" and captured.out == ""


def test_the_warm_up_writes_a_summary_in_a_temporary_folder_and_never_raises(monkeypatch, tmp_path):
    written = []
    real = finish.write_summary

    def spy(summary, trials, folder):
        written.append((len(summary), len(trials)))
        return real(summary, trials, tmp_path)

    monkeypatch.setattr(finish, "write_summary", spy)
    finish.warm_up()
    assert written == [(2, 4)] and (tmp_path / "summary.csv").is_file()  # two made-up cells of two seeds

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(finish, "summarize", broken)
    finish.warm_up()  # only a head start: the sweep's own aggregation reports
