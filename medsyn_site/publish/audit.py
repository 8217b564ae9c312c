"""Memorization audit: is a synthetic volume a (disguised) copy of a training scan?

Features carry what is patient-specific: the lung interior (vessels, airways, nodules) band-passed
(difference of Gaussians) on an isotropic grid, everything outside the lungs zeroed and the lung wall
suppressed (non-lung voxels filled with the lung's median HU before filtering), so the body outline
that every chest shares does not count. Each feature is cropped to its lungs' bounding box.

The search covers the disguises a copy can take:
- all 8 axis-flip combinations, and every shift over the whole field (FFT cross-correlation);
- intensity affine changes and noise (normalized correlation of band-passed features);
- small rotations (about each axis) and scalings (a fixed set of resamplings of the synthetic feature,
  ranked on the coarse grid, the best scored on the fine grid);
- local, patch-wise nearest-neighbour matching across the lungs: each patch (half or more of it lung)
  of the synthetic lungs is matched against every position of the candidate scan within
  ``patch_radius_mm`` of where the whole-lung alignment puts it, coarse to fine (2x-downsampled first,
  then refined), so a copied region is found near its place, and a slightly rotated or scaled copy
  still matches patch by patch. Each patch costs the same whatever the volume's size: the search is
  linear in voxels (the earlier search over every position of the scan grew with their square).

Stages keep it O(synthetic x train) with a small constant: a bank larger than ``retrieval_keep`` is
first ranked on a grid twice as coarse (all flips and shifts, an eighth of the voxels) and its
``retrieval_keep`` nearest kept; a coarse (``coarse_mm``) search over all flips and shifts against
those picks ``candidates`` nearest scans; the fine search
(rotations, scalings, patches) runs on those only. Scores: ``global`` (best whole-lung NCC; its scan is
the one named nearest) and ``local`` (mean of the best quarter of patch NCCs), each its best over the
candidates. Thresholds come from a null distribution of
nearest-neighbour scores of real scans the model never saw (held-out scans, plus each training scan
against the other training scans): a normal fit on Fisher-z scores, its (1 - false_alarm) quantile,
plus a margin; the false-alarm estimate is reported with a bootstrap interval.
"""
from __future__ import annotations

import hashlib
import functools
import itertools
import json
import logging
import math
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import fft, ndimage, stats

from medsyn_site.config import AuditConfig, usable_cores
from medsyn_site.errors import MedsynError
from medsyn_site.imaging import lungs_convex

log = logging.getLogger(__name__)
VERSION = 5  # 3: patch search on an exact (no wrap-around) grid; 4: the cache file is a bank file (params in meta);
# 5: patches (half lung) searched coarse to fine near the whole-lung alignment; global and local each their best
COARSE_TOP, FINE_RADIUS = 2, 2  # the patch search refines the 2 best coarse matches, +-2 fine voxels around each
TRANSFORMS_FINE = 2  # rotations / scalings scored on the fine grid (the best on the coarse grid)
FLIPS = [tuple(a for a, f in zip(range(3), bits) if f) for bits in itertools.product((0, 1), repeat=3)]
CACHE_DIR = ".medsyn-audit"


AuditParams = AuditConfig  # the settings live in the config (``publish.audit``), defaults included


# -- features ------------------------------------------------------------------------------------

