"""A run folder's layout, in one place: every command that writes or reads a run (train, evaluate, analyze,
report, cv, compare-models, check, view, export qupath, predict) names its files through :class:`RunFiles`.

    config.yaml  history.csv  predictions.csv  metrics.json  data_splits.npz  report.html
    checkpoints/best.pth  checkpoints/last.pth
    attention/patches.csv  attention/slices.csv  attention/cases.csv  attention/summary.json …
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
ATTENTION = "attention"
BEST = "best"
LAST = "last"


@dataclass(frozen=True)
class RunFiles:
    root: Path

    @classmethod
    def of(cls, root: str | Path) -> RunFiles:
        return cls(Path(root))

    def checkpoint(self, name: str = BEST) -> Path:
        """``checkpoints/<name>.pth`` (``best``: the best epoch; ``last``: where a killed run resumes)."""
        return self.root / CHECKPOINTS / f"{name}.pth"

    @property
    def best(self) -> Path:
        return self.checkpoint(BEST)

    @property
    def last(self) -> Path:
        return self.checkpoint(LAST)

    @property
    def attention(self) -> Path:
        """The analysis folder (``stainmil analyze``)."""
        return self.root / ATTENTION

    def table(self, name: str) -> Path:
        """``attention/<name>.csv`` (patches, slices, cases, lesion_cases, …)."""
        return self.attention / f"{name}.csv"

    @property
    def patches(self) -> Path:
        return self.table("patches")


def glob_runs(folder: Path, what: str = "best") -> set[Path]:
    """The run folders at or under ``folder`` holding a best checkpoint (``what='best'``) or an analysis
    (``what='patches'``)."""
    pattern = f"{CHECKPOINTS}/{BEST}.pth" if what == "best" else f"{ATTENTION}/patches.csv"
    return {p.parent.parent for p in Path(folder).rglob(pattern)}
