"""The samplers against an analytic oracle.

For data whose distribution is known (a Gaussian, a two-component Gaussian mixture), the
Bayes-optimal denoiser E[x0 | x_t] has a closed form, so the network can be replaced by the exact
epsilon / v prediction and the samples must follow the data distribution. Each voxel of a whole
volume is an independent draw: the oracle runs through ``Sampler.volumes`` (what ``medsyn sample``
runs: ``sampling_scheduler``, MONAI's DiffusionInferer, HU conversion) with only the network swapped.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

from medsyn_site.config import ConfigError, DiffusionConfig, ModelConfig, SampleConfig
from medsyn_site.diffusion.model import build_unet, hu_to_unit, padding, sampling_scheduler, scheduler
from medsyn_site.diffusion.sample import Sampler, WindowedUNet

# (weight, mean, std) per component, in the network's [-1, 1] units (well inside the clip range)
GAUSS = [(1.0, 0.3, 0.2)]
MIXTURE = [(0.6, -0.5, 0.1), (0.4, 0.4, 0.15)]
SHAPE = (16, 64, 64)  # z, y, x: 65,536 independent draws per run


def moments(components):
    mean = sum(w * m for w, m, _ in components)
    var = sum(w * (s * s + m * m) for w, m, s in components) - mean * mean
    return mean, math.sqrt(var)


class Oracle(torch.nn.Module):
    """The exact epsilon or v prediction for the training noise process and ``components``."""

    def __init__(self, cfg: DiffusionConfig, components):
        super().__init__()
        self.abar = scheduler(cfg).alphas_cumprod.double()  # what training's add_noise uses
        self.components, self.prediction = components, cfg.prediction_type

    def forward(self, x, timesteps, context=None):
        a = self.abar[int(timesteps[0])]
        xt = x[:, :1].double()
        logp, post = [], []
        for w, m, s in self.components:
            var = a * s * s + 1 - a  # x_t | component ~ N(sqrt(a) m, a s^2 + 1 - a)
            logp.append(math.log(w) - 0.5 * (xt - a.sqrt() * m) ** 2 / var - 0.5 * torch.log(var))
            post.append(m + a.sqrt() * s * s / var * (xt - a.sqrt() * m))  # E[x0 | x_t, component]
        r = torch.softmax(torch.stack(logp), 0)
        x0 = (r * torch.stack(post)).sum(0)
        eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x.dtype)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights file as training writes it (the network is replaced by the oracle)."""
    model = ModelConfig(channels=(16, 16, 16), norm_num_groups=8, num_head_channels=16)
    path = tmp_path_factory.mktemp("w") / "ema.pt"

    def write(cfg: DiffusionConfig):
        torch.save({"ema": build_unet(model).state_dict(), "step": 0, "model": model.model_dump(mode="json"),
                    "diffusion": cfg.model_dump(mode="json")}, path)
        return path
    return write


def draw(weights, cfg: DiffusionConfig, components, sampler: str, steps: int, seed: int = 0) -> np.ndarray:
    gen = Sampler(weights(cfg), sampler, steps, device="cpu")
    gen.model = Oracle(cfg, components)
    mask = sitk.GetImageFromArray(np.zeros(SHAPE, np.uint8))
    hu = gen.volumes([mask], [seed])[0]
    return hu_to_unit(torch.from_numpy(sitk.GetArrayFromImage(hu)), cfg.hu_window).double().numpy().ravel()


def ideal_gaussian(abar: np.ndarray, timesteps, sampler: str, mean: float, std: float) -> tuple[float, float]:
    """Closed form: with the exact denoiser for N(mean, std^2) data, every DDIM / ancestral-DDPM step
    is affine in x_t (plus Gaussian noise for DDPM), so the output distribution is Gaussian and its
    moments follow exactly from x_T ~ N(0, 1), step by step (float64, independent of MONAI)."""
    m, v = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a = abar[t]
        ap = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        c = math.sqrt(a) * std ** 2 / (a * std ** 2 + 1 - a)  # x0_hat = k0 + c x_t
        k0 = mean - c * math.sqrt(a) * mean
        if sampler == "ddim":  # x_prev = sqrt(ap) x0_hat + sqrt(1 - ap) eps_hat
            gain = math.sqrt(ap) * c + math.sqrt(1 - ap) * (1 - math.sqrt(a) * c) / math.sqrt(1 - a)
            const = math.sqrt(ap) * k0 - math.sqrt(1 - ap) * math.sqrt(a) * k0 / math.sqrt(1 - a)
            noise = 0.0
        else:  # the posterior q(x_prev | x_t, x0_hat) of the respaced chain, fixed-small variance
            beta = 1 - a / ap
            c0, ct = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
            gain, const, noise = c0 * c + ct, c0 * k0, beta * (1 - ap) / (1 - a)
        m, v = gain * m + const, gain ** 2 * v + noise
    return m, math.sqrt(v)


