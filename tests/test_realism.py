"""The realism measures against answers known by construction: hand-made geometry, white noise, a
shifted copy, a blurred copy, and two draws of one distribution."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsyn_site import realism
from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.imaging import NODULE_CODES

SP = (1.5, 1.5, 2.0)  # x, y, z mm


def _chest(shape=(24, 40, 40), lung_hu=-850.0, noise=0.0, seed=0) -> np.ndarray:
    """A box of soft tissue (0 HU) in air with a box-shaped lung cavity inside."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, np.float32)
    hu[:, 4:-4, 4:-4] = 0.0
    hu[2:-2, 10:-10, 10:-10] = lung_hu
    return hu + noise * rng.standard_normal(shape).astype(np.float32)


def test_vessel_density_and_connectivity_of_drawn_tubes_and_speckle():
    hu = _chest()
    hu[:, 20, 20] = 40.0  # a vessel along z through the whole lung
    hu[5, 14, 25] = hu[15, 25, 14] = 40.0  # two single-voxel specks
    v = realism.Volume(hu, None, SP)
    box = np.zeros(hu.shape, bool)
    box[2:-2, 10:-10, 10:-10] = True
    assert np.array_equal(v.cavity, ndimage.binary_erosion(box))  # the lung with its vessels, off the pleura
    tube = v.cavity[:, 20, 20].sum()
    density, connected = realism.vessels(v)
    assert density == pytest.approx((tube + 2) / v.cavity.sum())
    assert connected == pytest.approx(tube / (tube + 2))
    v.mask[:, 19:22, 19:22] = True  # the tube is a nodule now: excluded with a 2-voxel margin
    assert realism.vessels(v)[0] == pytest.approx(2 / (v.cavity & ~ndimage.binary_dilation(v.mask, iterations=2)).sum())


def test_outline_sharpness_of_a_step_edge_and_of_its_blur():
    hu = _chest()
    sharp = realism.outline_sharpness(realism.Volume(hu, None, SP))
    # a 1000 HU step: the central difference on the outline is 1000 / (2 * 1.5 mm); corners a little more
    assert 1000 / 3 <= sharp <= 1.1 * 1000 / 3
    blurred = realism.outline_sharpness(realism.Volume(ndimage.gaussian_filter(hu, 1.5), None, SP))
    assert blurred < 0.7 * sharp


def test_lung_spectrum_of_white_noise_is_flat_and_blur_removes_the_high_frequencies():
    sigma = 30.0
    v = realism.Volume(_chest(noise=sigma, shape=(24, 48, 48)), None, SP)
    spec = realism.lung_spectrum(v, window=8)
    taper = np.outer(np.hanning(8), np.hanning(8))
    # white noise: E|FFT|^2 = sigma^2 * sum(taper^2) at every frequency but 0 (the mean is removed)
    assert spec[1:] == pytest.approx(sigma ** 2 * (taper ** 2).sum(), rel=0.15)
    smooth = realism.Volume(np.where(v.cavity, ndimage.gaussian_filter(v.hu, 1.0), v.hu), None, SP)
    low = realism.lung_spectrum(smooth, window=8)
    assert low[-1] < 0.1 * spec[-1]


def test_nodule_contrast_by_type_and_identical_volumes():
    hu = _chest()
    mask = np.zeros(hu.shape, np.uint8)
    hu[8:12, 14:18, 14:18], mask[8:12, 14:18, 14:18] = 100.0, 1   # 64 voxels, solid: 950 HU above the lung
    hu[8:11, 24:27, 24:27], mask[8:11, 24:27, 24:27] = -550.0, 1  # 27 voxels, ground-glass: 300 HU
    v = realism.Volume(hu, mask, SP, {64: "solid", 27: "ground-glass"})
    assert realism.contrasts_by_type([v]) == {"solid": [pytest.approx(950.0)], "ground-glass": [pytest.approx(300.0)]}
    assert realism.ms_ssim_diversity([v, realism.Volume(hu.copy(), mask, SP)]) == pytest.approx(1.0, abs=1e-5)
    # a pleural nodule (touching the 0 HU chest wall): against the lung it is as solid as the first;
    # a shell around it, half chest wall, says less
    hu[8:12, 10:14, 20:24], mask[8:12, 10:14, 20:24] = 100.0, 1
    v = realism.Volume(hu, mask, SP, {64: "solid", 27: "ground-glass"})
    assert realism.contrasts_by_type([v])["solid"] == [pytest.approx(950.0)] * 2
    shell = realism.contrasts_by_type([v], reference="shell")["solid"]
    assert max(shell) == pytest.approx(950.0) and min(shell) < 800


def test_mmd_is_the_squared_distance_of_the_means():
    vols = [realism.Volume(_chest(noise=50.0, seed=s), None, SP) for s in range(4)]
    shifted = [realism.Volume(v.hu + 102.4, None, SP) for v in vols]  # +0.1 in the classifiers' [-1, 1] units
    same = realism.mmd(vols, [realism.Volume(_chest(noise=50.0, seed=s + 10), None, SP) for s in range(4)])
    assert abs(same) < 2e-3
    assert realism.mmd(vols, shifted) == pytest.approx(0.01, abs=3e-3)


