"""`vecrl report RUN_DIR [RUN_DIR ...]`: learning curves, final returns, aggregate scores and average regret with
bootstrap confidence intervals, and the paper's critic diagnostics, as PNG figures and a markdown summary.

Final returns, aggregates and regret are given for both episode returns, evaluation (deterministic policy) and
training (with exploration); the one the run specs name in `report_return` (the one their paper plots) comes
first and is marked as theirs.

It reads run folders only (config.json, metrics.jsonl, and summary.json once a run has stopped), so it works on
a run in progress, an interrupted one and a resumed one. Several runs (e.g. alpha 0 against 0.05) share every
figure; each gets one colour.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings

import numpy as np
from matplotlib.figure import Figure

from vecrl import stats
from vecrl.metrics import read_metrics

RETURN_MAX = 1000.0  # every DMC task's episode return lies in [0, 1000]: scores are return / 1000
MARKER = ".vecrl-report"  # marks a folder this command wrote, which a later report may replace
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")


RETURNS = ("eval", "train")  # a spec's `report_return` values, in the order used when the runs disagree
RETURN_NOUNS = {"eval": "evaluation returns", "train": "training-episode returns"}
FINAL_TITLES = {"eval": "Final evaluation return", "train": "Final training return"}
REGRET_DEFINITIONS = {
    "train": "MAD-TD paper, section 5.2: mean over training episodes of (best training return any of these runs "
             "reached on the task - episode return), each logged chunk weighted by the episodes that ended in it",
    "eval": "mean over evaluations, each weighted equally, of (best evaluation return any of these runs reached on "
            "the task - that evaluation's return): the MAD-TD paper's section 5.2 regret, on the deterministic "
            "evaluation returns instead of the training episodes"}


class ReportError(RuntimeError):
    """Run folders that cannot be reported; the message says why."""


def return_key(report_return: str) -> str:
    """The metrics.jsonl field holding the episode return a spec's `report_return` names."""
    return {"eval": "eval_return", "train": "train_return"}[report_return]


def episode_weight(row: dict, key: str) -> int:
    """How many episodes a metrics row's `key` return stands for in a mean over episodes: a chunk's training
    return is the mean of the `train_episodes` episodes that ended in it; each evaluation counts once (its return
    is already the mean of its deterministic episodes, and evaluations are evenly spaced in steps)."""
    return row.get("train_episodes", 1) if key == "train_return" else 1


