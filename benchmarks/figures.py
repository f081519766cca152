"""Helpers shared by the benchmark scripts' plots: a headless pyplot, and lay out, save and close a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported only when a script plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path | str, dpi: int = 120) -> Path:
    """``fig.tight_layout()``, save to ``path`` at ``dpi``, close the figure (frees its memory); returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