# Every sampler x step count: the sample's mean within 0.003 and std within 2% of the closed form
# (Monte-Carlo error of 65,536 draws: ~0.001 and ~0.3%). The closed form itself is not the data:
# deterministic DDIM contracts the spread at each step (even with the exact denoiser), and
# fixed-small ancestral DDPM leaves out the posterior variance of x0, so few steps sample too narrow
# a distribution (linear schedule, std 0.2: DDIM-10 0.097, DDIM-50 0.174, DDPM-50 0.159). At the
# full 1000 steps both are within 0.005 of the data's std. A sampler that steps between the wrong
# timesteps (MONAI's DDPM with fewer steps: std 0.47-0.67) is far outside.
RUNS = [("ddpm", 1000), ("ddpm", 250), ("ddpm", 50), ("ddpm", 10), ("ddim", 1000), ("ddim", 50), ("ddim", 20),
        ("ddim", 10)]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,steps", RUNS)
def test_sampler_matches_closed_form_on_gaussian_data(weights, prediction, sampler, steps):
    cfg = DiffusionConfig(prediction_type=prediction)
    x = draw(weights, cfg, GAUSS, sampler, steps)
    (_, mean, std), = GAUSS
    expect_mean, expect_std = ideal_gaussian(scheduler(cfg).alphas_cumprod.double().numpy(),
                                             list(range(999, -1, -1000 // steps)), sampler, mean, std)
    assert abs(x.mean() - expect_mean) < 0.003, (x.mean(), x.std(), expect_mean, expect_std)
    assert abs(x.std() / expect_std - 1) < 0.02, (x.mean(), x.std(), expect_mean, expect_std)
    if steps == 1000:  # the full chain samples the data distribution itself
        assert abs(x.mean() - mean) < 0.003 and abs(x.std() - std) < 0.005, (x.mean(), x.std())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 50), ("ddim", 1000), ("ddim", 50), ("ddim", 10)])
def test_sampler_keeps_mixture_modes(weights, prediction, sampler, steps):
    """Two modes (cosine schedule): each keeps its weight at every step count; the full chain
    reproduces the mixture's mean and spread and leaves the valley between the modes empty."""
    cfg = DiffusionConfig(prediction_type=prediction, schedule="cosine")
    x = draw(weights, cfg, MIXTURE, sampler, steps, seed=1)
    mean, std = moments(MIXTURE)
    assert abs((x > -0.05).mean() - 0.4) < 0.01, (x > -0.05).mean()  # the upper mode's weight
    if steps == 1000:
        assert abs(x.mean() - mean) < 0.005 and abs(x.std() - std) < 0.005, (x.mean(), x.std())
        assert ((x > -0.2) & (x < -0.1)).mean() < 0.003  # data: 0.1% of the mass there


def test_oracle_detects_monai_ddpm_with_fewer_steps(weights):
    """The oracle is sensitive: MONAI's DDPMScheduler set to 50 steps (it still steps t -> t-1)
    samples far too wide a distribution."""
    cfg = DiffusionConfig()
    sched = DDPMScheduler(num_train_timesteps=1000, schedule=cfg.schedule)
    sched.set_timesteps(50)
    torch.manual_seed(0)
    x = DiffusionInferer(sched).sample(torch.randn(1, 1, *SHAPE), Oracle(cfg, GAUSS), sched,
                                       conditioning=torch.zeros(1, 4, *SHAPE), mode="concat", verbose=False)
    assert x.std() > 0.4


