"""A procedural chest-CT phantom with lung nodules: the built-in cohort for the demo and the tests.

Each case has a body outline with fat and soft tissue, two lungs near -850 HU with branching vessel
trees, ribs, spine and sternum at bone HU, heart and aorta, a CT-like blur and correlated noise; and
0..N nodules of the three LIDC types (solid, part-solid, ground-glass), >= 3 mm, sizes drawn from an
LIDC-like log-normal, some isolated, some touching the pleura and some touching vessels. The mask
marks nodules only. Everything is deterministic for a seed.

Arrays are (z, y, x); patient axes are LPS like DICOM (y grows posterior, z grows superior).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medsyn_site.config import PhantomConfig, SplitConfig

AIR, FAT, SOFT, BLOOD, LUNG = -1000.0, -100.0, 40.0, 40.0, -850.0
# Gaussian smooth noise (sigma voxels, HU): the lung parenchyma's texture, and the scanner noise's
# correlation length (its HU is PhantomConfig.noise_hu); benchmarks/realism.py's Wiener floor uses both
LUNG_TEXTURE = (1.5, 25.0)
NOISE_SIGMA_VOX = 0.7
CANCELLOUS, CORTICAL = 300.0, 800.0
NODULE_TYPES = ("solid", "part-solid", "ground-glass")
ATTACH = ("isolated", "pleural", "vascular")
ATTACH_P = (0.4, 0.3, 0.3)


@dataclass
class PhantomCase:
    image: np.ndarray  # (z, y, x) int16 HU
    mask: np.ndarray  # (z, y, x) uint8
    spacing: tuple[float, float, float]  # x, y, z mm
    nodules: list[dict]

    def to_sitk(self) -> tuple[sitk.Image, sitk.Image]:
        origin = tuple(-(n * s) / 2 for n, s in zip(self.image.shape[::-1], self.spacing))
        out = []
        for arr in (self.image, self.mask):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(self.spacing)
            im.SetOrigin(origin)
            out.append(im)
        return out[0], out[1]


class _Grid:
    """Physical coordinates of the voxel centres, normalised to the body ellipse."""

    def __init__(self, shape_xyz, spacing_xyz, rng):
        self.shape = tuple(shape_xyz[::-1])  # z, y, x
        self.sp = np.array(spacing_xyz[::-1], float)  # z, y, x mm
        z, y, x = [(np.arange(n) + 0.5) * s - n * s / 2 for n, s in zip(self.shape, self.sp)]
        fov_x, fov_y = self.shape[2] * self.sp[2], self.shape[1] * self.sp[1]
        self.ax = 0.46 * fov_x * rng.uniform(0.92, 1.0)  # body half-width, mm
        self.ay = min(0.72 * self.ax, 0.46 * fov_y) * rng.uniform(0.92, 1.0)
        full = lambda a: np.ascontiguousarray(np.broadcast_to(a.astype(np.float32), self.shape))
        self.u = full((x / self.ax)[None, None, :])
        self.v = full((y / self.ay)[None, :, None])
        self.w = full(((z - z[0]) / max(z[-1] - z[0], 1e-6))[:, None, None])  # 0 bottom .. 1 top

    def ellipse(self, cu, cv, au, av):
        return ((self.u - cu) / au) ** 2 + ((self.v - cv) / av) ** 2


def _smooth_noise(rng, shape, sigma_vox, std):
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return n * (std / max(float(n.std()), 1e-6))


def _tubes(shape, sp, points, radii) -> tuple[np.ndarray, np.ndarray]:
    """Voxels within each centreline point's radius (mm), via one distance transform, and each
    voxel's partial-volume fraction (a vessel thinner than a voxel fills only part of it)."""
    line = np.zeros(shape, bool)
    rad = np.zeros(shape, np.float32)
    if len(points):
        idx = tuple(np.asarray(points).T)
        line[idx] = True
        np.maximum.at(rad, idx, np.asarray(radii, np.float32))
    if not line.any():
        return line, line.astype(np.float32)
    dist, near = ndimage.distance_transform_edt(~line, sampling=sp, return_indices=True)
    r = rad[tuple(near)]
    inside = dist <= r
    return inside, np.where(inside, np.clip(2 * r / float(min(sp)), 0, 1) ** 2, 0).astype(np.float32)