def feature(hu: np.ndarray, spacing_zyx, mm: float, p: AuditParams = AuditParams()) -> np.ndarray:
    """Band-passed lung interior on an isotropic ``mm`` grid, cropped to the lungs, zero outside them,
    zero mean and unit variance inside (float32, z y x)."""
    hu = np.clip(hu.astype(np.float32), *p.hu_clip)
    lungs = lungs_convex(hu)
    factors = [s / mm for s in spacing_zyx]
    hu = ndimage.zoom(hu, factors, order=1, grid_mode=True, mode="nearest")
    lungs = ndimage.zoom(lungs.astype(np.float32), factors, order=1, grid_mode=True, mode="nearest") > 0.5
    if lungs.sum() < 64:  # no lungs found (not a chest CT): the whole field, unmasked
        lungs = np.ones_like(lungs)
    idx = np.nonzero(lungs)
    box = tuple(slice(max(0, int(i.min()) - 2), int(i.max()) + 3) for i in idx)
    hu, lungs = hu[box], lungs[box]
    filled = np.where(lungs, hu, np.float32(np.median(hu[lungs])))
    band = ndimage.gaussian_filter(filled, 0.7) - ndimage.gaussian_filter(filled, 3.0)
    steps = int(round(2.5 / mm))  # the lung wall's blurred edge (about 2.5 mm) is left out
    inner = ndimage.binary_erosion(lungs, iterations=steps) if steps else lungs
    m = inner.astype(np.float32)  # local contrast normalization (10 mm): every part of the lungs counts
    sigma = 10.0 / mm
    rms = np.sqrt(ndimage.gaussian_filter(band * band * m, sigma) / np.maximum(ndimage.gaussian_filter(m, sigma), 1e-3))
    v = band[inner] / np.maximum(rms[inner], 1e-3)
    med = float(np.median(v)) if v.size else 0.0
    v = np.clip((v - med) / max(1.4826 * float(np.median(np.abs(v - med))) if v.size else 0.0, 1e-3), -4, 4)
    out = np.zeros_like(band)  # winsorized: no few voxels (a lung base, an edge) dominate the score
    out[inner] = (v - v.mean()) / max(float(v.std()), 1e-6)
    return out


@dataclass
class Features:
    coarse: np.ndarray
    fine: np.ndarray

    @classmethod
    def of(cls, hu: np.ndarray, spacing_xyz, p: AuditParams = AuditParams()) -> "Features":
        sp = tuple(spacing_xyz)[::-1]
        return cls(feature(hu, sp, p.coarse_mm, p), feature(hu, sp, p.fine_mm, p))


# -- correlation -----------------------------------------------------------------------------------

def fft_shape(*shapes) -> tuple[int, ...]:
    """Circular correlation exact for all shifts up to a quarter of the larger feature (they are
    cropped to the lungs, so a shifted copy's lungs already sit near the same place)."""
    return tuple(fft.next_fast_len(int(math.ceil(1.25 * max(s)))) for s in zip(*shapes))


def spectrum(a: np.ndarray, shape) -> np.ndarray:
    """``rfftn`` of ``a`` zero-padded to ``shape`` (a at the origin), one axis at a time so that only
    the rows that hold ``a`` are transformed along the first two axes: a 10^3 patch on a 90^3 grid
    costs little more than the last axis' full transforms."""
    out = fft.rfft(np.asarray(a, np.float32), n=shape[-1], axis=-1, workers=1)
    for axis in range(a.ndim - 2, -1, -1):
        out = fft.fft(out, n=shape[axis], axis=axis, workers=1)
    return out


def xcorr(fa: np.ndarray, fb: np.ndarray, shape) -> np.ndarray:
    """c[s] = sum_x a(x) b(x + s) over every circular shift s."""
    return fft.irfftn(np.conj(fa) * fb, shape, workers=1)


def template(a: np.ndarray, shape) -> tuple:
    """What ``global_ncc`` needs of ``a`` on ``shape``: computed once per volume, reused against every scan."""
    return spectrum(a, shape), spectrum((a != 0).astype(np.float32), shape), np.count_nonzero(a), float(np.linalg.norm(a))


