"""Pictures of what the diffusion model does: real / noised / denoised slices beside the mask."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medsyn_site.atomic import atomic_write  # noqa: E402


def denoise_figure(rows, out: Path, window) -> Path:
    """rows: (real, noisy, denoised, mask) 3-D tensors in [-1, 1]; shows each one's middle slice."""
    titles = ("real", "noised t=T/2", "denoised (one step)", "mask")
    fig, axes = plt.subplots(len(rows), 4, figsize=(9, 2.3 * len(rows)), squeeze=False)
    for row_axes, vols in zip(axes, rows):
        z = int(vols[3].sum((1, 2)).argmax()) if vols[3].any() else vols[0].shape[0] // 2
        for ax, vol, title in zip(row_axes, vols, titles):
            img = vol[z].detach().float().cpu().numpy()
            ax.imshow(img, cmap="gray", vmin=0 if title == "mask" else -1, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"HU window {window[0]:g}..{window[1]:g} shown as [-1, 1]", fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
