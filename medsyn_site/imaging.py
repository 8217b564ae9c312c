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


# The nodule type a diffusion model is conditioned on, as a code per mask voxel (0 = no nodule):
# cohort.json records each nodule's type at its centre voxel; the mask file itself stays 0/1.
NODULE_CODES = {"ground-glass": 1, "part-solid": 2, "solid": 3, "unknown": 4}
CODE_TYPES = {c: t for t, c in NODULE_CODES.items()}


def nodule_codes(mask: np.ndarray, nodules) -> np.ndarray:
    """uint8 code per voxel (``NODULE_CODES``) of a mask's nodules: each component takes the type of
    the record (dict or NoduleRecord, ``center_voxel`` x y z) whose centre falls in it; a component
    no record names is "unknown"."""
    labels, n = label_nodules(mask)
    code_of = np.full(n + 1, NODULE_CODES["unknown"], np.uint8)
    code_of[0] = 0
    for rec in nodules or []:
        get = rec.get if isinstance(rec, dict) else (lambda k, r=rec: getattr(r, k))
        x, y, z = get("center_voxel")
        inside = all(0 <= c < s for c, s in zip((z, y, x), labels.shape))
        if inside and labels[z, y, x]:
            code_of[labels[z, y, x]] = NODULE_CODES.get(get("type"), NODULE_CODES["unknown"])
    return code_of[labels]


def component_types(codes: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The nodules of a code volume as labels 1..n, and the type of each (label order)."""
    labels, n = label_nodules(codes)
    return labels, [CODE_TYPES[int(c)] for c in ndimage.maximum(codes, labels, range(1, n + 1))] if n else []


def nodule_records(codes: np.ndarray, spacing_zyx) -> list[dict]:
    """cohort.json's nodule records of a code volume: per component its type, equivalent diameter
    and centre voxel (x y z; the component's voxel nearest its centroid, so it lies inside)."""
    labels, types = component_types(codes)
    out = []
    for lab, (t, d) in enumerate(zip(types, diameters_mm(labels, spacing_zyx)), start=1):
        vox = np.argwhere(labels == lab)
        centre = vox[np.argmin(((vox - vox.mean(0)) ** 2).sum(1))]
        out.append({"type": t, "diameter_mm": round(d, 2),
                    "center_voxel": tuple(int(c) for c in centre[::-1])})
    return out


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


def pleural_depth(lungs: np.ndarray) -> np.ndarray:
    """For each voxel of the lung cavity (``lungs`` with its holes, i.e. vessels and nodules, filled
    per axial slice), how many voxels (6-connected steps) it lies from the nearest voxel outside the
    cavity: 1 next to the chest wall or the mediastinum, 0 outside. A nodule touches the pleura where
    its least depth is 1."""
    cavity = np.stack([ndimage.binary_fill_holes(s) for s in np.asarray(lungs, bool)])
    return ndimage.distance_transform_cdt(cavity, metric="taxicab")


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