def test_timesteps_trail_from_the_last_training_step():
    cfg = DiffusionConfig()
    for sampler in ("ddpm", "ddim"):
        s = sampling_scheduler(cfg, sampler, 10)
        assert s.timesteps.tolist() == list(range(999, 0, -100))
        assert sampling_scheduler(cfg, sampler, 1000).timesteps.tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("steps", [0, 3, 30, 1001])
def test_step_count_must_divide_training_steps(steps):
    with pytest.raises(ConfigError, match=f"--steps {steps}: .*divides the model.s 1000 training timesteps"):
        sampling_scheduler(DiffusionConfig(), "ddim", steps)


# -- DPM-Solver++ (diffusers, through SolverScheduler) -------------------------------------------
def ideal_dpm_solver(abar: np.ndarray, timesteps, stochastic: bool, mean: float, std: float) -> tuple[float, float]:
    """Closed form of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, midpoint form;
    its SDE variant, sec. 4 of Lu et al. / diffusers' sde-dpmsolver++) with the exact denoiser for
    N(mean, std^2) data, written here from the paper in float64, independent of diffusers. Each
    step is affine in the state and the noises drawn so far: x = w . (x_T, z_1, z_2, ...) + k, so
    the output is Gaussian with mean k and variance |w|^2. First step first-order (no history),
    last step (to noise 0) first-order, as diffusers does with ``final_sigmas_type="zero"``."""
    n = len(timesteps)
    alpha = [math.sqrt(abar[t]) for t in timesteps] + [1.0]
    sigma = [math.sqrt(1 - abar[t]) for t in timesteps] + [0.0]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    w, k = np.zeros(n + 1), 0.0
    w[0] = 1.0
    m_prev = None  # the previous x0 prediction (w, k)
    for i, t in enumerate(timesteps):
        a = abar[t]
        c = math.sqrt(a) * std ** 2 / (a * std ** 2 + 1 - a)
        m = (c * w, mean - c * math.sqrt(a) * mean + c * k)  # x0_hat = mean + c (x - sqrt(a) mean)
        h = lam[i + 1] - lam[i]
        e = math.exp(-h)  # 0 at the final step (lambda = inf)
        if m_prev is None or i == n - 1:
            d = m
        else:  # D = m + (m - m_prev) / (2 r), r = h_prev / h
            r = (lam[i] - lam[i - 1]) / h
            d = (m[0] + (m[0] - m_prev[0]) / (2 * r), m[1] + (m[1] - m_prev[1]) / (2 * r))
        if stochastic:
            gain = sigma[i + 1] / sigma[i] * e
            w, k = gain * w + alpha[i + 1] * (1 - e * e) * d[0], gain * k + alpha[i + 1] * (1 - e * e) * d[1]
            w[i + 1] = sigma[i + 1] * math.sqrt(1 - e * e)
        else:
            gain = sigma[i + 1] / sigma[i]
            w, k = gain * w + alpha[i + 1] * (1 - e) * d[0], gain * k + alpha[i + 1] * (1 - e) * d[1]
        m_prev = m
    return k, float(np.sqrt((w ** 2).sum()))


SOLVER_RUNS = [("dpm++", 5), ("dpm++", 10), ("dpm++", 20), ("dpm++", 50), ("sde-dpm++", 5), ("sde-dpm++", 10),
               ("sde-dpm++", 20)]


@pytest.mark.parametrize("prediction,schedule", [("v_prediction", "cosine"), ("epsilon", "linear_beta")])
@pytest.mark.parametrize("sampler,steps", SOLVER_RUNS)
def test_dpm_solver_matches_closed_form_on_gaussian_data(weights, prediction, schedule, sampler, steps):
    """diffusers' solver, driven by MONAI's inferer through Sampler.volumes, against the paper's update
    written out above (same timesteps); and, with enough steps, against the data itself: the
    probability-flow ODE maps N(0, 1) onto the data exactly (at 10 steps within 3% of its std,
    where DDPM-50 is 13% narrow; see the module comment)."""
    cfg = DiffusionConfig(prediction_type=prediction, schedule=schedule)
    x = draw(weights, cfg, GAUSS, sampler, steps)
    (_, mean, std), = GAUSS
    ts = sampling_scheduler(cfg, sampler, steps).timesteps.tolist()
    expect_mean, expect_std = ideal_dpm_solver(scheduler(cfg).alphas_cumprod.double().numpy(), ts,
                                               sampler.startswith("sde"), mean, std)
    assert abs(x.mean() - expect_mean) < 0.003, (x.mean(), x.std(), expect_mean, expect_std)
    assert abs(x.std() / expect_std - 1) < 0.02, (x.mean(), x.std(), expect_mean, expect_std)
    if steps >= 10:
        assert abs(x.std() / std - 1) < (0.01 if steps == 50 else 0.04), (x.std(), std)