@dataclasses.dataclass
class RunData:
    label: str
    path: str
    spec: dict
    device: str
    rows: list[dict]  # one per (seed, task, step), the last written wins, ordered by step
    summary: dict | None

    @property
    def tasks(self) -> list[str]:
        return list(self.spec["tasks"])

    @property
    def seeds(self) -> list[int]:
        return list(self.spec["seeds"])

    @property
    def action_repeat(self) -> int:
        return int(self.spec["train"]["action_repeat"])

    @property
    def report_return(self) -> str:
        return self.spec.get("report_return", "eval")  # run folders from before the field existed reported eval

    @property
    def step(self) -> int:
        return max((r["step"] for r in self.rows), default=0)

    @property
    def status(self) -> str:
        if self.summary is not None and self.summary.get("step") == self.step:
            return self.summary["status"]
        return "in progress" if self.rows else "no metrics yet"

    @property
    def wall_time(self) -> float:
        return max((r.get("wall_time") or 0.0 for r in self.rows), default=0.0)

    def series(self, task: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Agent steps [S] at which any seed logged `key`, and the values [seeds, S] (NaN where a seed has none)."""
        rows = [r for r in self.rows if r["task"] == task and r.get(key) is not None]
        steps = np.array(sorted({r["step"] for r in rows}), int)
        values = np.full((len(self.seeds), steps.size), np.nan)
        seed_index, step_index = {s: i for i, s in enumerate(self.seeds)}, {s: i for i, s in enumerate(steps)}
        for r in rows:
            if r["seed"] in seed_index:
                values[seed_index[r["seed"]], step_index[r["step"]]] = r[key]
        return steps, values

    def final(self, task: str, key: str) -> np.ndarray:
        """Each seed's last logged value of `key` (seeds without one are left out)."""
        _, values = self.series(task, key)
        last = [row[~np.isnan(row)][-1] for row in values if np.any(~np.isnan(row))]
        return np.array(last, float)

    def flagged(self, task: str) -> list[int]:
        return sorted({r["seed"] for r in self.rows if r["task"] == task
                       and (r.get("env_nan") or r.get("rejected_updates"))})


def load_run(path: str) -> RunData:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ReportError(f"{path} is not a vecrl run folder (no config.json)")
    try:
        with open(config_path) as f:
            config = json.load(f)
        spec = config["spec"]
        if not all(k in spec for k in ("tasks", "seeds", "train")) or "action_repeat" not in spec["train"]:
            raise KeyError("spec.tasks, seeds or train.action_repeat")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ReportError(f"{config_path} is not a vecrl run config (missing {e})") from None
    if spec.get("report_return", "eval") not in RETURNS:
        raise ReportError(f"{config_path}: spec.report_return must be one of {RETURNS}, "
                          f"got {spec['report_return']!r}")
    latest = {}
    for r in read_metrics(os.path.join(path, "metrics.jsonl")):
        latest[(r["seed"], r["task"], r["step"])] = r  # a resumed run rewrote what followed its checkpoint
    rows = sorted(latest.values(), key=lambda r: (r["step"], r["task"], r["seed"]))
    if not rows:
        warnings.warn(f"{path}: no metrics yet", stacklevel=2)
    summary = None
    summary_path = os.path.join(path, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    return RunData(label=spec.get("name", os.path.basename(path)), path=os.path.abspath(path), spec=spec,
                   device=config.get("device", "?"), rows=rows, summary=summary)


def _unique_labels(runs: list[RunData]) -> None:
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.label} ({os.path.basename(r.path)})"


def prepare_out_dir(out: str) -> str:
    """A new folder, or one an earlier report wrote (its files are replaced); never a folder holding anything else."""
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
        raise ReportError(f"{out} exists and was not written by `vecrl report`; nothing there is overwritten. "
                          "Choose another --out.")
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, MARKER), "w") as f:
            f.write("written by vecrl report; a later report into this folder replaces its files\n")
    except OSError as e:
        raise ReportError(f"cannot write the report to {out}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------- figures
def _band(ax, x, values, color, label, reps, per_seed=True, linestyle="-"):
    """Mean over seeds with its 95% bootstrap band, and (optionally) each seed as a thin line."""
    if values.size == 0:
        return
    mean, lo, hi = stats.mean_ci(values, reps)
    if per_seed:
        for row in values:
            ok = ~np.isnan(row)
            ax.plot(x[ok], row[ok], color=color, lw=0.5, alpha=0.3)
    ax.plot(x, mean, color=color, lw=1.8, label=label, linestyle=linestyle)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def _x_axis(runs: list[RunData]) -> tuple[str, dict[str, int]]:
    """Agent steps when every run shares one action repeat (env frames on the top axis), else env frames."""
    repeats = {r.action_repeat for r in runs}
    if len(repeats) == 1:
        return "agent steps", {r.label: 1 for r in runs}
    return "env frames", {r.label: r.action_repeat for r in runs}


def _frames_axis(ax, runs: list[RunData]) -> None:
    repeats = {r.action_repeat for r in runs}
    if len(repeats) == 1:
        (k,) = repeats
        top = ax.secondary_xaxis("top", functions=(lambda x: x * k, lambda x: x / k))
        top.set_xlabel(f"env frames (action repeat {k})", fontsize=8)
        top.tick_params(labelsize=7)


def curves_figure(task: str, runs: list[RunData], reps: int) -> Figure:
    xlabel, scale = _x_axis(runs)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("train_return", "eval_return"),
                              ("training episodes (with exploration)", "evaluation episodes (deterministic)")):
        for i, run in enumerate(runs):
            steps, values = run.series(task, key)
            _band(ax, steps * scale[run.label], values, COLORS[i % len(COLORS)], run.label, reps)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if xlabel == "agent steps":
            _frames_axis(ax, runs)
    axes[0].set_ylabel("episode return")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{task}: mean over seeds, 95% bootstrap band, thin lines = seeds", fontsize=11)
    return fig


