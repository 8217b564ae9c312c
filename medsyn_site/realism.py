"""Realism measures a reviewer would trust: each compares a set of synthetic volumes with a set of
real ones, and means something only beside the same measure between two sets of real volumes (the
real-vs-real baseline, ``compare(real_a, real_b)``).

- two classifier two-sample tests (C2ST) on patches inside the body, split by volume (no volume
  gives patches to both training and test): a logistic regression on 19 hand-made patch features
  (HU histogram, gradient and Laplacian statistics) with cross-validation by volume, and a 3-D CNN
  with batch norm trained until its training accuracy stops rising, tested on the other volumes'
  patches (its held-out curve is kept). Accuracy 0.5: the classifier cannot tell the sets apart.
- MONAI's MMD between patch sets and MS-SSIM between volumes of one set (its diversity: a generator
  that paints one average chest has a higher within-set MS-SSIM than real scans);
- HU histograms per region (lung cavity, body wall) and their 1-D Wasserstein distances;
- the radially averaged power spectrum of the lung interior (blur removes the high frequencies);
- vessels in the lungs: density (voxels above -500 HU in the lung cavity, nodules excluded) and
  connectivity (share of vessel voxels in components of at least 10 voxels: trees, not speckle);
- sharpness of the body outline (mean HU gradient across the skin, HU/mm);
- nodule contrast by nodule type (solid, part-solid, ground-glass): mean HU in the mask minus the
  median HU of the scan's lung cavity (a shell around the nodule swings with what it touches: between
  two real phantom sets its per-type ratios were 0.52-2.43, against 0.93-1.16 with the lung's median).

No feature extractor is downloaded: the only learnt features are the CNN's, trained here on the
two sets being compared. Volumes are HU arrays (z, y, x) with their spacing in mm (x, y, z).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, stats

from medsyn_site.imaging import (body_mask, component_types, label_nodules, lung_mask, lung_region, nodule_codes,
                                 pleural_depth)
from medsyn_site.quality import nodule_contrasts

HU_WINDOW = (-1024.0, 1024.0)  # what the classifiers see, scaled to [-1, 1]
FEATURE_BINS = (-np.inf, -900, -800, -700, -600, -500, -300, -100, 100, 400, np.inf)
NODULE_TYPES = ("solid", "part-solid", "ground-glass")


@dataclass
class Volume:
    hu: np.ndarray                       # z, y, x
    mask: np.ndarray | None = None       # nodule mask (nonzero = nodule)
    spacing: tuple = (1.0, 1.0, 1.0)     # x, y, z mm
    types: dict = field(default_factory=dict)  # voxel count -> type, for nodules ``codes`` leaves unknown
    codes: np.ndarray | None = None      # imaging.NODULE_CODES per voxel (types each nodule; mask = codes > 0)

    def __post_init__(self):
        self.hu = np.asarray(self.hu, np.float32)
        if self.mask is None and self.codes is not None:
            self.mask = self.codes
        self.mask = np.zeros(self.hu.shape, bool) if self.mask is None else np.asarray(self.mask) > 0
        self.body = body_mask(self.hu)
        self.cavity = lung_cavity(self.hu, self.body)

    def nodules(self) -> tuple[np.ndarray, list[str]]:
        """The nodules as labels 1..n and each one's type: its code where ``codes`` knows it, else
        ``types`` by its voxel count (a relocated nodule keeps its count), else "unknown"."""
        labels, n = label_nodules(self.mask)
        kinds = component_types(np.where(self.mask, self.codes, 0))[1] if self.codes is not None else ["unknown"] * n
        if "unknown" in kinds:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            kinds = [self.types.get(int(sizes[i + 1]), "unknown") if k == "unknown" else k for i, k in enumerate(kinds)]
        return labels, kinds


def lung_cavity(hu: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """The lungs with what lies inside them (vessels, nodules): the parenchyma closed and its holes
    filled per axial slice, then eroded one voxel (off the pleura's partial volume)."""
    lung = ndimage.binary_closing(lung_region(hu, body), iterations=2)
    lung = np.stack([ndimage.binary_fill_holes(s) for s in lung])
    return ndimage.binary_erosion(lung, iterations=1)


# -- patches and the two classifier two-sample tests ---------------------------------------------------
def body_patches(vols: list[Volume], per_volume: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_volume`` cubes of ``size`` voxels centred in each volume's body (anywhere in the volume
    if no cube centred in its body fits, e.g. a sample without a body): (patches, volume index)."""
    out, group = [], []
    h = size // 2
    for i, v in enumerate(vols):
        if min(v.hu.shape) < size:
            raise ValueError(f"volume {i}: shape {v.hu.shape} is smaller than a {size}^3 patch")
        fits = np.zeros(v.hu.shape, bool)
        fits[tuple(slice(h, n - (size - h) + 1) for n in v.hu.shape)] = True
        zyx = np.argwhere(fits & v.body) if (fits & v.body).any() else np.argwhere(fits)
        for c in zyx[rng.integers(len(zyx), size=per_volume)] - h:
            out.append(v.hu[c[0]:c[0] + size, c[1]:c[1] + size, c[2]:c[2] + size])
            group.append(i)
    return np.stack(out).astype(np.float32), np.asarray(group)


def patch_features(p: np.ndarray) -> np.ndarray:
    """19 features per patch (n, s, s, s): the HU histogram (10 bins), mean and spread, gradient
    magnitude (mean, spread, 10/50/90th percentiles), |Laplacian| mean, and the share of neighbour
    pairs along z that cross -500 HU (air-tissue edges)."""
    n = len(p)
    flat = p.reshape(n, -1)
    hist = np.stack([((flat >= lo) & (flat < hi)).mean(1) for lo, hi in zip(FEATURE_BINS[:-1], FEATURE_BINS[1:])], 1)
    g = np.sqrt(sum(d ** 2 for d in np.gradient(p, axis=(1, 2, 3)))).reshape(n, -1)
    lap = np.abs(np.stack([ndimage.laplace(x) for x in p])).reshape(n, -1)
    edge = (np.diff(p > -500, axis=1)).reshape(n, -1).mean(1)
    return np.column_stack([hist, flat.mean(1), flat.std(1), g.mean(1), g.std(1),
                            *np.percentile(g, [10, 50, 90], axis=1), lap.mean(1), edge]).astype(np.float64)


def _folds(n_real: int, n_synth: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold of each volume, dealt out per set so that every fold tests volumes of both sets."""
    return np.arange(n_real) % k, np.arange(n_synth) % k


def _need_volumes(real: list, synth: list, k: int) -> None:
    if min(len(real), len(synth)) < k:
        raise ValueError(f"a classifier two-sample test by volume needs >= {k} volumes per set "
                         f"(got {len(real)} real, {len(synth)} synthetic)")


def _balanced_accuracy(pred_real: np.ndarray, pred_synth: np.ndarray) -> float:
    """Mean of the per-set accuracies (label 1 = real): 0.5 for a classifier that cannot tell."""
    return float((np.mean(pred_real == 1) + np.mean(pred_synth == 0)) / 2)


def feature_c2st(real: list[Volume], synth: list[Volume], patch: int = 16, per_volume: int = 200,
                 folds: int = 5, seed: int = 0) -> dict:
    """Logistic regression on ``patch_features``, cross-validated by volume: accuracy per fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = min(folds, len(real), len(synth))
    _need_volumes(real, synth, 2)
    rng = np.random.default_rng(seed)
    (pr, gr), (ps, gs) = body_patches(real, per_volume, patch, rng), body_patches(synth, per_volume, patch, rng)
    fr, fs = patch_features(pr), patch_features(ps)
    kr, ks = _folds(len(real), len(synth), k)
    accs, coefs = [], []
    for f in range(k):
        tr_r, tr_s = kr[gr] != f, ks[gs] != f
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        clf.fit(np.concatenate([fr[tr_r], fs[tr_s]]), np.r_[np.ones(tr_r.sum()), np.zeros(tr_s.sum())])
        accs.append(_balanced_accuracy(clf.predict(fr[~tr_r]), clf.predict(fs[~tr_s])))
        coefs.append(clf[-1].coef_[0])
    return {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "folds": accs,
            "coefficients": np.mean(coefs, 0).round(3).tolist()}


def _cnn(width: int = 16):
    import torch.nn as nn

    def block(i, o, stride):
        return [nn.Conv3d(i, o, 3, stride=stride, padding=1), nn.BatchNorm3d(o), nn.ReLU()]
    return nn.Sequential(*block(1, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
                         *block(4 * width, 4 * width, 1), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                         nn.Linear(4 * width, 1))


def cnn_c2st(real: list[Volume], synth: list[Volume], patch: int = 16, per_volume: int = 200, steps: int = 600,
             batch: int = 32, eval_every: int = 50, seed: int = 0) -> dict:
    """A 3-D CNN (4 conv layers with batch norm, ~120 k parameters) trained on the patches of half
    the volumes of each set (random flips) and tested on the other half's, both ways (2 folds).
    Returns the final held-out accuracy (mean over folds), the training accuracy at the end, and the
    curve (step, training loss, training accuracy, held-out accuracy) of each fold."""
    import torch

    _need_volumes(real, synth, 2)
    rng = np.random.default_rng(seed)
    (pr, gr), (ps, gs) = body_patches(real, per_volume, patch, rng), body_patches(synth, per_volume, patch, rng)
    lo, hi = HU_WINDOW

    def scale(x):
        return torch.from_numpy((np.clip(x, lo, hi) - (hi + lo) / 2) / ((hi - lo) / 2))[:, None].float()
    kr, ks = _folds(len(real), len(synth), 2)
    finals, trains, curves = [], [], []
    for f in range(2):
        torch.manual_seed(seed + f)
        xr, xs = scale(pr[kr[gr] != f]), scale(ps[ks[gs] != f])
        tr, ts = scale(pr[kr[gr] == f]), scale(ps[ks[gs] == f])
        net = _cnn()
        opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
        lr = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)  # decays to ~0: a stable end
        curve, losses, hits = [], [], []
        for step in range(1, steps + 1):
            net.train()
            ir, is_ = rng.integers(len(xr), size=batch // 2), rng.integers(len(xs), size=batch // 2)
            x = torch.cat([xr[ir], xs[is_]])
            for ax in (2, 3, 4):  # random flips: what the classifier learns must survive them
                if rng.random() < 0.5:
                    x = x.flip(ax)
            y = torch.cat([torch.ones(batch // 2), torch.zeros(batch // 2)])
            logit = net(x)[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr.step()
            losses.append(float(loss.detach()))
            hits.append(float(((logit > 0).float() == y).float().mean()))
            if step % eval_every == 0 or step == steps:
                net.eval()
                with torch.no_grad():
                    held = _balanced_accuracy((net(tr)[:, 0] > 0).numpy().astype(int),
                                              (net(ts)[:, 0] > 0).numpy().astype(int))
                curve.append((step, float(np.mean(losses[-eval_every:])), float(np.mean(hits[-eval_every:])), held))
        finals.append(curve[-1][3])
        trains.append(curve[-1][2])
        curves.append(curve)
    return {"accuracy": float(np.mean(finals)), "std": float(np.std(finals)), "folds": finals,
            "train_accuracy": float(np.mean(trains)), "curves": curves, "steps": steps, "patch": patch}


# -- distribution and structure measures ---------------------------------------------------------------
def mmd(real: list[Volume], synth: list[Volume], patch: int = 16, per_volume: int = 50, seed: int = 0) -> float:
    """MONAI's unbiased linear-kernel MMD between patches of the two sets ([-1, 1] units), per voxel:
    the squared distance of the two patch means (~0, either sign, when they agree)."""
    import torch
    from monai.metrics import MMDMetric

    rng = np.random.default_rng(seed)
    pr, ps = body_patches(real, per_volume, patch, rng)[0], body_patches(synth, per_volume, patch, rng)[0]
    n = min(len(pr), len(ps))
    lo, hi = HU_WINDOW

    def t(x):
        return torch.from_numpy((np.clip(x[:n], lo, hi) - (hi + lo) / 2) / ((hi - lo) / 2))[:, None].float()
    return float(MMDMetric()(t(pr), t(ps))) / patch ** 3  # per voxel: comparable across patch sizes


def ms_ssim_diversity(vols: list[Volume]) -> float | None:
    """Mean MONAI MS-SSIM over pairs of same-shape volumes of one set (1: identical volumes)."""
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    lo, hi = HU_WINDOW
    pairs = [(a, b) for i, a in enumerate(vols) for b in vols[i + 1:] if a.hu.shape == b.hu.shape]
    if not pairs:
        return None
    size = min(pairs[0][0].hu.shape)  # MONAI's own size rule for len(weights) scales, kernel 3:
    scales = max(k for k in range(1, 6) if size // max(1, k - 1) ** 2 > 2)
    w = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales]
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=3, weights=tuple(np.array(w) / sum(w)))

    def t(v):
        return torch.from_numpy((np.clip(v.hu, lo, hi) - lo) / (hi - lo))[None, None].float()
    return float(np.mean([float(metric(t(a), t(b)).mean()) for a, b in pairs]))


def region_values(vols: list[Volume], region: str, max_voxels: int = 400_000, seed: int = 0) -> np.ndarray:
    """Pooled HU of a region ('lung': the lung cavity, 'wall': the body outside it), subsampled."""
    vals = np.concatenate([v.hu[v.cavity if region == "lung" else v.body & ~v.cavity] for v in vols])
    rng = np.random.default_rng(seed)
    return vals if vals.size <= max_voxels else vals[rng.choice(vals.size, max_voxels, replace=False)]


def lung_spectrum(v: Volume, window: int = 8) -> np.ndarray | None:
    """Radially averaged power spectrum (HU^2, bins of 1/window cycles per voxel from 0 to 0.5) of
    axial windows lying wholly in the lung cavity (Hann-tapered, mean removed), averaged."""
    taper = np.outer(np.hanning(window), np.hanning(window))
    fy, fx = np.meshgrid(np.fft.fftfreq(window), np.fft.fftfreq(window), indexing="ij")
    radius = np.rint(np.hypot(fy, fx) * window).astype(int)
    nbins = window // 2 + 1
    acc, n = np.zeros(nbins), 0
    step = window // 2
    for z in range(v.hu.shape[0]):
        inside = ndimage.binary_erosion(v.cavity[z], np.ones((window, window)), border_value=0)  # window fits
        for y, x in np.argwhere(inside):
            y0, x0 = y - window // 2, x - window // 2
            if y0 % step or x0 % step:
                continue
            w = v.hu[z, y0:y0 + window, x0:x0 + window]
            p = np.abs(np.fft.fft2((w - w.mean()) * taper)) ** 2
            acc += np.bincount(radius.ravel(), p.ravel(), minlength=radius.max() + 1)[:nbins]
            n += 1
    if not n:
        return None
    counts = np.bincount(radius.ravel(), minlength=radius.max() + 1)[:nbins]
    return acc / n / counts


def vessels(v: Volume, threshold: float = -500.0, min_component: int = 10) -> tuple[float, float]:
    """(density, connectivity) of the vessels in the lung cavity: the share of cavity voxels above
    ``threshold`` HU (nodules and a 2-voxel margin excluded), and the share of those voxels in
    26-connected components of at least ``min_component`` voxels."""
    where = v.cavity & ~ndimage.binary_dilation(v.mask, iterations=2)
    vessel = where & (v.hu > threshold)
    if not where.any():
        return float("nan"), float("nan")
    labels, n = ndimage.label(vessel, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    connected = sizes[sizes >= min_component].sum() / max(sizes.sum(), 1)
    return float(vessel.sum() / where.sum()), float(connected)


def outline_sharpness(v: Volume) -> float:
    """Mean in-plane HU gradient (HU/mm) on the body's outline, the skin-air edge, per axial slice."""
    sx, sy = v.spacing[0], v.spacing[1]
    gy, gx = np.gradient(v.hu, sy, sx, axis=(1, 2))
    edge = v.body & ~np.stack([ndimage.binary_erosion(s) for s in v.body])
    return float(np.hypot(gy, gx)[edge].mean()) if edge.any() else float("nan")


def contrasts_by_type(vols: list[Volume], reference: str = "lung") -> dict[str, list[float]]:
    """Nodule contrasts (HU) grouped by the nodule's type (``Volume.nodules``): the
    nodule's mean HU minus the median HU of its scan's lung cavity (``reference="lung"``: the
    parenchyma, whatever lies next to the nodule), or minus a 2-voxel shell around it ("shell", as
    ``quality.nodule_contrasts``: swings with what the nodule touches, pleura or vessel)."""
    out: dict[str, list[float]] = {}
    for v in vols:
        labels, kinds = v.nodules()
        lung = v.cavity & ~v.mask
        background = float(np.median(v.hu[lung])) if lung.any() else None
        for lab, kind in enumerate(kinds, start=1):
            comp = labels == lab
            if reference == "lung":
                c = [float(v.hu[comp].mean()) - background] if background is not None else []
            else:
                c = [x.contrast for x in nodule_contrasts(v.hu, comp)]
            if c:
                out.setdefault(kind, []).append(c[0])
    return out


def pleural_by_type(vols: list[Volume]) -> dict[str, list[bool]]:
    """Whether each nodule touches the pleura (``imaging.pleural_depth`` of its scan's lungs, the
    nodules included), grouped by type: a faint nodule against the wall reads brighter (partial
    volume), so two sets' contrasts compare only at like shares. In ``contrasts_by_type``'s order (a
    volume without lung parenchyma is left out of both)."""
    out: dict[str, list[bool]] = {}
    for v in vols:
        if not (v.cavity & ~v.mask).any():
            continue
        labels, kinds = v.nodules()
        depth = pleural_depth(lung_mask(v.hu) | v.mask)
        for lab, kind in enumerate(kinds, start=1):
            out.setdefault(kind, []).append(bool(depth[labels == lab].min() <= 1))
    return out


def _mean_sd(values) -> dict:
    values = [x for x in values if x == x]
    return {"mean": float(np.mean(values)) if values else None, "sd": float(np.std(values)) if values else None}


def describe(vols: list[Volume]) -> dict:
    """The per-set numbers: vessel density and connectivity, outline sharpness, lung spectrum,
    nodule contrast per type, within-set MS-SSIM, region HU means."""
    vs = [vessels(v) for v in vols]
    spectra = [s for s in (lung_spectrum(v) for v in vols) if s is not None]
    by_type = contrasts_by_type(vols)
    return {"volumes": len(vols),
            "vessel_density": _mean_sd([d for d, _ in vs]), "vessel_connectivity": _mean_sd([c for _, c in vs]),
            "outline_sharpness_hu_mm": _mean_sd([outline_sharpness(v) for v in vols]),
            "lung_spectrum": np.mean(spectra, 0).tolist() if spectra else None,
            "contrast_by_type": {t: _mean_sd(c) | {"n": len(c)} for t, c in sorted(by_type.items())},
            "ms_ssim_within": ms_ssim_diversity(vols)}


def _w1(a: np.ndarray, b: np.ndarray) -> float | None:
    """1-D Wasserstein distance (HU); None when a set has no such region (a sample without lungs)."""
    return float(stats.wasserstein_distance(a, b)) if a.size and b.size else None


def compare(real: list[Volume], other: list[Volume], cnn_steps: int = 600, seed: int = 0,
            real_description: dict | None = None) -> dict:
    """Every measure of ``other`` (synthetic volumes, or a second real set for the baseline) against
    ``real``. Ratios are other / real; spectra compare at frequencies >= 0.25 cycles per voxel."""
    r = real_description or describe(real)
    o = describe(other)

    def ratio(key):
        a, b = r[key]["mean"], o[key]["mean"]
        return None if a in (None, 0) or b is None else b / a
    hf = None
    if r["lung_spectrum"] and o["lung_spectrum"]:
        pr, po = np.array(r["lung_spectrum"]), np.array(o["lung_spectrum"])
        high = np.arange(len(pr)) / (2 * (len(pr) - 1)) >= 0.25
        hf = float(po[high].sum() / pr[high].sum())
    types = {t: {"real": r["contrast_by_type"][t]["mean"], "other": o["contrast_by_type"][t]["mean"],
                 "ratio": o["contrast_by_type"][t]["mean"] / r["contrast_by_type"][t]["mean"]}
             for t in NODULE_TYPES if t in r["contrast_by_type"] and t in o["contrast_by_type"]
             and r["contrast_by_type"][t]["mean"]}
    return {"cnn_c2st": cnn_c2st(real, other, steps=cnn_steps, seed=seed),
            "feature_c2st": feature_c2st(real, other, seed=seed),
            "mmd": mmd(real, other, seed=seed),
            "hu_w1": {reg: _w1(region_values(real, reg), region_values(other, reg)) for reg in ("lung", "wall")},
            "lung_high_frequency_power_ratio": hf,
            "vessel_density_ratio": ratio("vessel_density"), "vessel_connectivity_ratio": ratio("vessel_connectivity"),
            "outline_sharpness_ratio": ratio("outline_sharpness_hu_mm"),
            "contrast_by_type": types, "real": r, "other": o}


def cohort_volumes(root, split: str | None = None, types: dict | None = None, only: set[str] | None = None
                   ) -> list[Volume]:
    """A cohort's volumes (optionally one split, or the cases in ``only``). Each nodule's type comes
    from the cohort's own records (found at their centre voxels), else from ``types`` (voxel count ->
    type; a synthetic cohort sampled from relocated real masks takes its real cohort's: relocation
    keeps each nodule's voxel count)."""
    from medsyn_site.data.cohort import Cohort

    c = Cohort(root)
    out = []
    for rec in c.cases:
        if (split and rec.split != split) or (only is not None and rec.id not in only):
            continue
        hu, mask = c.arrays(rec.id)
        out.append(Volume(hu, mask, tuple(rec.spacing), dict(types or {}), nodule_codes(mask, rec.nodules)))
    return out


def record_types(rec, mask: np.ndarray) -> dict[int, str]:
    """Voxel count -> type of a case record's nodules, found in its mask at their centre voxels."""
    labels, types = component_types(nodule_codes(mask, rec.nodules))
    return {int(size): t for size, t in zip(np.bincount(labels.ravel())[1:], types) if t != "unknown"}


def nodule_types(vols: list[Volume]) -> dict[int, str]:
    """Voxel count -> type over a set of real volumes (to type a synthetic set's relocated nodules
    its records do not type)."""
    out = {}
    for v in vols:
        labels, kinds = v.nodules()
        sizes = np.bincount(labels.ravel())
        out |= {int(sizes[i]): k for i, k in enumerate(kinds, start=1) if k != "unknown"}
    return out


def short(m: dict) -> dict:
    """The numbers a card or a log shows of a ``compare``."""
    return {"cnn_c2st": m["cnn_c2st"]["accuracy"], "cnn_c2st_sd": m["cnn_c2st"]["std"],
            "cnn_train_accuracy": m["cnn_c2st"]["train_accuracy"], "feature_c2st": m["feature_c2st"]["accuracy"],
            "mmd": m["mmd"], "hu_w1": m["hu_w1"], "lung_high_frequency_power_ratio": m["lung_high_frequency_power_ratio"],
            "vessel_density_ratio": m["vessel_density_ratio"], "vessel_connectivity_ratio": m["vessel_connectivity_ratio"],
            "outline_sharpness_ratio": m["outline_sharpness_ratio"],
            "contrast_ratio_by_type": {t: v["ratio"] for t, v in m["contrast_by_type"].items()},
            "ms_ssim_within": m["other"]["ms_ssim_within"], "ms_ssim_within_real": m["real"]["ms_ssim_within"]}


def summarize(real: list[Volume], synth: list[Volume], real_other: list[Volume] | None = None,
              cnn_steps: int = 600, seed: int = 0) -> dict:
    """``compare`` of the synthetic set against ``real``, and of a second real set (the baseline)
    against the same, in short; ``lines``: what a log prints."""
    desc = describe(real)
    out = {"real_volumes": len(real), "synthetic_volumes": len(synth),
           "synthetic": short(compare(real, synth, cnn_steps, seed, desc)),
           "real_vs_real": short(compare(real, real_other, cnn_steps, seed, desc))
           if real_other and len(real_other) >= 2 else None}
    for part in (out["synthetic"], out["real_vs_real"]):
        if part:  # a realism claim is only as good as the strongest classifier tried
            part["strongest_c2st"] = max(part["cnn_c2st"], part["feature_c2st"])
    s, b = out["synthetic"], out["real_vs_real"] or {}

    def f(key, unit=""):
        v, w = s.get(key), b.get(key)
        return ((f"{v:.2f}{unit}" if v is not None else "-")
                + (f" (real-vs-real {w:.2f}{unit})" if w is not None else ""))
    converged = "" if s["cnn_train_accuracy"] >= 0.9 else (
        f"; its training accuracy {s['cnn_train_accuracy']:.2f}: not converged, more publish.realism.cnn_steps")
    types = ", ".join(f"{t} {r:.2f}x" for t, r in s["contrast_ratio_by_type"].items()) or "no typed nodules"
    out["lines"] = [
        f"realism, {len(synth)} synthetic vs {len(real)} real volumes: the strongest classifier tells synthetic "
        f"from real patches with accuracy {f('strongest_c2st')} (0.5: cannot tell); CNN {f('cnn_c2st')}"
        f"{converged}; feature classifier {f('feature_c2st')}",
        f"realism against real: lung vessel density {f('vessel_density_ratio', 'x')}, high-frequency lung power "
        f"{f('lung_high_frequency_power_ratio', 'x')}, body outline sharpness {f('outline_sharpness_ratio', 'x')}; "
        f"nodule contrast by type: {types}"]
    return out
