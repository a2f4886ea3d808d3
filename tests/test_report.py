"""`vecrl report` and its statistics, on synthetic run folders whose right answers are known."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from vecrl import cli, report, stats
from vecrl.report import ReportError, load_run, make_report, regrets, report_order, return_key


# ------------------------------------------------------------------------------------------- statistics
def test_interquartile_mean_of_known_samples():
    assert stats.trimmed_mean(np.arange(100.0)) == pytest.approx(49.5)  # mean of 25..74
    assert stats.trimmed_mean(np.array([0.0, 1, 2, 3, 100])) == pytest.approx(2.0)  # int(0.25*5) = 1 cut each end
    x = np.random.default_rng(3).normal(size=(4, 37))
    np.testing.assert_allclose(stats.trimmed_mean(x, axis=1), scipy.stats.trim_mean(x, 0.25, axis=1))


def test_aggregates_of_known_scores():
    tasks = [np.array([0.2, 0.4, 0.6, 0.8]), np.array([1.2, 1.0, 0.9, 0.9])]
    out = stats.aggregate_intervals(tasks, reps=200)
    assert out["mean"][0] == pytest.approx((0.5 + 1.0) / 2)
    assert out["median"][0] == pytest.approx(0.75)  # median of the two task means
    assert out["iqm"][0] == pytest.approx(np.mean([0.6, 0.8, 0.9, 0.9]))  # pooled, middle four of eight
    assert out["optimality_gap"][0] == pytest.approx((np.mean([0.8, 0.6, 0.4, 0.2]) + np.mean([0, 0, 0.1, 0.1])) / 2)
    for est, lo, hi in out.values():
        assert lo <= est <= hi
    single = stats.aggregate_intervals([np.full(5, 0.7)], reps=100)
    assert single["iqm"] == pytest.approx((0.7, 0.7, 0.7))  # no spread, no interval


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials = 400
    covered_mean = covered_agg = 0
    for t in range(trials):
        seeds = rng.normal(5.0, 2.0, size=10)
        _, lo, hi = stats.mean_ci(seeds, reps=1000, seed=t)
        covered_mean += lo <= 5.0 <= hi
        tasks = [rng.normal(m, 0.1, size=10) for m in (0.3, 0.5, 0.7)]
        _, lo, hi = stats.aggregate_intervals(tasks, reps=1000, seed=t)["mean"]
        covered_agg += lo <= 0.5 <= hi
    # A percentile bootstrap of 10 samples under-covers slightly (about 0.92); far outside this band is a bug.
    assert 0.88 <= covered_mean / trials <= 0.975
    assert 0.88 <= covered_agg / trials <= 0.975


def test_mean_ci_ignores_missing_seeds_per_point():
    values = np.array([[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]])
    mean, lo, hi = stats.mean_ci(values, reps=200)
    np.testing.assert_allclose(mean[:2], [2.0, 2.0])
    assert lo[1] == hi[1] == 2.0 and np.isnan(mean[2]) and np.isnan(lo[2])


def test_average_regret_of_known_curves():
    returns = np.linspace(0.0, 1000.0, 101)  # one episode per chunk, rising linearly to the best
    assert stats.average_regret(returns, np.ones(101), best=1000.0) == pytest.approx(500.0)
    # A chunk mean over three episodes weighs three times one over one episode.
    assert stats.average_regret([100.0, 400.0], [3, 1], best=500.0) == pytest.approx(500 - (300 + 400) / 4)
    assert np.isnan(stats.average_regret([], [], best=1.0))


# ------------------------------------------------------------------------------------------ run folders
def write_run(path, name, final_eval, seeds=4, tasks=("cartpole-balance", "cartpole-swingup"), steps=(100, 200, 300),
              total=300, diagnostics=True, summary=True, action_repeat=2, report_return=None, train_offset=0.0,
              evals=True, model_error=False):
    """A run folder as the trainer writes it: eval returns rise linearly to `final_eval[task]` + seed, training
    returns to that less `train_offset`, and each chunk holds one finished training episode. report_return=None
    writes a config.json from before the field existed; evals=False one whose run has not evaluated yet."""
    os.makedirs(path)
    spec = {"name": name, "agent": "madtd", "tasks": list(tasks), "seeds": list(range(seeds)),
            "train": {"steps": total, "action_repeat": action_repeat}}
    if report_return is not None:
        spec["report_return"] = report_return
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"spec": spec, "device": "cpu"}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in steps:
            for task in tasks:
                for seed in range(seeds):
                    value = (final_eval[task] + seed) * step / steps[-1]
                    rec = {"step": step, "seed": seed, "task": task, "frames": step * action_repeat,
                           "train_return": value - train_offset * step / steps[-1], "train_episodes": 1,
                           "eval_return": value if evals else None, "env_nan": False,
                           "rejected_updates": 0, "wall_time": step / 10}
                    if diagnostics:
                        rec.update({"q_pred": value / 10, "q_mc": value / 12, "td_error/train": 1.0,
                                    "td_error/held_out": 1.5, "td_error/on_policy": 2.0})
                    if model_error:
                        rec.update({"model_error/train": 0.01, "model_error/held_out": 0.02})
                    f.write(json.dumps(rec) + "\n")
    if summary:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"status": "complete", "step": steps[-1]}, f)
    return path


def test_report_of_two_runs_has_curves_aggregates_regret_and_diagnostics(tmp_path):
    a = write_run(tmp_path / "a", "alpha0", {"cartpole-balance": 500.0, "cartpole-swingup": 200.0})
    b = write_run(tmp_path / "b", "alpha0.05", {"cartpole-balance": 900.0, "cartpole-swingup": 400.0})
    result = make_report([str(a), str(b)], str(tmp_path / "report"), reps=200)
    names = sorted(os.path.basename(p) for p in result["figures"])
    assert names == ["aggregates_eval.png", "aggregates_train.png", "curves_cartpole-balance.png",
                     "curves_cartpole-swingup.png",
                     "diagnostics_cartpole-balance.png", "diagnostics_cartpole-swingup.png"]
    assert all(os.path.getsize(p) > 10_000 for p in result["figures"])
    text = open(result["report"]).read()
    # Final eval returns: 900 + seed over seeds 0..3 has mean 901.5.
    assert "901.5 [" in text and "(n=4)" in text
    # Aggregates: alpha0.05's mean normalised score is ((901.5 + 401.5) / 2) / 1000.
    assert "0.651 [" in text
    # Regret against the best return of both runs (903 on balance): alpha0.05's seed s rises linearly to 900 + s
    # over 3 chunks, so its mean return is (900 + s) * 2 / 3; averaged over seeds, 903 - 901.5 * 2 / 3 = 302.0.
    assert "302.0 [" in text
    assert "complete" in text and "Warnings" not in text


def test_a_model_based_run_gets_a_model_error_panel(tmp_path, monkeypatch):
    a = write_run(tmp_path / "a", "sac", {"cartpole-balance": 500.0}, tasks=("cartpole-balance",))
    b = write_run(tmp_path / "b", "mbpo", {"cartpole-balance": 400.0}, tasks=("cartpole-balance",), model_error=True)
    figures = {}
    original = report.diagnostics_figure

    def keep(task, runs, reps):
        figures[tuple(r.label for r in runs)] = fig = original(task, runs, reps)
        return fig

    monkeypatch.setattr(report, "diagnostics_figure", keep)
    make_report([str(a)], str(tmp_path / "one"), reps=200)
    make_report([str(a), str(b)], str(tmp_path / "two"), reps=200)
    assert len(figures[("sac",)].axes) == 2
    axes = figures[("sac", "mbpo")].axes
    assert len(axes) == 3 and "model" in axes[2].get_title()
    assert [line.get_label() for line in axes[2].get_lines()] == ["mbpo: train", "mbpo: held-out"]


def test_report_reads_a_run_in_progress_and_warns_on_bad_lines(tmp_path):
    run = write_run(tmp_path / "run", "live", {"cartpole-balance": 800.0}, tasks=("cartpole-balance",),
                    total=1000, summary=False, diagnostics=False)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 400, "seed": 0, "task": "cartpole-balance", "train_ret\n')  # killed mid-write
    with pytest.warns(UserWarning, match="metrics.jsonl:13: malformed metrics line skipped"):
        result = make_report([str(run)], str(tmp_path / "report"), reps=200)
    text = open(result["report"]).read()
    assert "in progress" in text and "300 / 1,000" in text
    assert "## Warnings" in text and "metrics.jsonl:13" in text
    assert not any("diagnostics" in p for p in result["figures"])


def test_resumed_run_keeps_the_last_record_of_each_step(tmp_path):
    run = write_run(tmp_path / "run", "r", {"cartpole-balance": 100.0}, tasks=("cartpole-balance",), seeds=1)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 300, "seed": 0, "task": "cartpole-balance", "eval_return": 42.0}) + "\n")
    data = load_run(str(run))
    assert len(data.rows) == 3 and data.final("cartpole-balance", "eval_return").tolist() == [42.0]


def test_runs_with_different_action_repeats_are_plotted_against_frames(tmp_path):
    a = write_run(tmp_path / "a", "ar1", {"cartpole-balance": 500.0}, tasks=("cartpole-balance",), action_repeat=1)
    b = write_run(tmp_path / "b", "ar2", {"cartpole-balance": 500.0}, tasks=("cartpole-balance",))
    fig_path = make_report([str(a), str(b)], str(tmp_path / "report"), reps=200)["figures"]
    assert any(p.endswith("curves_cartpole-balance.png") for p in fig_path)
    from vecrl.report import curves_figure  # pylint: disable=import-outside-toplevel

    fig = curves_figure("cartpole-balance", [load_run(str(a)), load_run(str(b))], reps=100)
    assert fig.axes[0].get_xlabel() == "env frames"


def test_same_spec_names_get_folder_labels(tmp_path):
    a = write_run(tmp_path / "first", "same", {"cartpole-balance": 1.0}, tasks=("cartpole-balance",))
    b = write_run(tmp_path / "second", "same", {"cartpole-balance": 2.0}, tasks=("cartpole-balance",))
    text = open(make_report([str(a), str(b)], str(tmp_path / "report"), reps=200)["report"]).read()
    assert "same (first)" in text and "same (second)" in text


def test_bad_input_and_output_folders(tmp_path, capsys):
    with pytest.raises(ReportError, match="not a vecrl run folder"):
        make_report([str(tmp_path)], str(tmp_path / "report"))
    run = write_run(tmp_path / "run", "r", {"cartpole-balance": 1.0}, tasks=("cartpole-balance",))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not written by `vecrl report`"):
        make_report([str(run)], str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    # A folder an earlier report wrote is replaced; the default folder for one run is RUN_DIR/report.
    assert cli.main(["report", str(run), "--reps", "200"]) == 0
    assert cli.main(["report", str(run), "--reps", "200"]) == 0
    assert os.path.exists(os.path.join(run, "report", "report.md"))
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a vecrl run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------- which return: report_return
def headed_sections(text):
    """The report's "## " sections in order, as (heading, body)."""
    parts = text.split("\n## ")[1:]
    return [tuple(part.split("\n", 1)) for part in parts]