def diagnostics_figure(task: str, runs: list[RunData], reps: int) -> Figure | None:
    if not any(run.series(task, k)[0].size for run in runs for k in ("q_pred", "td_error/train")):
        return None
    xlabel, scale = _x_axis(runs)
    with_model = any(run.series(task, "model_error/held_out")[0].size for run in runs)
    fig = Figure(figsize=(16.5 if with_model else 11, 4.2), layout="constrained")
    ax_q, ax_loss, *ax_model = fig.subplots(1, 3 if with_model else 2)
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        for key, style, what in (("q_pred", "-", "Q(s, pi(s))"), ("q_mc", "--", "Monte-Carlo return")):
            steps, values = run.series(task, key)
            _band(ax_q, steps * scale[run.label], values, color, f"{run.label}: {what}", reps, False, style)
        for key, style, what in (("td_error/train", "-", "train"), ("td_error/held_out", "--", "held-out"),
                                 ("td_error/on_policy", ":", "on-policy held-out")):
            steps, values = run.series(task, key)
            _band(ax_loss, steps * scale[run.label], values, color, f"{run.label}: {what}", reps, False, style)
        for ax in ax_model:  # agents with a one-step model (MBPO): its error on the same two sets of transitions
            for key, style, what in (("model_error/train", "-", "train"), ("model_error/held_out", "--", "held-out")):
                steps, values = run.series(task, key)
                _band(ax, steps * scale[run.label], values, color, f"{run.label}: {what}", reps, False, style)
            ax.set_title("one-step model squared error: train, held-out", fontsize=10)
            ax.set_yscale("log")
    ax_q.set_title("value overestimation: predicted vs obtained (discounted)", fontsize=10)
    ax_loss.set_title("critic squared TD error: train, held-out, on-policy held-out", fontsize=10)
    ax_loss.set_yscale("log")
    for ax in (ax_q, ax_loss, *ax_model):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    what = "critic and model" if with_model else "critic"
    fig.suptitle(f"{task}: {what} diagnostics at evaluation steps (mean over seeds, 95% bootstrap band)", fontsize=11)
    return fig


AGGREGATE_NAMES = {"median": "Median", "iqm": "IQM", "mean": "Mean", "optimality_gap": "Optimality gap"}