def _ribs(g: _Grid, rng, fat_t: float):
    """Centreline points of ribs: arcs inside the body wall, sloping down towards the front."""
    pts, rads = [], []
    zmm = g.shape[0] * g.sp[0]
    rr = 1 - fat_t - 0.07
    step = rng.uniform(24, 30)
    for z0 in np.arange(rng.uniform(0, step), zmm + 30, step):
        for side in (-1, 1):
            phi = np.linspace(np.pi / 2 + side * 0.25, -np.pi / 2 + side * 0.9, 200)
            if side < 0:
                phi = np.linspace(np.pi / 2 - 0.25, np.pi * 1.5 - 0.9, 200)
            prog = np.linspace(0, 1, phi.size)
            x = rr * np.cos(phi) * g.ax
            y = rr * np.sin(phi) * g.ay
            z = z0 - 35 * prog
            for p in np.stack([z, y, x], 1):
                pts.append(p)
            rads += [rng.uniform(3.0, 4.0)] * phi.size
    return pts, rads


def _to_index(g: _Grid, p_mm):
    """mm (z, y, x) relative to the volume centre -> voxel index, or None outside."""
    idx = np.floor((np.asarray(p_mm) + np.array(g.shape) * g.sp / 2) / g.sp).astype(int)
    if np.any(idx < 0) or np.any(idx >= np.array(g.shape)):
        return None
    return tuple(idx)


def _vessel_trees(g: _Grid, rng, lung: np.ndarray):
    """Branching vessel trees grown from each lung's hilum, confined to the lung."""
    pts, rads = [], []
    step = float(g.sp.min()) / 2
    for side in (-1, 1):
        side_mask = lung & ((g.u * side) > 0)
        if not side_mask.any():
            continue
        zz, yy, xx = np.nonzero(side_mask)
        medial = np.abs(xx - g.shape[2] / 2)
        # hilum: medial lung voxels at mid height
        sel = (medial < np.percentile(medial, 15)) & (np.abs(zz - np.median(zz)) < 0.15 * g.shape[0])
        if not sel.any():
            sel = medial <= np.percentile(medial, 30)
        k = rng.integers(sel.sum())
        hil = (np.array([zz[sel][k], yy[sel][k], xx[sel][k]]) + 0.5) * g.sp - np.array(g.shape) * g.sp / 2
        centre = (np.array([zz.mean(), yy.mean(), xx.mean()]) + 0.5) * g.sp - np.array(g.shape) * g.sp / 2
        for dz in (1.0, 0.6, 0.2, -0.2, -0.6, -1.0):
            d = np.array([dz, 0, side * 0.8]) + rng.normal(0, 0.3, 3)
            stack = [(hil.copy(), d / np.linalg.norm(d), rng.uniform(3.0, 4.5), rng.uniform(20, 35), 0)]
            while stack:
                p, dv, r, length, depth = stack.pop()
                bounces = 0
                for _ in range(int(length / step)):
                    dv = dv + rng.normal(0, 0.04, 3)
                    dv /= np.linalg.norm(dv)
                    idx = _to_index(g, p + dv * step)
                    if idx is None or not lung[idx]:  # turn back into the lung, once
                        bounces += 1
                        dv = (centre - p) / np.linalg.norm(centre - p) + rng.normal(0, 0.3, 3)
                        dv /= np.linalg.norm(dv)
                        if bounces > 1:
                            break
                        continue
                    p = p + dv * step
                    pts.append(idx)
                    rads.append(r)
                if bounces <= 1 and r > 0.7 and depth < 9:
                    for sgn in (-1, 1):
                        axis = np.cross(dv, rng.normal(size=3))
                        axis /= np.linalg.norm(axis)
                        ang = sgn * rng.uniform(0.35, 0.7)
                        nd = dv * np.cos(ang) + np.cross(axis, dv) * np.sin(ang)
                        stack.append((p.copy(), nd, r * rng.uniform(0.7, 0.85),
                                      length * rng.uniform(0.75, 0.92), depth + 1))
    return pts, rads