def table_row(body, first_cell):
    (row,) = [line for line in body.splitlines() if line.startswith(f"| {first_cell} |")]
    return row


def position(sections, heading):
    return [h for h, _ in sections].index(heading)


def test_return_key_names_the_metrics_field():
    assert return_key("train") == "train_return" and return_key("eval") == "eval_return"


def test_specs_naming_training_returns_lead_with_them_and_both_returns_are_reported(tmp_path):
    # Training returns end 100 below evaluation returns, so each section's numbers show which return it used.
    a = write_run(tmp_path / "a", "alpha0", {"cartpole-balance": 500.0, "cartpole-swingup": 200.0}, seeds=3,
                  report_return="train", train_offset=100.0)
    b = write_run(tmp_path / "b", "alpha0.05", {"cartpole-balance": 900.0, "cartpole-swingup": 400.0}, seeds=3,
                  report_return="train", train_offset=100.0)
    result = make_report([str(a), str(b)], str(tmp_path / "report"), reps=200)
    assert {os.path.basename(p) for p in result["figures"]} >= {"aggregates_train.png", "aggregates_eval.png"}
    text = open(result["report"]).read()
    assert 'The run specs name training-episode returns (report_return = "train")' in text
    sections = headed_sections(text)
    body = dict(sections)
    mark = " (the return the specs name)"
    for train_heading, eval_heading in (
            ("Final training return", "Final evaluation return"),
            ("Aggregate scores: training-episode returns", "Aggregate scores: evaluation returns"),
            ("Average regret: training-episode returns",
             "Average regret: evaluation returns")):
        assert position(sections, train_heading + mark) < position(sections, eval_heading)
        assert eval_heading + mark not in body
    # Aggregates of alpha0.05, mean over seeds 0..2 of each task's final return, / 1000, averaged over the tasks:
    # training (800 + 1 + 300 + 1) / 2000, evaluation (900 + 1 + 400 + 1) / 2000.
    train_aggregates = body["Aggregate scores: training-episode returns" + mark]
    eval_aggregates = body["Aggregate scores: evaluation returns"]
    assert "`train_return`" in train_aggregates and "| alpha0.05 | 0.551 [" in train_aggregates
    assert "0.651 [" not in train_aggregates
    assert "`eval_return`" in eval_aggregates and "0.651 [" in eval_aggregates and "0.551 [" not in eval_aggregates
    # Regret on balance, against the best of both runs (seed 2 of alpha0.05): each seed's returns rise linearly over
    # 3 equally weighted points, so average to 2/3 of the final one. Training: 802 - 801 * 2 / 3 = 268.0;
    # evaluation: 902 - 901 * 2 / 3 = 301.3.
    train_regret = body["Average regret: training-episode returns" + mark]
    eval_regret = body["Average regret: evaluation returns"]
    assert "`train_return`" in train_regret and "| 268.0 [" in table_row(train_regret, "cartpole-balance")
    assert "`eval_return`" in eval_regret and "| 301.3 [" in table_row(eval_regret, "cartpole-balance")


