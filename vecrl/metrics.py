"""Per-seed metrics as JSONL, and the progress display."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

from tqdm import tqdm


class MetricsWriter:
    """Appends one JSON object per (chunk, seed, task). Lines are flushed per chunk, so a run in progress or
    killed mid-way leaves a readable file (at worst one truncated last line, which `read` skips)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> float:
        """Drop records past `step` (written after the checkpoint being resumed); returns the wall time so far."""
        rows = [r for r in self.read() if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        return rows[-1]["wall_time"] if rows else 0.0


REQUIRED_KEYS = ("step", "seed", "task")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file; a line that is not a JSON record with step, seed and task (a line cut short
    by a kill, an edit) is skipped with a warning naming it, and the valid rest is returned."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or any(k not in row for k in REQUIRED_KEYS):
                warnings.warn(f"{path}:{n}: malformed metrics line skipped", stacklevel=2)
                continue
            rows.append(row)
    return rows


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


class Progress:
    """Agent steps/s, the latest mean training and evaluation returns, and flagged seeds."""

    def __init__(self, spec, initial_step: int, enabled: bool = True):
        self.bar = tqdm(total=spec.train.steps, initial=initial_step, unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, desc=spec.name)
        self.flagged: set = set()

    def note(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def update(self, steps: int, records: list[dict], seconds: float) -> None:
        for r in records:
            if r["env_nan"] or r["rejected_updates"]:
                self.flagged.add((r["seed"], r["task"]))
        postfix = {"steps/s": f"{steps / seconds:.0f}"}
        train = _mean([r["train_return"] for r in records])
        if train is not None:
            postfix["return"] = f"{train:.1f}"
        evals = _mean([r["eval_return"] for r in records])
        if evals is not None:
            postfix["eval"] = f"{evals:.1f}"
        if self.flagged:
            postfix["flagged"] = ",".join(f"{s}/{t}" for s, t in sorted(self.flagged))
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