def global_ncc(a: np.ndarray, fb: tuple, shape, tmpl: tuple | None = None) -> tuple[float, tuple]:
    """Best normalized correlation of the whole of ``a`` (a template) with b over all shifts, and the
    shift. ``fb``: spectra of b, b**2 and b's lung support (``spectra_of``). b is normalized by its
    energy under a's support, so a copy cut by the field's edge (a part of b) still scores 1; shifts
    where less than a quarter of a's lungs overlap b's are skipped."""
    spec_b, spec_b2, spec_mb = fb
    spec_a, spec_ma, count, norm = tmpl or template(a, shape)
    c = xcorr(spec_a, spec_b, shape)
    energy = xcorr(spec_ma, spec_b2, shape)
    overlap = xcorr(spec_ma, spec_mb, shape)
    c = np.where(overlap > 0.25 * count, c / np.sqrt(np.maximum(energy, 1e-6)), -1.0)
    i = int(np.argmax(c))
    shift = tuple(int(k) if k <= n // 2 else int(k) - n for k, n in zip(np.unravel_index(i, shape), shape))
    return float(c.flat[i]) / max(norm, 1e-6), shift


def spectra_of(b: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return spectrum(b, shape), spectrum(b * b, shape), spectrum((b != 0).astype(np.float32), shape)


def transforms(p: AuditParams) -> list[tuple[str, np.ndarray]]:
    """The small rotations and scalings searched: (name, 3x3 matrix acting on z y x)."""
    out = [("identity", np.eye(3))]
    r = math.radians(p.rotations_deg)
    for axis, sign in itertools.product(range(3), (-1, 1)):
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i] = m[j, j] = math.cos(sign * r)
        m[i, j], m[j, i] = -math.sin(sign * r), math.sin(sign * r)
        out.append((f"rotate {sign * p.rotations_deg:+g} deg about {'zyx'[axis]}", m))
    out += [(f"scale {s:g}", np.eye(3) / s) for s in p.scales]
    out += [(f"{name}, scale {s:g}", m / s) for name, m in out[1:3] for s in p.scales]  # axial rotation + zoom
    return out


def _warp(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    if np.allclose(m, np.eye(3)):
        return a
    c = (np.array(a.shape) - 1) / 2
    return ndimage.affine_transform(a, m, offset=c - m @ c, order=1, mode="constant")


def box_sums(x: np.ndarray, k: int) -> np.ndarray:
    """Sum of ``x`` over the k^3 cube at every corner where it fits (summed-area table: linear)."""
    c = np.zeros(tuple(n + 1 for n in x.shape), np.float64)
    c[1:, 1:, 1:] = x.astype(np.float64).cumsum(0).cumsum(1).cumsum(2)
    out = np.zeros(tuple(n - k + 1 for n in x.shape), np.float64)
    for bits in itertools.product((0, 1), repeat=3):
        sl = tuple(slice(k, None) if f else slice(0, -k) for f in bits)
        out += (-1) ** (3 - sum(bits)) * c[sl]
    return out


def _halve(x: np.ndarray) -> np.ndarray:
    """2x2x2 block means (the grid of the coarse patch match)."""
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, x.shape[2] // 2, 2).mean((1, 3, 5))


class _Grid:
    """b zero-padded by a patch side all round (so a patch may hang over b's edge), with the energy and
    lung count of b under a patch at every corner."""

    def __init__(self, b: np.ndarray, k: int):
        self.k, self.pad = k, k
        self.b = np.pad(b, k)
        self.energy = np.sqrt(np.maximum(box_sums(self.b * self.b, k), 1e-6))
        self.support = box_sums(self.b != 0, k)

    def best(self, patch: np.ndarray, n: int, corner, radius: int, top: int = 1) -> list[tuple[float, tuple]]:
        """The ``top`` best normalized correlations of ``patch`` with b at corners within ``radius`` of
        ``corner`` (b's unpadded coordinates), where b holds at least half as much lung as the patch."""
        lo = [min(max(0, c + self.pad - radius), m - 1) for c, m in zip(corner, self.energy.shape)]
        hi = [min(m, max(1, c + self.pad + radius + 1)) for c, m in zip(corner, self.energy.shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            return [(-1.0, tuple(corner))]
        win = self.b[lo[0]:hi[0] + self.k - 1, lo[1]:hi[1] + self.k - 1, lo[2]:hi[2] + self.k - 1]
        views = np.lib.stride_tricks.sliding_window_view(win, patch.shape)
        c = np.einsum("abcijk,ijk->abc", views, patch, optimize=True)
        box = tuple(slice(l, h) for l, h in zip(lo, hi))
        c = np.where(self.support[box] > 0.5 * n, c / self.energy[box], -np.inf) / max(float(np.linalg.norm(patch)), 1e-6)
        order = np.argsort(c, axis=None)[::-1][:top]
        return [(float(c.flat[i]), tuple(int(j) + l - self.pad for j, l in zip(np.unravel_index(i, c.shape), lo)))
                for i in order]


def patch_scores(a: np.ndarray, b: np.ndarray, side: int, shift=(0, 0, 0), radius: int = 12,
                 min_lung: float = 0.5) -> np.ndarray:
    """For each patch (side^3, half-overlapping, at least ``min_lung`` lung) of ``a``: its best normalized correlation
    with b anywhere within ``radius`` voxels of where the whole-lung alignment (``shift``: a at x sits
    on b at x + shift) puts it. Coarse to fine, so each patch costs the same whatever the volume's
    size (the search is linear in voxels): the patch's 2x-downsampled copy is matched at every
    position of the window on b's 2x-downsampled grid; the 2 best positions are refined on the full
    grid (+-2 voxels). Positions where b is mostly outside the lungs are skipped, so a near-empty
    window cannot score by chance. Patches mostly outside the lungs are not scored: their lung edge,
    which every chest shares, made unseen phantom scans score up to 0.84 against training scans
    (0.61 with half-lung patches; the red-team's copies all still found)."""
    side = max(4, min(side, *a.shape)) // 2 * 2
    step = max(2, side // 2)
    fine, coarse, ac = _Grid(b, side), _Grid(_halve(b), side // 2), _halve(a)
    scores = []
    for z, y, x in itertools.product(*[range(0, max(1, n - side + 1), step) for n in a.shape]):
        patch = a[z:z + side, y:y + side, x:x + side]
        n = np.count_nonzero(patch)
        if n < min_lung * patch.size or not patch.any():
            continue
        pc = ac[z // 2:z // 2 + side // 2, y // 2:y // 2 + side // 2, x // 2:x // 2 + side // 2]
        target = [(c + s) // 2 for c, s in zip((z, y, x), shift)]
        best = -1.0
        if pc.shape == (side // 2,) * 3 and pc.any():
            for _, q in coarse.best(pc, np.count_nonzero(pc), target, -(-radius // 2), top=COARSE_TOP):
                best = max(best, fine.best(patch, n, [2 * c for c in q], FINE_RADIUS)[0][0])
        scores.append(best)
    return np.array(scores)


def local_score(scores: np.ndarray) -> float:
    """Mean of the best quarter of patch scores: a copied region anywhere in the lungs lifts it."""
    if scores.size == 0:
        return 0.0
    k = max(1, int(math.ceil(scores.size / 4)))
    return float(np.sort(scores)[-k:].mean())


# -- the search ----------------------------------------------------------------------------------

@dataclass
class Bank:
    """Training scans' features, with their spectra cached per FFT shape during one audit."""

    ids: list[str]
    feats: list[Features]
    p: AuditParams = field(default_factory=AuditParams)
    file: Path | None = field(default=None, repr=False)  # its copy on disk (save_bank), which workers read
    _spec: dict = field(default_factory=dict, repr=False)

    def coarse_shape(self, extra) -> tuple[int, ...]:
        """One FFT shape for the whole bank (so its spectra are computed once), grown if needed."""
        shape = fft_shape(*[f.coarse.shape for f in self.feats])
        return shape if all(n >= 1.25 * e for n, e in zip(shape, extra)) else fft_shape(extra, shape)

    def coarse_spectra(self, shape) -> list[np.ndarray]:
        if shape not in self._spec:
            self._spec[shape] = [spectra_of(f.coarse, shape) for f in self.feats]
        return self._spec[shape]

    def retrieval(self, extra) -> tuple[tuple[int, ...], list]:
        """The FFT shape and (spectra, norm) of the bank's coarse features halved again (2 x coarse_mm):
        the first, cheap ranking of a large bank."""
        halved = [_halve(f.coarse) for f in self.feats]
        shape = fft_shape(*[h.shape for h in halved])
        if not all(n >= 1.25 * e for n, e in zip(shape, extra)):
            shape = fft_shape(extra, shape)
        key = ("halved", shape)
        if key not in self._spec:
            self._spec[key] = [(*spectra_of(h, shape), max(float(np.linalg.norm(h)), 1e-6)) for h in halved]
        return shape, self._spec[key]


def nearest(f: Features, bank: Bank, exclude: str | None = None) -> dict:
    """The nearest training scan of one volume, over all disguises: scores and the best disguise."""
    p = bank.p
    keep = [i for i, cid in enumerate(bank.ids) if cid != exclude]
    if not keep:
        return {"global": 0.0, "local": 0.0, "nearest": None, "disguise": None, "coarse": 0.0}
    if len(keep) > p.retrieval_keep:  # a large bank: rank it on a grid 2x coarser first, keep the nearest
        h = _halve(f.coarse)
        hshape, hspectra = bank.retrieval(h.shape)
        hflips = np.conj(np.stack([spectrum(np.flip(h, fl) if fl else h, hshape) for fl in FLIPS]))
        # the plain correlation, all flips in one batched inverse FFT (small grids: the per-call overhead
        # dominates); the exact normalized score follows on the kept scans
        axes = tuple(range(1, h.ndim + 1))
        ranked = sorted(((float(fft.irfftn(hflips * hspectra[i][0], hshape, axes=axes, workers=1).max())
                          / hspectra[i][3], i) for i in keep), reverse=True)
        keep = [i for _, i in ranked[: p.retrieval_keep]]
    shape = bank.coarse_shape(f.coarse.shape)
    spectra = bank.coarse_spectra(shape)
    coarse = []  # (score, bank index, flip)
    flipped = {fl: np.flip(f.coarse, fl) if fl else f.coarse for fl in FLIPS}
    tmpl = {fl: template(a, shape) for fl, a in flipped.items()}  # once per volume, not per training scan
    for i in keep:
        best = max((global_ncc(flipped[fl], spectra[i], shape, tmpl[fl])[0], fl) for fl in FLIPS)
        coarse.append((best[0], i, best[1]))
    coarse.sort(reverse=True)
    best = {"global": -1.0}
    for score_c, i, _ in coarse[: p.candidates]:
        b = bank.feats[i].fine
        fshape = fft_shape(f.fine.shape, b.shape)
        fb = spectra_of(b, fshape)
        flip_scores = sorted(((global_ncc(np.flip(f.fine, fl) if fl else f.fine, fb, fshape)[0], fl)
                              for fl in FLIPS), reverse=True)
        fl = flip_scores[0][1]
        a = np.flip(f.fine, fl) if fl else f.fine
        # rotations and scalings ranked on the coarse grid (an eighth of the voxels); the identity and the
        # TRANSFORMS_FINE best are scored on the fine grid
        ac, bc = (np.flip(f.coarse, fl) if fl else f.coarse), bank.feats[i].coarse
        cshape = fft_shape(ac.shape, bc.shape)
        fbc = spectra_of(bc, cshape)
        ranked = sorted(((global_ncc(_warp(ac, m), fbc, cshape)[0], k) for k, (_, m) in enumerate(transforms(p))
                         if k), reverse=True)
        chosen = [0] + [k for _, k in ranked[:TRANSFORMS_FINE]]
        tried = [(global_ncc(w, fb, fshape), name, w) for name, m in (transforms(p)[k] for k in chosen)
                 for w in [_warp(a, m)]]
        (g, shift), name, w = max(tried, key=lambda t: t[0][0])
        loc = local_score(patch_scores(w, b, int(round(p.patch_mm / p.fine_mm)), shift,
                                       int(round(p.patch_radius_mm / p.fine_mm)), p.patch_min_lung))
        if g > best["global"]:  # the nearest scan: the best whole-lung match
            flip_name = "+".join("zyx"[k] for k in fl) or "none"
            best = {**best, "global": g, "nearest": bank.ids[i], "coarse": score_c,
                    "disguise": {"flip": flip_name, "transform": name, "shift_voxels": list(shift),
                                 "grid_mm": p.fine_mm}}
        best["local"] = max(best.get("local", -1.0), loc)  # each score its best over the candidates
    return best


_BANK: Bank | None = None  # a worker process's copy of the bank


def save_bank(bank: Bank, fh, **meta) -> None:
    """The bank as an .npz (to a path or an open file), with ``meta`` (JSON) beside its ids and settings."""
    arrays = {f"{kind}_{i}": getattr(f, kind) for i, f in enumerate(bank.feats) for kind in ("coarse", "fine")}
    meta = json.dumps({"ids": bank.ids, "params": bank.p.model_dump(), **meta}, default=_jsonable)
    np.savez(fh, meta=np.array(meta), **arrays)


def load_bank(path: Path) -> tuple[Bank, dict]:
    """(bank, meta) of a file ``save_bank`` wrote; the bank remembers the file."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        p = AuditParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()})
        feats = [Features(z[f"coarse_{i}"], z[f"fine_{i}"]) for i in range(len(meta["ids"]))]
    return Bank(meta["ids"], feats, p, file=Path(path)), meta


def _init_worker(path: str) -> None:
    global _BANK
    _BANK = load_bank(Path(path))[0]


def _nearest_job(job: tuple[Features, str | None], bank: Bank) -> dict:
    f, exclude = job
    return nearest(f, bank, exclude=exclude)


def _in_worker(fn, job):
    return fn(job, _BANK)


def nearest_many(jobs: list[tuple[Features, str | None]], bank: Bank, workers: int | None = None,
                 progress=None, desc: str = "audit") -> list[dict]:
    """``nearest(features, bank, exclude)`` of each job, in order, on up to ``workers`` processes."""
    return map_with_bank(_nearest_job, jobs, bank, workers, progress, desc)


def map_with_bank(fn, jobs: list, bank: Bank, workers: int | None = None, progress=None, desc: str = "audit") -> list:
    """``fn(job, bank)`` of each job, in order, on up to ``workers`` processes (default: one per core;
    ``fn`` a module-level function). Each volume's search is independent and single-threaded (numpy,
    pocketfft), so processes scale with the cores where threads do not; every worker holds a copy of
    the bank (about 4 MB per training scan at 256x256x128), hence the cap. The scores do not depend on it.
    Workers read the bank from its file (``bank.file``, else a temporary one): handed over at start-up,
    it would go through the pipe that starts each worker, and a worker dying as it starts would leave
    that write (and us) blocked."""
    progress = progress or (lambda it, **kw: it)
    workers = min(workers or usable_cores(), len(jobs))
    if workers <= 1:
        return [fn(job, bank) for job in progress(jobs, desc=desc, unit="scan")]
    with tempfile.TemporaryDirectory(prefix="medsyn-audit-") as tmp:
        path = bank.file
        if path is None:
            save_bank(bank, path := Path(tmp) / "bank.npz")
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(str(path),)) as pool:
                return list(progress(pool.map(functools.partial(_in_worker, fn), jobs), total=len(jobs),
                                     desc=desc, unit="scan"))
        except BrokenProcessPool as e:
            raise MedsynError(
                f"the audit's {workers} worker processes ended abruptly ({str(e).rstrip('.')}). They start by importing the "
                "script that runs the audit: guard its code with `if __name__ == \"__main__\":`, or run "
                "with one worker (publish --workers 1)") from None


# -- calibration -----------------------------------------------------------------------------------

def _threshold(null: np.ndarray, alpha: float, margin: float) -> tuple[float, float]:
    """(threshold, fitted false-alarm rate at it): normal fit on Fisher-z scores."""
    z = np.arctanh(np.clip(null, -0.999, 0.999))
    mu, sd = float(z.mean()), max(float(z.std(ddof=1)) if z.size > 1 else 0.1, 0.05)
    t = float(np.tanh(mu + stats.norm.ppf(1 - alpha) * sd)) + margin
    fa = float(stats.norm.sf((np.arctanh(min(t, 0.999)) - mu) / sd))
    return t, fa


def calibrate(null_scores: list[dict], p: AuditParams, seed: int = 0) -> dict:
    """Thresholds for ``global`` and ``local`` from nearest-neighbour scores of unseen real scans."""
    out = {"false_alarm_target": p.false_alarm, "margin": p.margin, "null_n": len(null_scores)}
    rng = np.random.default_rng(seed)
    for key in ("global", "local"):
        null = np.array([s[key] for s in null_scores], float)
        if null.size < 2:
            raise MedsynError(f"the audit needs at least 2 unseen real scans to calibrate ({null.size} given)")
        t, fa = _threshold(null, p.false_alarm, p.margin)
        boot = [_threshold_fa(null[rng.integers(0, null.size, null.size)], t) for _ in range(500)]
        exceed = int((null > t).sum())
        ci = stats.binomtest(exceed, null.size).proportion_ci(0.95)
        out[key] = {"threshold": t, "false_alarm_fit": fa,
                    "false_alarm_fit_95ci": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
                    "null_exceeding": exceed, "false_alarm_empirical_95ci": [float(ci.low), float(ci.high)],
                    "null_max": float(null.max()), "null_mean": float(null.mean())}
    return out


def _threshold_fa(null: np.ndarray, t: float) -> float:
    z = np.arctanh(np.clip(null, -0.999, 0.999))
    sd = max(float(z.std(ddof=1)), 0.05)
    return float(stats.norm.sf((np.arctanh(min(t, 0.999)) - z.mean()) / sd))


def _jsonable(x):
    return x.item() if isinstance(x, np.generic) else list(x) if isinstance(x, tuple) else str(x)


def flagged(score: dict, calibration: dict) -> list[str]:
    return [k for k in ("global", "local") if score.get(k) is not None and score[k] > calibration[k]["threshold"]]


# -- the training cohort's features, cached beside it -------------------------------------------------

def cohort_key(cohort, p: AuditParams) -> str:
    """Identity of (cohort content, audit settings): the sha256s of its cases and the parameters."""
    body = {"version": VERSION, "params": p.model_dump(),
            "cases": sorted((c.id, c.split, c.sha256["image"]) for c in cohort.cases)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def training_bank(cohort, p: AuditParams = AuditParams(), progress=None, workers: int | None = None,
                  unseen: tuple = ()) -> tuple[Bank, list[dict], Path | None]:
    """(bank of train-split features, null scores of unseen real scans, cache file or None).
    The unseen scans are the cohort's val/test scans and those of the ``unseen`` cohorts (real scans
    the model never saw: for a cohort of training scans only). Computed once per cohort content and
    settings (on ``workers`` processes, see ``nearest_many``), cached in COHORT/.medsyn-audit/."""
    key = cohort_key(cohort, p)
    if unseen:
        key = hashlib.sha256("".join([key, *(cohort_key(c, p) for c in unseen)]).encode()).hexdigest()
    path = Path(cohort.root) / CACHE_DIR / f"features-{key[:24]}.npz"
    if path.is_file():
        try:
            bank, meta = load_bank(path)
            if meta["key"] == key:
                return bank, meta["null"], path
        except (OSError, ValueError, KeyError) as e:  # a damaged cache is recomputed
            log.warning("%s: unreadable audit cache (%s); recomputing", path, e)
    progress = progress or (lambda it, **kw: it)
    feats = {r.id: Features.of(cohort.arrays(r.id)[0], r.spacing, p)
             for r in progress(cohort.cases, desc="audit: training cohort features", unit="scan")}
    train = [r.id for r in cohort.cases if r.split == "train"]
    heldout = [r.id for r in cohort.cases if r.split != "train"]
    for c in unseen:
        for r in progress(c.cases, desc=f"audit: unseen scans of {c.root}", unit="scan"):
            feats[cid := f"{Path(c.root).name}/{r.id}"] = Features.of(c.arrays(r.id)[0], r.spacing, p)
            heldout.append(cid)
    if not train or not heldout:
        raise MedsynError(f"{cohort.root}: the audit needs train cases and held-out (val/test) cases to calibrate")
    bank = Bank(train, [feats[i] for i in train], p)
    unseen = heldout + train
    scores = nearest_many([(feats[cid], cid) for cid in unseen], bank, workers, progress,
                          desc="audit: calibration (unseen real scans)")
    null = [{"case": cid, "kind": "held-out" if cid in heldout else "train, leave-one-out", **s}
            for cid, s in zip(unseen, scores)]
    try:
        from medsyn_site.atomic import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                save_bank(bank, fh, key=key, null=null)
        atomic_write(path, write)
        bank.file = path  # the synthetic volumes' search reads it (nearest_many)
    except OSError as e:  # a read-only cohort: no cache, same result
        log.warning("%s: cannot cache the audit features (%s)", path, e)
        path = None
    return bank, null, path