def test_evaluation_regret_weighs_each_evaluation_equally(tmp_path):
    """Evaluations at steps 200 and 400 of 4 training chunks whose episode counts differ: training regret weighs
    chunks by episodes, evaluation regret weighs both evaluations the same."""
    path = tmp_path / "run"
    os.makedirs(path)
    spec = {"name": "r", "agent": "madtd", "tasks": ["cartpole-balance"], "seeds": [0, 1], "report_return": "train",
            "train": {"steps": 400, "action_repeat": 2}}
    with open(path / "config.json", "w") as f:
        json.dump({"spec": spec, "device": "cpu"}, f)
    # (step, seed, train_return, train_episodes, eval_return)
    logged = [(100, 0, 100.0, 1, None), (200, 0, 200.0, 3, 300.0), (300, 0, 400.0, 1, None), (400, 0, None, 0, 600.0),
              (100, 1, 300.0, 1, None), (200, 1, 500.0, 2, 500.0), (300, 1, 700.0, 1, None), (400, 1, 800.0, 1, 900.0)]
    with open(path / "metrics.jsonl", "w") as f:
        for step, seed, train, episodes, evaluation in logged:
            f.write(json.dumps({"step": step, "seed": seed, "task": "cartpole-balance", "train_return": train,
                                "train_episodes": episodes, "eval_return": evaluation}) + "\n")
    run = load_run(str(path))
    # Evaluation: best 900; seed 0 900 - (300 + 600) / 2 = 450, seed 1 900 - (500 + 900) / 2 = 200; mean 325.
    # (Weighing by the chunks' episode counts would give 600 and 266.7.)
    evaluation = regrets([run], ["cartpole-balance"], 200, "eval_return")[("r", "cartpole-balance")]
    assert evaluation[0] == pytest.approx(325.0)
    # Training: best 800; seed 0 800 - (100 + 3 * 200 + 400) / 5 = 580, seed 1 800 - (300 + 2 * 500 + 700 + 800) / 5
    # = 240; mean 410.
    training = regrets([run], ["cartpole-balance"], 200, "train_return")[("r", "cartpole-balance")]
    assert training[0] == pytest.approx(410.0)
    text = open(make_report([str(path)], str(tmp_path / "report"), reps=200)["report"]).read()
    body = dict(headed_sections(text))
    assert "325.0 [" in body["Average regret: evaluation returns"]
    assert "410.0 [" in body["Average regret: training-episode returns (the return the specs name)"]


