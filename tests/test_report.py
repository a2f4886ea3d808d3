"""`vecrl report` and its statistics, on synthetic run folders whose right answers are known."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from vecrl import cli, stats
from vecrl.report import ReportError, load_run, make_report


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
              total=300, diagnostics=True, summary=True, action_repeat=2):
    """A run folder as the trainer writes it: eval and training returns rise linearly to `final_eval[task]` +
    seed, and each chunk holds one finished training episode."""
    os.makedirs(path)
    spec = {"name": name, "agent": "madtd", "tasks": list(tasks), "seeds": list(range(seeds)),
            "train": {"steps": total, "action_repeat": action_repeat}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"spec": spec, "device": "cpu"}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in steps:
            for task in tasks:
                for seed in range(seeds):
                    value = (final_eval[task] + seed) * step / steps[-1]
                    rec = {"step": step, "seed": seed, "task": task, "frames": step * action_repeat,
                           "train_return": value, "train_episodes": 1, "eval_return": value, "env_nan": False,
                           "rejected_updates": 0, "wall_time": step / 10}
                    if diagnostics:
                        rec.update({"q_pred": value / 10, "q_mc": value / 12, "td_error/train": 1.0,
                                    "td_error/held_out": 1.5, "td_error/on_policy": 2.0})
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
    assert names == ["aggregates.png", "curves_cartpole-balance.png", "curves_cartpole-swingup.png",
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