def _anatomy(g: _Grid, rng):
    """HU volume without nodules, plus the lung, vessel and body masks."""
    img = np.full(g.shape, AIR, np.float32)
    body = g.ellipse(0, 0, 1, 1) <= 1
    fat_t = rng.uniform(0.06, 0.12)
    img[body] = FAT
    img[g.ellipse(0, 0, 1 - fat_t, 1 - fat_t * 1.3) <= 1] = SOFT
    lung = np.zeros(g.shape, bool)
    for side, au, av in ((-1, 0.36, 0.66), (1, 0.33, 0.64)):
        cu, cv = side * rng.uniform(0.40, 0.46), rng.uniform(-0.05, 0.02)
        au, av = au * rng.uniform(0.92, 1.05), av * rng.uniform(0.92, 1.05)
        apex = np.clip((1.02 - g.w) / 0.3, 0, 1) ** 0.5  # lungs narrow to the apex
        r2 = g.ellipse(cu, cv, au * np.maximum(apex, 1e-3), av * np.maximum(apex, 1e-3))
        dome = 0.08 + 0.22 * np.clip(1 - g.ellipse(cu, cv, au, av), 0, 1)  # diaphragm
        lung |= (r2 <= 1) & (g.w >= dome)
    heart_c = (rng.uniform(0.08, 0.16), rng.uniform(-0.3, -0.15), rng.uniform(0.25, 0.35))
    heart = (g.ellipse(heart_c[0], heart_c[1], 0.30, 0.36) + ((g.w - heart_c[2]) / 0.24) ** 2) <= 1
    epicardial = (g.ellipse(heart_c[0], heart_c[1], 0.34, 0.41) + ((g.w - heart_c[2]) / 0.28) ** 2) <= 1
    aorta = (g.ellipse(0.12, 0.38, 0.08, 0.11) <= 1) & (g.w < 0.85)
    trachea = (g.ellipse(0, -0.12, 0.07, 0.09) <= 1) & (g.w > 0.62)
    spine = (g.ellipse(0, 0.66, 0.12, 0.16) <= 1)
    canal = g.ellipse(0, 0.88, 0.05, 0.07) <= 1
    lamina = (g.ellipse(0, 0.95, 0.14, 0.05) <= 1) & ~canal
    sternum = (g.ellipse(0, -0.92, 0.09, 0.05) <= 1) & (g.w > 0.3)
    lung &= ~(epicardial | aorta | spine | trachea)
    texture = _smooth_noise(rng, g.shape, *LUNG_TEXTURE)
    gravity = 40.0 * np.clip(g.v, 0, 1)  # dependent lung is denser
    img[lung] = (LUNG + texture + gravity)[lung]
    img[epicardial & body] = FAT + 20
    img[heart | aorta] = BLOOD
    img[trachea] = AIR
    disc = (np.mod(g.w * g.shape[0] * g.sp[0] + rng.uniform(0, 25), 25.0) < 5.0)
    img[spine] = np.where(disc, 80.0, CANCELLOUS)[spine]
    img[spine & ~(g.ellipse(0, 0.66, 0.10, 0.135) <= 1) & ~disc] = CORTICAL
    img[canal] = 20.0
    img[lamina | sternum] = 500.0
    rib = _tubes(g.shape, g.sp, *_rib_points(g, rng, fat_t))[0] & body
    img[rib] = 600.0
    lung &= ~rib
    vessels, fill = _tubes(g.shape, g.sp, *_vessel_trees(g, rng, lung))
    vessels &= lung
    img[vessels] += (fill * (BLOOD - img))[vessels]
    vessels &= fill > 0.5  # the visible ones: what a nodule can touch or be mistaken for
    return img, lung, vessels, body


