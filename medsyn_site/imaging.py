"""Imaging helpers every stage shares: the body and lung masks of a CT volume (HU, z y x), and nodules
as connected components of a mask with their sizes.

Nodules are 26-connected components everywhere in the toolkit (``CONNECTIVITY``), so one mask has
one nodule count in every report. Sizes are skimage's equivalent-sphere diameters, in mm."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), bool)


# -- nodules ----------------------------------------------------------------------------------
def label_nodules(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The nodules of a mask (nonzero voxels) as labels 1..n of 26-connected components."""
    return ndimage.label(np.asarray(mask) > 0, structure=CONNECTIVITY)


def diameters_mm(labels: np.ndarray, spacing_zyx) -> list[float]:
    """Equivalent-sphere diameter of each labelled component, in label order (skimage's
    ``regionprops(...).equivalent_diameter_area`` with the voxel spacing)."""
    from skimage.measure import regionprops

    return [float(p.equivalent_diameter_area) for p in regionprops(labels, spacing=tuple(map(float, spacing_zyx)))]


def diameter_mm(mask: np.ndarray, spacing_zyx) -> float:
    """Equivalent-sphere diameter of all nonzero voxels of ``mask`` taken together (0 if none)."""
    return diameters_mm((np.asarray(mask) > 0).astype(np.uint8), spacing_zyx)[0] if np.any(mask) else 0.0


# -- body and lungs ---------------------------------------------------------------------------
def body_mask(hu: np.ndarray) -> np.ndarray:
    """The body: largest connected component above -500 HU, with holes (lungs) filled per slice."""
    dense = np.asarray(hu) > -500
    labels, n = ndimage.label(dense)
    if n == 0:
        return dense
    body = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Air-density voxels (< -400 HU) inside the body: where a nodule may be placed, what a crop keeps."""
    return (np.asarray(hu) < -400) & body_mask(hu)


def lung_region(hu: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """Lung-parenchyma voxels (-950..-500 HU) inside the body, slightly opened to drop speckle: what
    the quality measures compare."""
    body = body_mask(hu) if body is None else body
    lung = body & (np.asarray(hu) >= -950) & (np.asarray(hu) < -500)
    return ndimage.binary_opening(lung, iterations=1)


def lungs_convex(hu: np.ndarray) -> np.ndarray:
    """Air-density voxels inside the convex hull of each axial slice's dense tissue, vessels and
    nodules included (holes filled); the threshold is Otsu's, so it follows a rescaled copy's
    intensities. The hull, unlike hole filling, still encloses lungs that a shifted or cropped copy
    cuts open at the edge of the field: the memorization audit's mask."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import convex_hull_image

    t = threshold_otsu(hu) if hu.min() < hu.max() else float(hu.min())
    dense = ndimage.binary_opening(hu > t, iterations=1)
    air = hu <= t
    out = np.zeros(hu.shape, bool)
    for k, sl in enumerate(dense):
        if sl.sum() > 16:
            out[k] = ndimage.binary_fill_holes(air[k] & convex_hull_image(sl))
    return out