def test_old_run_folder_without_report_return_is_treated_as_eval(tmp_path):
    run = write_run(tmp_path / "old", "old", {"cartpole-balance": 500.0}, tasks=("cartpole-balance",))
    with open(os.path.join(run, "config.json")) as f:
        assert "report_return" not in json.load(f)["spec"]
    data = load_run(str(run))
    assert data.report_return == "eval" and report_order([data]) == (["eval", "train"], "eval")
    sections = headed_sections(open(make_report([str(run)], str(tmp_path / "report"), reps=200)["report"]).read())
    mark = " (the return the specs name)"
    assert position(sections, "Aggregate scores: evaluation returns" + mark) < position(
        sections, "Aggregate scores: training-episode returns")
    assert position(sections, "Average regret: evaluation returns" + mark) < position(
        sections, "Average regret: training-episode returns")
    assert position(sections, "Final evaluation return" + mark) < position(sections, "Final training return")


def test_runs_disagreeing_on_report_return_lead_with_eval_and_say_so(tmp_path):
    a = write_run(tmp_path / "a", "madtd", {"cartpole-balance": 500.0}, tasks=("cartpole-balance",),
                  report_return="train")
    b = write_run(tmp_path / "b", "dyna", {"cartpole-balance": 500.0}, tasks=("cartpole-balance",))
    assert report_order([load_run(str(a)), load_run(str(b))]) == (["eval", "train"], None)
    text = open(make_report([str(a), str(b)], str(tmp_path / "report"), reps=200)["report"]).read()
    assert "disagree on which return their specs name (report_return: madtd: train, dyna: eval)" in text
    assert "the return the specs name" not in text
    sections = headed_sections(text)
    assert position(sections, "Aggregate scores: evaluation returns") < position(
        sections, "Aggregate scores: training-episode returns")
    assert position(sections, "Average regret: evaluation returns") < position(
        sections, "Average regret: training-episode returns")


def test_run_without_evaluations_yet_reports_training_returns(tmp_path):
    run = write_run(tmp_path / "run", "live", {"cartpole-balance": 800.0}, tasks=("cartpole-balance",), seeds=3,
                    total=1000, summary=False, diagnostics=False, evals=False, report_return="train")
    result = make_report([str(run)], str(tmp_path / "report"), reps=200)
    assert [os.path.basename(p) for p in result["figures"] if "aggregates" in p] == ["aggregates_train.png"]
    body = dict(headed_sections(open(result["report"]).read()))
    mark = " (the return the specs name)"
    assert body["Aggregate scores: evaluation returns"].startswith("\nNone yet")
    assert body["Average regret: evaluation returns"].startswith("\nNone yet")
    assert "| live | 0.801 [" in body["Aggregate scores: training-episode returns" + mark]


def test_unknown_report_return_is_refused(tmp_path):
    run = write_run(tmp_path / "run", "r", {"cartpole-balance": 1.0}, tasks=("cartpole-balance",),
                    report_return="best")
    with pytest.raises(ReportError, match="report_return must be one of"):
        load_run(str(run))