def test_nodules_of_one_size_are_typed_by_their_codes():
    hu = _chest()
    codes = np.zeros(hu.shape, np.uint8)
    hu[8:11, 14:17, 14:17], codes[8:11, 14:17, 14:17] = 100.0, NODULE_CODES["solid"]          # 27 voxels each
    hu[8:11, 24:27, 24:27], codes[8:11, 24:27, 24:27] = -550.0, NODULE_CODES["ground-glass"]
    hu[16:19, 20:23, 20:23], codes[16:19, 20:23, 20:23] = -250.0, NODULE_CODES["unknown"]    # typed by its count
    v = realism.Volume(hu, None, SP, {27: "part-solid"}, codes)
    assert v.mask.sum() == 81
    assert realism.contrasts_by_type([v]) == {"solid": [pytest.approx(950.0)], "ground-glass": [pytest.approx(300.0)],
                                              "part-solid": [pytest.approx(600.0)]}
    assert sorted(realism.pleural_by_type([v])) == ["ground-glass", "part-solid", "solid"]
    # without codes all three are one size: the count map can only type them alike
    assert set(realism.contrasts_by_type([realism.Volume(hu, codes, SP, {27: "solid"})])) == {"solid"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    sets = []
    for seed in (1, 2):
        write_phantom_cohort(PhantomConfig(cases=6, seed=seed, shape=(40, 40, 32)), SplitConfig(train=1.0, val=0.0),
                             root / str(seed))
        sets.append(realism.cohort_volumes(root / str(seed)))
    return sets


def test_classifier_two_sample_tests_cannot_tell_two_real_sets_but_tell_a_blurred_one(phantoms):
    a, b = phantoms
    blurred = [realism.Volume(ndimage.gaussian_filter(v.hu, 0.8), v.mask, v.spacing) for v in b]
    same_f, blur_f = realism.feature_c2st(a, b, per_volume=60), realism.feature_c2st(a, blurred, per_volume=60)
    print("feature C2ST real/real, real/blurred:", same_f["accuracy"], blur_f["accuracy"])
    # two draws of 6 phantoms: the null spread of a by-volume test is wide (0.46-0.65 seen); a blur is not subtle
    assert same_f["accuracy"] < 0.72 and blur_f["accuracy"] > 0.9
    same_c = realism.cnn_c2st(a, b, per_volume=60, steps=100, eval_every=25)
    blur_c = realism.cnn_c2st(a, blurred, per_volume=60, steps=100, eval_every=25)
    print("CNN C2ST real/real, real/blurred:", same_c["accuracy"], blur_c["accuracy"])
    assert same_c["accuracy"] < 0.72 and blur_c["accuracy"] > 0.85
    assert len(blur_c["curves"]) == 2 and [c[0] for c in blur_c["curves"][0]] == [25, 50, 75, 100]
    with pytest.raises(ValueError, match="needs >= 2 volumes per set"):
        realism.cnn_c2st(a[:1], b)


def test_wiener_floor_is_what_the_wiener_filter_reaches_and_nothing_simpler_beats(monkeypatch):
    """benchmarks/realism.py's denoising floor for the phantom's lung texture: the Wiener filter built
    from the same spectrum, applied to a fresh draw noised at t, reaches it (within 5 %); predicting
    the mean (0) or the noisy input itself does worse."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # for its own `import quality` (benchmarks/quality.py)
    for name in ("quality", "bench_realism"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # and put back (or removed) afterwards
    spec = importlib.util.spec_from_file_location("bench_realism", bench_dir / "realism.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from medsyn_site.config import load_config
    from medsyn_site.data.phantom import LUNG_TEXTURE, NOISE_SIGMA_VOX, _smooth_noise
    from medsyn_site.diffusion.model import scheduler

    sched, cfg = scheduler(load_config(None).diffusion), load_config(None)
    floor = bench.wiener_floor(sched, n=8)
    shape, rng = tuple(cfg.data.phantom.shape[::-1]), np.random.default_rng(99)
    draws = [_smooth_noise(rng, shape, *LUNG_TEXTURE) + _smooth_noise(rng, shape, NOISE_SIGMA_VOX, cfg.data.phantom.noise_hu)
             for _ in range(8)]
    power = np.mean([np.abs(np.fft.fftn(x)) ** 2 for x in draws], 0) / np.prod(shape)
    half = (cfg.diffusion.hu_window[1] - cfg.diffusion.hu_window[0]) / 2
    for t in (20, 250):
        abar = float(sched.alphas_cumprod[t])
        s2 = (1 - abar) / abar * half ** 2
        x = draws[0]  # in HU; noised as the network sees it, then back in HU units
        y = x + np.sqrt(s2) * rng.standard_normal(shape)
        wiener = np.real(np.fft.ifftn(np.fft.fftn(y) * power / (power + s2)))
        rmse = lambda est: float(np.sqrt(np.mean((est - x) ** 2)))  # noqa: E731
        assert rmse(wiener) == pytest.approx(floor[str(t)]["parenchyma"], rel=0.05), (t, rmse(wiener), floor)
        assert rmse(np.zeros(shape)) > floor[str(t)]["parenchyma"] * 1.02 and rmse(y) > floor[str(t)]["parenchyma"] * 1.3