@pytest.mark.parametrize("sampler,steps", [("dpm++", 10), ("sde-dpm++", 10), ("dpm++", 50)])
def test_dpm_solver_keeps_mixture_modes(weights, sampler, steps):
    """Two modes (cosine, v-prediction as shipped): each keeps its weight; at 50 steps the ODE solution
    is the mixture (mean, spread, empty valley)."""
    cfg = DiffusionConfig(prediction_type="v_prediction", schedule="cosine")
    x = draw(weights, cfg, MIXTURE, sampler, steps, seed=1)
    mean, std = moments(MIXTURE)
    assert abs((x > -0.05).mean() - 0.4) < 0.015, (x > -0.05).mean()
    if steps == 50:
        assert abs(x.mean() - mean) < 0.005 and abs(x.std() - std) < 0.005, (x.mean(), x.std())
        assert ((x > -0.2) & (x < -0.1)).mean() < 0.005


def test_dpm_solver_timesteps_uniform_in_log_snr():
    """From pure noise (the last training timestep) to timestep 0, evenly in log-SNR from -10 up."""
    cfg = DiffusionConfig(prediction_type="v_prediction", schedule="cosine")
    s = sampling_scheduler(cfg, "dpm++", 10)
    ts = s.timesteps.tolist()
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(set(ts), reverse=True)
    abar = scheduler(cfg).alphas_cumprod.double().numpy()
    log_snr = np.log(abar[ts[1:]] / (1 - abar[ts[1:]]))
    steps = np.diff(log_snr)
    assert np.all(steps > 0) and steps.std() / steps.mean() < 0.1, steps  # even, to integer rounding
    with pytest.raises(ConfigError, match="--steps 101: DPM-Solver.. takes 1 to 100 steps"):
        sampling_scheduler(cfg, "dpm++", 101)


def test_dpm_solver_starts_each_batch_afresh(weights):
    """A multistep solver keeps the last steps' predictions: two volumes from one Sampler must each
    start without the other's history (same seed -> same volume)."""
    cfg = DiffusionConfig(prediction_type="v_prediction", schedule="cosine")
    gen = Sampler(weights(cfg), "dpm++", 10, device="cpu")
    gen.model = Oracle(cfg, GAUSS)
    mask = sitk.GetImageFromArray(np.zeros((8, 16, 16), np.uint8))
    a, b = (sitk.GetArrayFromImage(gen.volumes([mask], [3])[0]) for _ in range(2))
    np.testing.assert_array_equal(a, b)


class MaskRecorder(torch.nn.Module):
    """Records the mask channel the network is given; predicts zeros."""

    def forward(self, x, timesteps, context=None):
        self.mask = x[:, 1].clone()
        return torch.zeros_like(x[:, :1])


