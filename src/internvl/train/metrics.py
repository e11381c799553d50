"""Training metrics: a CSV file, TensorBoard (when installed) and a loss-curve PNG, written by rank 0 only.
The CSV is rewritten atomically (a resume reads it); an unwritable one is a one-line TrainingError."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import TrainingError

COLUMNS = (
    "step",
    "epoch",
    "loss",
    "token_ce",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "samples",
    "elapsed_s",
)


class MetricsLog:
    """Appends one row per logged step to OUT/metrics.csv; on resume, rows after the resumed step are dropped
    so the file describes one consistent run."""

    def __init__(self, out: str | Path, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out) / "metrics.csv"
        self.tb = None
        self.note = ""
        self.extra: list[str] = []
        if not enabled:
            return
        rows = _read_rows(self.path) if resume_step else []
        rows = [r for r in rows if int(float(r["step"])) <= resume_step]
        # objectives add their own metrics (e.g. MPO's rewards/*): columns after the fixed ones, in first-seen order
        self.columns = list(COLUMNS) + [k for r in rows[:1] for k in r if k not in COLUMNS]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from None
        self._rewrite(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(Path(out) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:
                self.note = (
                    "TensorBoard is not installed (pip install tensorboard): metrics go to metrics.csv only"
                )

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, self.path)
        except OSError as e:
            raise self._unwritable(e) from None

    def _unwritable(self, e: OSError) -> TrainingError:
        return TrainingError(f"{e.filename or self.path}: cannot write the training metrics ({e.strerror or e})")

    def log(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = [k for k in row if k not in self.columns]
        if new:  # a metric seen for the first time widens the header (rare: normally the first logged row)
            rows = _read_rows(self.path)
            self.columns += new
            self._rewrite(rows)
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                    {k: _fmt(row.get(k)) for k in self.columns}
                )
        except OSError as e:
            raise self._unwritable(e) from None
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in ("step", "epoch") and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.8g}"
    return v


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """metrics.csv as a list of {column: float} rows (empty cells are skipped)."""
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in _read_rows(Path(path))]


def plot_loss(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss (and learning rate) against steps; None when matplotlib is missing or fewer than two steps were logged
    (one point draws no curve)."""
    rows = [r for r in read_metrics(csv_path) if "loss" in r]
    if len(rows) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("training loss")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
