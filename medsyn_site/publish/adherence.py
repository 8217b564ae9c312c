"""Mask adherence: does a synthetic volume show a nodule where its conditioning mask says?

A synthetic case whose nodule is invisible teaches a segmenter a wrong label, so ``medsyn publish``
scores every case (and can refuse those below a threshold):

- nodule contrast (always; milliseconds): per mask component, mean HU inside minus the mean HU of a
  2-voxel shell around it (``medsyn_site.quality.nodule_contrasts``); the case's score is the
  lowest over its nodules (one invisible nodule is enough to mislabel);
- segmenter Dice (when a segmenter is given): a small MONAI 3-D UNet trained on real scans only
  (``train_segmenter``; benchmarks/quality.py makes one) segments the synthetic volume; Dice with
  the conditioning mask inside the nodules' neighbourhoods (each component's box grown by
  ``NEIGHBOURHOOD`` voxels), so that what it finds elsewhere (vessels) does not mask what it finds
  at the nodules.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medsyn_site.errors import MedsynError
from medsyn_site.imaging import label_nodules
from medsyn_site.quality import dice, nodule_contrasts

log = logging.getLogger(__name__)
NEIGHBOURHOOD = 4
SEG_WINDOW = (-1024.0, 1024.0)
# Batch norm, not MONAI's default instance norm: trained on small nodule-centred patches, applied to
# whole volumes; instance statistics differ between the two, the batch norm's running ones do not.
SEG_NET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(16, 32, 64), strides=(2, 2),
               num_res_units=1, norm="batch")


def _unit(hu: np.ndarray) -> torch.Tensor:
    lo, hi = SEG_WINDOW
    return ((torch.as_tensor(np.asarray(hu, np.float32)) - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)


def _net(**kw):
    from monai.networks.nets import UNet

    return UNet(**(SEG_NET | kw))


class Segmenter:
    """A nodule segmenter trained on real scans (weights file written by ``train_segmenter``)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise MedsynError(f"{path}: segmenter weights not found")
        blob = torch.load(path, map_location="cpu")
        if blob.get("format") != "medsyn-nodule-segmenter":
            raise MedsynError(f"{path}: not a medsyn nodule segmenter (make one with benchmarks/quality.py)")
        self.net = _net(**blob.get("net", {}))
        self.net.load_state_dict(blob["state"])
        self.net.eval()
        self.path = path

    @torch.no_grad()
    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """Binary nodule mask for a (z, y, x) HU volume (padded to the UNet's multiple of 4)."""
        x = _unit(hu)[None, None]
        pad = [p for n in reversed(x.shape[2:]) for p in (0, -n % 4)]
        y = self.net(torch.nn.functional.pad(x, pad, value=-1.0))
        return (y[0, 0, : hu.shape[0], : hu.shape[1], : hu.shape[2]] > 0).numpy()


def neighbourhood_dice(pred: np.ndarray, mask: np.ndarray, grow: int = NEIGHBOURHOOD) -> float | None:
    """Dice of ``pred`` and ``mask`` inside the union of the mask components' grown boxes."""
    labels, n = label_nodules(mask)
    if n == 0:
        return None
    roi = np.zeros(mask.shape, bool)
    for box in ndimage.find_objects(labels):
        roi[tuple(slice(max(s.start - grow, 0), s.stop + grow) for s in box)] = True
    return dice(pred.astype(bool) & roi, (mask > 0) & roi)


def score(hu: np.ndarray, mask: np.ndarray, segmenter: Segmenter | None = None) -> dict:
    """A case's adherence: nodule count, per-nodule and minimum contrast (HU), segmenter Dice."""
    nod = nodule_contrasts(hu, mask)
    out = {"nodules": len(nod), "contrast_hu": [round(c.contrast, 1) for c in nod],
           "cnr": [round(c.cnr, 2) for c in nod],
           "min_contrast_hu": round(min(c.contrast for c in nod), 1) if nod else None, "segmenter_dice": None}
    if segmenter is not None and nod:
        out["segmenter_dice"] = round(neighbourhood_dice(segmenter(hu), mask), 3)
    return out


def train_segmenter(cohort_dir: str | Path, out: str | Path, steps: int = 400, patch: int = 16,
                    batch_size: int = 16, seed: int = 0, pos_weight: float = 100.0) -> Path:
    """Train the small nodule segmenter on a cohort's real train scans and write its weights file.

    Nodules are a tiny fraction of a patch (~0.1 % of the voxels of nodule-centred 16^3 patches at
    3 mm), so the loss is Dice over the whole batch plus cross-entropy with the nodule voxels weighted
    ``pos_weight`` times; with MONAI's DiceCE alone the network predicts no nodule at all.
    """
    from monai.losses import DiceLoss
    from tqdm import tqdm

    from medsyn_site.atomic import atomic_write
    from medsyn_site.data.cohort import Cohort
    from medsyn_site.diffusion.patches import PatchDataset

    torch.manual_seed(seed)
    data = PatchDataset(Cohort(cohort_dir), "train", (patch,) * 3, SEG_WINDOW, 0.7, seed)
    net, dice_loss = _net(), DiceLoss(sigmoid=True, batch=True)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in tqdm(range(steps), desc="segmenter", unit="step"):
        batch = [data[step * batch_size + i] for i in range(batch_size)]
        x = torch.stack([b["image"] for b in batch])
        y = torch.stack([b["mask"] for b in batch])
        logits = net(x)
        loss = dice_loss(logits, y) + bce(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    blob = {"format": "medsyn-nodule-segmenter", "state": net.state_dict(), "net": SEG_NET, "steps": steps,
            "cohort": str(cohort_dir)}
    return atomic_write(out, lambda p: torch.save(blob, p))