def test_the_network_sees_each_nodules_type_level(weights):
    """A model trained with nodule types sees ground-glass 0.2, part-solid 2/3, solid and unknown 1;
    a mask given without types is all unknown; weights from before types (no ``nodule_types`` in
    their config) see 0/1; weights with types that record no levels (written when the default was
    1/3 for ground-glass) see 1/3; weights trained with other ``type_levels`` see theirs."""
    from medsyn_site.imaging import NODULE_CODES

    cfg = DiffusionConfig(prediction_type="v_prediction", schedule="cosine")
    codes = np.zeros((8, 16, 16), np.uint8)
    for k, t in enumerate(("ground-glass", "part-solid", "solid", "unknown")):
        codes[2, 2 + 3 * k, 2] = NODULE_CODES[t]
    mask = sitk.GetImageFromArray((codes > 0).astype(np.uint8))
    want = {"typed": [0.2, 2 / 3, 1, 1], "untyped": [1, 1, 1, 1], "old": [1, 1, 1, 1], "unlevelled": [1 / 3, 2 / 3, 1, 1],
            "relevelled": [0.3, 0.5, 0.9, 0.9]}
    path = weights(cfg)
    old = torch.load(path)
    old["model"].pop("type_levels")
    torch.save(old, path.with_name("unlevelled.pt"))
    old["model"].pop("nodule_types")
    torch.save(old, path.with_name("old.pt"))
    relevel = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "relevel.py"), str(path)]
    res = subprocess.run(relevel + [str(path.with_name("relevelled.pt")), "--type-levels", "0.3", "0.5", "0.9"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-1500:]
    blob = torch.load(path.with_name("relevelled.pt"))
    assert blob["trained_type_levels"] == pytest.approx([0.2, 2 / 3, 1]) and "relevel.py" in blob["made_by"]
    assert all(torch.equal(blob["ema"][k], v) for k, v in torch.load(path)["ema"].items())  # the network unchanged
    res = subprocess.run(relevel + [str(path.with_name("bad.pt")), "--type-levels", "0", "0.5", "0.9"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0 and "must be in (0, 1]" in res.stderr, res.stderr
    assert not path.with_name("bad.pt").exists()
    for case, (file, given) in {"typed": (path, [codes]), "untyped": (path, None),
                                "old": (path.with_name("old.pt"), [codes]),
                                "unlevelled": (path.with_name("unlevelled.pt"), [codes]),
                                "relevelled": (path.with_name("relevelled.pt"), [codes])}.items():
        gen = Sampler(file, "ddim", 2, device="cpu")
        gen.model = MaskRecorder()
        gen.volumes([mask], [0], given)
        seen = gen.model.mask[0].numpy()
        assert seen.shape == (8, 16, 16)  # the pad is empty here (16 is the network's multiple)
        np.testing.assert_allclose([seen[2, 2 + 3 * k, 2] for k in range(4)], want[case], rtol=1e-6, err_msg=case)
        assert seen.sum() == pytest.approx(sum(want[case]), rel=1e-6)  # nothing else is a nodule
    with pytest.raises(ValueError, match="one shape"):
        Sampler(path, "ddim", 2, device="cpu").volumes([mask], [0], [codes[:4]])


def test_padding_rounds_each_axis_up_to_the_networks_multiple():
    """A whole volume of any shape reaches the network's multiple, padded at the end of each axis
    (by hand: 50 -> 52 and 61 -> 64 for a multiple of 4; 48 stays)."""
    padded, pad = padding((48, 50, 61), 4)
    assert padded == (48, 52, 64)
    assert pad == [0, 3, 0, 2, 0, 0]  # torch's order: x (last axis) first
    x = torch.nn.functional.pad(torch.ones(1, 1, 48, 50, 61), pad)
    assert tuple(x.shape[2:]) == padded and x[..., :48, :50, :61].min() == 1 and x.sum() == 48 * 50 * 61


def test_windows_are_the_network_on_its_training_patch():
    """Windows that tile the volume without overlap give, voxel for voxel, the network's output on
    each window alone (what it computed on a training patch); the whole volume at once does not
    (GroupNorm's statistics are the volume's), which is why sampling evaluates windows."""
    torch.manual_seed(0)
    net = build_unet(ModelConfig(channels=(8, 8), attention_levels=(False, False), norm_num_groups=4,
                                 num_head_channels=8, coord_head=0)).eval()
    for p in net.parameters():  # MONAI zero-initializes the output layer: a fresh network outputs 0
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 5, 16, 32, 32) + torch.linspace(-2, 2, 32)  # content differs across the volume
    t = torch.tensor([500])
    with torch.no_grad():
        got = WindowedUNet(net, (16, 16, 16), overlap=0.0)(x, t)
        by_hand = torch.zeros_like(got)
        for y in (0, 16):
            for z in (0, 16):
                by_hand[..., y:y + 16, z:z + 16] = net(x[..., y:y + 16, z:z + 16], timesteps=t)
        whole = net(x, timesteps=t)
        larger = WindowedUNet(net, (64, 64, 64))(x, t)  # a window larger than the volume: clipped to it
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(larger, whole, atol=1e-5, rtol=1e-5)  # (zero padding would change the statistics)
    assert (whole - by_hand).abs().mean() > 10 * (got - by_hand).abs().max()


class Pointwise(torch.nn.Module):
    """A network with no spatial context: any blend of its windows is the whole-volume output."""

    def forward(self, x, timesteps, context=None):
        return x[:, :1] * 2 + x[:, 1:2] - timesteps.view(-1, 1, 1, 1, 1) / 1000


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_window_blending_weights_sum_to_one_everywhere(overlap):
    """Overlapping windows (Gaussian-blended) reproduce a pointwise network's whole-volume output
    exactly, at the volume's edges too, for a volume no window size divides and an axis shorter than
    the window."""
    x = torch.randn(2, 5, 12, 40, 28)
    t = torch.tensor([300])
    got = WindowedUNet(Pointwise(), (16, 16, 16), overlap=overlap)(x, t)
    torch.testing.assert_close(got, Pointwise()(x, t), atol=1e-5, rtol=1e-5)


def test_sampler_windows_are_the_training_patch_the_weights_record(weights, caplog):
    """Weights record the training patch (x y z); the Sampler evaluates windows of it (z y x),
    `window="whole"` the whole volume; weights from before the record sample whole, saying so."""
    cfg = DiffusionConfig(prediction_type="v_prediction", schedule="cosine")
    path = weights(cfg)
    blob = torch.load(path)
    torch.save(blob | {"patch_size": [32, 24, 16]}, path.with_name("patched.pt"))
    gen = Sampler(path.with_name("patched.pt"), "ddim", 2, device="cpu")
    assert isinstance(gen.model, WindowedUNet) and gen.model.window == (16, 24, 32)
    assert gen.model.overlap == SampleConfig().window_overlap
    whole = Sampler(path.with_name("patched.pt"), "ddim", 2, device="cpu", window="whole")
    assert whole.window is None and whole.model is whole.net
    with caplog.at_level("WARNING"):
        old = Sampler(path, "ddim", 2, device="cpu")
    assert old.window is None and old.model is old.net and "records no training patch" in caplog.text
    with pytest.raises(ConfigError, match="window 'slab'"):
        Sampler(path, "ddim", 2, device="cpu", window="slab")


@pytest.mark.parametrize("cosine_s,sigma_min_hu,kept", [(0.008, 6.6, (0.54, 0.60)), (0.0005, 2.3, (0.79, 0.85))])
def test_cosine_offset_sets_the_finest_detail_a_sample_keeps(weights, cosine_s, sigma_min_hu, kept):
    """Data with 5 HU of spread (the scale of the phantom's finest scanner noise), sampled by DPM++ 10
    through the exact denoiser: the last step is a posterior mean at timestep 0's noise, so the sample
    keeps at most s^2 / sqrt(s^2 + sigma_min^2) of the spread (60 % with the cosine schedule's usual
    offset, 6.6 HU at timestep 0 on a 2048-HU window; 91 % with s = 0.0005, 2.3 HU), and the 10 steps'
    discretization a little less: 57 % and 82 % in the solver's closed form, which the draws match."""
    cfg = DiffusionConfig(prediction_type="v_prediction", schedule="cosine", cosine_s=cosine_s, hu_window=(-1024, 1024))
    abar = scheduler(cfg).alphas_cumprod.double().numpy()
    assert abs(math.sqrt(1 - abar[0]) * 1024 - sigma_min_hu) < 0.05
    texture = [(1.0, 0.3, 5 / 1024)]
    x = draw(weights, cfg, texture, "dpm++", 10)
    ts = sampling_scheduler(cfg, "dpm++", 10).timesteps.tolist()
    _, expect_std = ideal_dpm_solver(abar, ts, False, 0.3, 5 / 1024)
    assert abs(x.std() / expect_std - 1) < 0.02, (x.std() * 1024, expect_std * 1024)
    assert kept[0] < x.std() * 1024 / 5 < kept[1], x.std() * 1024
