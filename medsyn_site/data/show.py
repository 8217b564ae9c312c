"""PNG montages of a cohort: axial slices in a lung window (the nodule's slice also in a mediastinal
window) and a coronal slice, the mask outlined."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medsyn_site.atomic import atomic_write  # noqa: E402

LUNG_WINDOW = (-1350, 150)  # W 1500, L -600
MEDIASTINAL_WINDOW = (-135, 215)  # W 350, L 40: soft tissue, contrast-filled vessels, a solid nodule's inside


def _slices_of_interest(mask: np.ndarray, n: int) -> list[int]:
    """Axial slices through the mask's largest extent first, then evenly spaced ones."""
    per_slice = mask.reshape(mask.shape[0], -1).sum(1)
    chosen = [int(z) for z in np.argsort(-per_slice) if per_slice[z] > 0][:1]
    for z in np.linspace(0.25, 0.75, n) * mask.shape[0]:
        if len(chosen) < n and all(abs(int(z) - c) > 2 for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)[:n]


def draw_case(axes, image: np.ndarray, mask: np.ndarray, spacing, title: str, window=LUNG_WINDOW):
    """Fill a row of axes: axial slices (the first, through the mask's largest extent, in the lung
    and then the mediastinal window), then one coronal slice; mask outlined in red."""
    sx, sy, sz = spacing
    zs = _slices_of_interest(mask, len(axes) - 2)
    per_slice = mask.reshape(mask.shape[0], -1).sum(1)
    first = int(np.argmax(per_slice)) if per_slice.any() else zs[0]  # the mask's largest extent
    rest = [z for z in zs if z != first] or zs
    views = [(first, window, "lung"), (first, MEDIASTINAL_WINDOW, "mediastinal")] + [(z, window, "lung") for z in rest]
    for ax, (z, (lo, hi), name) in zip(axes[:-1], views):
        ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi, aspect=sy / sx)
        if mask[z].any():
            ax.contour(mask[z], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{title} z={z}, {name}" if ax is axes[0] else f"axial z={z}, {name} window", fontsize=7)
    y = int(np.argmax(mask.sum((0, 2)))) if mask.any() else image.shape[1] // 2
    ax = axes[-1]
    ax.imshow(image[:, y, :], cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
              aspect=sz / sx)
    if mask[:, y, :].any():
        ax.contour(mask[:, y, :], levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(f"coronal y={y}", fontsize=7)
    for a in axes:
        a.axis("off")


def montage(cases, out: str | Path, columns: int = 4) -> Path:
    """Write a PNG with one row per case: ``cases`` yields (title, image, mask, spacing)."""
    cases = list(cases)
    fig, axes = plt.subplots(len(cases), columns, figsize=(2.4 * columns, 2.5 * len(cases)),
                             squeeze=False)
    for row, (title, image, mask, spacing) in zip(axes, cases):
        draw_case(row, image, mask, spacing, title)
    fig.tight_layout()
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def show_cohort(root: str | Path, out: str | Path, max_cases: int = 6) -> Path:
    """Montage of the first cases of a cohort (cases with nodules first)."""
    from medsyn_site.data.cohort import Cohort

    cohort = Cohort(root)
    recs = sorted(cohort.cases, key=lambda c: (len(c.nodules) == 0, c.id))[:max_cases]

    def rows():
        for rec in recs:
            image, mask = cohort.arrays(rec.id)
            yield f"{rec.id} ({rec.split})", image, mask, rec.spacing
    return montage(rows(), out)