def aggregates_figure(intervals: dict[str, dict], labels: list[str], heading: str) -> Figure:
    fig = Figure(figsize=(11, 1.0 + 0.45 * len(labels)), layout="constrained")
    axes = fig.subplots(1, 4, sharey=True)
    for ax, (name, title) in zip(axes, AGGREGATE_NAMES.items()):
        for i, label in enumerate(labels):
            est, lo, hi = intervals[label][name]
            color = COLORS[i % len(COLORS)]
            ax.barh(i, hi - lo, left=lo, height=0.6, color=color, alpha=0.6)
            ax.plot([est, est], [i - 0.3, i + 0.3], color="black", lw=1.5)
        ax.margins(x=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("normalised score (return / 1000)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels)
    fig.suptitle(heading, fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------- tables
def _fmt(est: float, lo: float, hi: float, digits: int = 1) -> str:
    if np.isnan(est):
        return "-"
    return f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def final_returns(runs: list[RunData], tasks: list[str], key: str, reps: int) -> dict:
    """(label, task) -> (mean, low, high, number of seeds) of each seed's last `key`."""
    out = {}
    for run in runs:
        for task in tasks:
            values = run.final(task, key) if task in run.tasks else np.array([])
            if values.size:
                mean, lo, hi = stats.mean_ci(values, reps)
                out[(run.label, task)] = (float(mean), float(lo), float(hi), values.size)
    return out


def aggregate_scores(runs: list[RunData], tasks: list[str], key: str, reps: int) -> dict[str, dict]:
    """label -> the aggregates (stats.aggregate_intervals) of each seed's last `key` / 1000 over `tasks`, for the
    runs that have a value on every one of them (a run in progress may have none yet)."""
    out = {}
    for run in runs:
        scores = [run.final(task, key) / RETURN_MAX for task in tasks]
        if scores and all(s.size for s in scores):
            out[run.label] = stats.aggregate_intervals(scores, reps)
    return out


def regrets(runs: list[RunData], tasks: list[str], reps: int, key: str) -> dict:
    """(label, task) -> (mean, low, high) over seeds of the average regret of the `key` returns, against the best
    `key` return any of the runs reached on that task (the paper's lower bound on the optimum). Each training
    chunk is weighted by its episode count, each evaluation equally (episode_weight)."""
    out = {}
    for task in tasks:
        best = max((np.nanmax(v) for run in runs if task in run.tasks
                    for v in [run.series(task, key)[1]] if np.any(~np.isnan(v))), default=None)
        if best is None:
            continue
        for run in runs:
            if task not in run.tasks:
                continue
            per_seed = []
            for seed in run.seeds:
                rows = [r for r in run.rows if r["task"] == task and r["seed"] == seed and r.get(key) is not None]
                if rows:
                    per_seed.append(stats.average_regret([r[key] for r in rows],
                                                         [episode_weight(r, key) for r in rows], best))
            if per_seed:
                mean, lo, hi = stats.mean_ci(np.array(per_seed), reps)
                out[(run.label, task)] = (float(mean), float(lo), float(hi))
    return out


def report_order(runs: list[RunData]) -> tuple[list[str], str | None]:
    """The two returns in the order the report gives them, and the one every run's spec names (None when the
    runs disagree, and then evaluation leads)."""
    named = {run.report_return for run in runs}
    if len(named) != 1:
        return list(RETURNS), None
    (name,) = named
    return [name] + [r for r in RETURNS if r != name], name


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------------------------------------- report
def make_report(run_dirs: list[str], out: str, reps: int = 2000) -> dict:
    """Write report.md and PNG figures into `out`; returns {"report": path, "figures": [paths], "warnings": [...]}."""
    if not run_dirs:
        raise ReportError("name at least one run folder")
    if reps < 100:
        raise ReportError(f"--reps must be at least 100 for a 95% interval, got {reps}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = [load_run(d) for d in run_dirs]
    notes = [str(w.message) for w in caught]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    _unique_labels(runs)
    out = prepare_out_dir(out)
    tasks = list(dict.fromkeys(t for run in runs for t in run.tasks))
    labels = [run.label for run in runs]
    figures, sections = [], []

    def save(fig: Figure, name: str) -> str:
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        figures.append(path)
        return name

    sections.append(_table(
        ["run", "agent", "status", "agent steps", "seeds", "wall time", "device", "folder"],
        [[r.label, r.spec.get("agent", "?"), r.status, f"{r.step:,} / {r.spec['train']['steps']:,}",
          str(len(r.seeds)), f"{r.wall_time / 60:.1f} min", r.device, f"`{r.path}`"] for r in runs]))

    order, named = report_order(runs)
    if named is None:
        sections.append("The runs disagree on which return their specs name (report_return: "
                        + ", ".join(f"{r.label}: {r.report_return}" for r in runs)
                        + "), so evaluation returns come first below.")
    else:
        sections.append(f"The run specs name {RETURN_NOUNS[named]} (report_return = \"{named}\"): those tables "
                        "come first below and are marked.")

    def marked(title: str, ret: str) -> str:
        return f"{title} (the return the specs name)" if ret == named else title

    for ret in order:
        key = return_key(ret)
        finals = final_returns(runs, tasks, key, reps)
        rows = [[task] + [_fmt(*finals[(lab, task)][:3]) + f" (n={finals[(lab, task)][3]})"
                          if (lab, task) in finals else "-" for lab in labels] for task in tasks]
        sections.append(f"## {marked(FINAL_TITLES[ret], ret)}\n\nMean over seeds of each seed's last `{key}`, "
                        f"with a 95% bootstrap interval.\n\n" + _table(["task"] + labels, rows))

    common = [t for t in tasks if all(t in run.tasks for run in runs)]
    for ret in order:
        key = return_key(ret)
        title = marked(f"Aggregate scores: {RETURN_NOUNS[ret]}", ret)
        intervals = aggregate_scores(runs, common, key, reps)
        if not intervals:
            sections.append(f"## {title}\n\nNone yet: no run has a final `{key}` on every task the runs share.")
            continue
        rows = [[lab] + [_fmt(*intervals[lab][k], digits=3) for k in AGGREGATE_NAMES] for lab in intervals]
        name = save(aggregates_figure(intervals, list(intervals), title), f"aggregates_{ret}.png")
        sections.append(
            f"## {title}\n\nEach seed's last `{key}` / 1000 over {len(common)} task(s) ({', '.join(common)}), "
            f"with 95% stratified-bootstrap intervals ({reps} replicates; Agarwal et al. 2021). IQM: interquartile "
            f"mean of all (task, seed) scores; optimality gap: mean shortfall below 1 (lower is better).\n\n"
            + _table(["run"] + list(AGGREGATE_NAMES.values()), rows) + f"\n\n![aggregates]({name})")

    for ret in order:
        key = return_key(ret)
        title = marked(f"Average regret: {RETURN_NOUNS[ret]}", ret)
        reg = regrets(runs, tasks, reps, key)
        if not reg:
            sections.append(f"## {title}\n\nNone yet: no run has logged a `{key}`.")
            continue
        rows = [[task] + [_fmt(*reg[(lab, task)]) if (lab, task) in reg else "-" for lab in labels]
                for task in tasks]
        sections.append(f"## {title}\n\nUses `{key}`: {REGRET_DEFINITIONS[ret]}; mean over seeds with a 95% bootstrap "
                        "interval. Lower is better.\n\n" + _table(["task"] + labels, rows))

    for task in tasks:
        with_task = [run for run in runs if task in run.tasks]
        parts = [f"## {task}\n\n![curves]({save(curves_figure(task, with_task, reps), f'curves_{task}.png')})"]
        diag = diagnostics_figure(task, with_task, reps)
        if diag is not None:
            parts.append(f"![diagnostics]({save(diag, f'diagnostics_{task}.png')})\n\nLeft: the critic's "
                         "Q(s, pi(s)) against the discounted return the deterministic policy then obtained, over "
                         "the evaluation episodes' states. Then the critic's squared TD error on training "
                         "minibatches, on held-out transitions, and on held-out states stepped with the current "
                         "target policy's action (paper Fig. 2 left); for agents with a one-step model (MBPO), a "
                         "third panel gives its squared error on training and on held-out transitions.")
        flagged = {run.label: run.flagged(task) for run in with_task if run.flagged(task)}
        if flagged:
            parts.append("Flagged seeds (a NaN in the physics or a rejected update): "
                         + "; ".join(f"{lab}: {seeds}" for lab, seeds in flagged.items()))
        sections.append("\n\n".join(parts))

    if notes:
        sections.append("## Warnings\n\n" + "\n".join(f"- {n}" for n in notes))
    text = (f"# vecrl report\n\nMade {time.strftime('%Y-%m-%d %H:%M')} from {len(runs)} run(s).\n\n"
            + "\n\n".join(sections) + "\n")
    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write(text)
    return {"report": report, "figures": figures, "warnings": notes}