def _rib_points(g, rng, fat_t):
    pts, rads = _ribs(g, rng, fat_t)
    idx, keep = [], []
    for p, r in zip(pts, rads):
        i = _to_index(g, p)
        if i is not None:
            idx.append(i)
            keep.append(r)
    return idx, keep


def _procedural_shape(rng, radius_mm: float):
    """A lobulated, randomly oriented ellipsoid: (inside(offsets (n, 3) mm) -> (n,) bool, reach mm)."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = radius_mm * rng.uniform(0.8, 1.2, 3)
    axes *= radius_mm / np.prod(axes) ** (1 / 3)  # keep the volume of a sphere of that radius
    lobes = rng.normal(size=(rng.integers(2, 6), 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    amp = rng.uniform(0.08, 0.25, len(lobes))

    def inside(d):
        local = d @ q
        rho = np.linalg.norm(local / axes, axis=1)
        dirs = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
        bump = (amp * np.clip(dirs @ lobes.T, 0, None) ** 4).sum(1)
        return rho <= 1 + bump
    return inside, 1.5 * radius_mm


def _lidc_shape(rng):
    """A real LIDC-IDRI consensus nodule, looked up around its centroid; and its equivalent radius."""
    from medsyn_site.data.lidc import random_nodule

    arr, sp = random_nodule(rng)
    sp = np.asarray(sp)
    centre = np.argwhere(arr).mean(0)
    reach = float(np.abs((np.argwhere(arr) - centre) * sp).max()) + float(sp.max())

    def inside(d):
        idx = np.rint(d / sp + centre).astype(int)
        ok = np.all((idx >= 0) & (idx < arr.shape), axis=1)
        out = np.zeros(len(d), bool)
        out[ok] = arr[tuple(idx[ok].T)]
        return out
    radius = (3 * arr.sum() * np.prod(sp) / (4 * np.pi)) ** (1 / 3)
    return inside, reach, float(radius)


def _place(rng, g: _Grid, lung, lung_depth, vessel_dist, radius, attachment):
    """A nodule centre (voxel index) for the attachment type, or None if none fits."""
    tol = float(g.sp.max())
    if attachment == "pleural":
        cand = lung & (np.abs(lung_depth - 0.6 * radius) < tol)
    elif attachment == "vascular":
        cand = lung & (np.abs(vessel_dist - 0.8 * radius) < tol) & (lung_depth > radius)
    else:
        cand = lung & (lung_depth > radius + 2) & (vessel_dist > radius + 1)
    zz, yy, xx = np.nonzero(cand)
    if zz.size == 0:
        return None
    k = rng.integers(zz.size)
    return np.array([zz[k], yy[k], xx[k]])


def _paint_nodule(rng, g: _Grid, img, mask, lung, center, shape, radius, ntype, label):
    """Paint one nodule's HU into img and its label into mask; return its voxel count."""
    inside, reach_mm = shape
    reach = np.ceil(reach_mm / g.sp).astype(int) + 1
    lo, hi = np.maximum(center - reach, 0), np.minimum(center + reach + 1, g.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    d = ((grid - center) * g.sp).reshape(-1, 3)
    sub = inside(d).reshape(grid.shape[:3]) & (lung[box] | (mask[box] > 0))
    solid_hu = rng.uniform(0, 60)
    if ntype == "solid":
        img[box][sub] = solid_hu + rng.normal(0, 8, sub.sum())
    else:
        ggo_hu = rng.uniform(-650, -450)
        img[box][sub] = np.maximum(img[box][sub], ggo_hu + rng.normal(0, 15, sub.sum()))
        if ntype == "part-solid":
            scale = min(0.8, max(rng.uniform(0.35, 0.6), 1.5 * float(g.sp.max()) / radius))
            core = inside(d / scale).reshape(sub.shape) & sub
            img[box][core] = solid_hu
    mask[box][sub] = label
    return int(sub.sum())


def make_case(cfg: PhantomConfig, seed: int) -> PhantomCase:
    """One phantom case (image, mask, nodule list), deterministic for (cfg, seed)."""
    rng = np.random.default_rng(seed)
    g = _Grid(cfg.shape, cfg.spacing, rng)
    img, lung, vessels, body = _anatomy(g, rng)
    lung_depth = ndimage.distance_transform_edt(lung, sampling=g.sp)
    vessel_dist = ndimage.distance_transform_edt(~vessels, sampling=g.sp)
    labels = np.zeros(g.shape, np.uint8)
    p = np.array([0.15, 0.35, 0.25, 0.15, 0.10, 0.05, 0.03, 0.01, 0.01][: cfg.max_nodules + 1])
    n_nodules = int(rng.choice(cfg.max_nodules + 1, p=p / p.sum()))
    nodules = []
    for label in range(1, n_nodules + 1):
        if cfg.nodule_shapes == "lidc":
            inside, reach, radius = _lidc_shape(rng)
            diameter = 2 * radius
        else:
            diameter = float(np.clip(rng.lognormal(np.log(cfg.nodule_median_mm), 0.5), cfg.nodule_min_mm, 30.0))
            inside, reach = _procedural_shape(rng, diameter / 2)
        ntype = str(rng.choice(NODULE_TYPES, p=cfg.nodule_type_p))
        attachment = str(rng.choice(ATTACH, p=ATTACH_P))
        free = lung & (labels == 0)
        if label > 1:  # keep nodules apart, so each is its own connected component
            free &= ndimage.distance_transform_edt(labels == 0, sampling=g.sp) > diameter / 2 + 3
        center = _place(rng, g, free, lung_depth, vessel_dist, diameter / 2, attachment)
        if center is None:
            continue
        n = _paint_nodule(rng, g, img, labels, free, center, (inside, reach), diameter / 2, ntype, label)
        eq_d = (6 * n * np.prod(g.sp) / np.pi) ** (1 / 3)
        if n == 0 or eq_d < 3.0:
            labels[labels == label] = 0
            continue
        nodules.append({"type": ntype, "diameter_mm": round(float(eq_d), 2),
                        "center_voxel": tuple(int(c) for c in center[::-1]), "attachment": attachment})
    img = ndimage.gaussian_filter(img, sigma=(0.5, 0.7, 0.7))  # scanner point spread
    img += _smooth_noise(rng, g.shape, NOISE_SIGMA_VOX, cfg.noise_hu)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    return PhantomCase(img, (labels > 0).astype(np.uint8), tuple(cfg.spacing), nodules)


def write_phantom_cohort(cfg: PhantomConfig, split: SplitConfig, out, force: bool = False):
    """Write ``cfg.cases`` phantom cases as a cohort (case i uses seed cfg.seed * 100003 + i)."""
    from tqdm import tqdm

    from medsyn_site.data.cohort import CohortWriter
    from medsyn_site.data.split import split_patients

    ids = [f"phantom-{i:03d}" for i in range(cfg.cases)]
    splits = split_patients(ids, split)
    desc = (f"medsyn built-in chest-CT phantom: {cfg.cases} cases, shape {cfg.shape}, "
            f"spacing {cfg.spacing} mm, seed {cfg.seed}")
    with CohortWriter(out, force=force, description=desc) as writer:
        for i, case_id in enumerate(tqdm(ids, desc="phantom", unit="case")):
            case = make_case(cfg, seed=cfg.seed * 100003 + i)
            image, mask = case.to_sitk()
            writer.add(case_id, patient=case_id, split=splits[case_id], source="real",
                       image=image, mask=mask, nodules=case.nodules)
    return out
