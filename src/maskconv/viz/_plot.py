"""matplotlib plumbing shared by the pictures: headless backend, safe saving."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported lazily: the `viz` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 100, top: float = 1.0, bottom: float = 0.0) -> Path:
    """Tight layout (between ``bottom`` and ``top``, leaving room for a figure legend / suptitle), write ``path``
    (creating its folder), close."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, bottom, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
