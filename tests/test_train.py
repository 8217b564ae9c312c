"""The site trainer through DeepSpeed on the CPU: learning, exact resume after kill -9, crash-safe
checkpoints, stop signals, and bad configs failing before any work."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medsyn_site.config import ConfigError, load_config
from medsyn_site.data.cohort import Cohort, CohortError
from medsyn_site.diffusion import engine as eng
from medsyn_site.diffusion.model import build_unet, scheduler
from medsyn_site.diffusion.patches import PatchDataset, PatchError
from medsyn_site.diffusion.rundir import RunDir
from medsyn_site.diffusion.train import diffusion_loss, train

CONFIG = Path(__file__).parent / "configs" / "train_test.yaml"
MEDSYN = str(Path(sys.executable).with_name("medsyn"))


def _cfg(**overrides):
    return load_config(CONFIG, overrides)


def _final_state(run: Path) -> dict:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    blob = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)
    ema = torch.load(run / "checkpoints" / tag / "ema.pt", map_location="cpu")
    return {"tag": tag, "module": blob["module"], "ema": ema["ema"], "step": ema["step"]}


def _assert_same(a: dict, b: dict):
    assert a["tag"] == b["tag"] and a["step"] == b["step"]
    for part in ("module", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-6, atol=1e-7, msg=f"{part}.{k}")


def test_loss_falls_on_a_fixed_batch(phantom_cohort):
    cfg = _cfg(**{"train.lr": 3e-3})
    torch.manual_seed(0)
    data = PatchDataset(Cohort(phantom_cohort), "train", cfg.train.patch_size, cfg.diffusion.hu_window, 1.0, 0)
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("image", "mask", "coords")}
    eng.init_distributed()
    engine, _ = eng.make_engine(build_unet(cfg.model), cfg.train)
    sched = scheduler(cfg.diffusion)
    losses = []
    for _ in range(40):
        loss = diffusion_loss(engine, sched, batch, cfg, step=7, dev=torch.device("cpu"), dtype=torch.float32)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def _run(args, **kw):
    return subprocess.run([MEDSYN, "train", "--config", str(CONFIG), *args], capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.slow  # a real `medsyn train` process killed with SIGKILL and resumed: integration, ~1 min
def test_kill9_then_resume_matches_uninterrupted(phantom_cohort, tmp_path):
    steps = "200"
    ref = tmp_path / "ref"
    proc = _run(["--cohort", str(phantom_cohort), "--out", str(ref), "--steps", steps])
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    p = subprocess.Popen([MEDSYN, "train", "--config", str(CONFIG), "--cohort", str(phantom_cohort),
                          "--out", str(run), "--steps", steps], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_00000030":
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL  # killed mid-run, not finished
    killed_at = latest.read_text().strip()
    assert killed_at < f"step_{int(steps):08d}"

    proc = _run(["--cohort", str(phantom_cohort), "--out", str(run), "--steps", steps, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(_final_state(ref), _final_state(run))
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(5, int(steps) + 1, 5))  # no duplicate steps


def test_crash_during_checkpoint_write_keeps_previous(phantom_cohort, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_cfg(**{"train.steps": 10}), phantom_cohort, run)
    assert RunDir(run).latest() == "step_00000010"
    good = _final_state(run)

    real_save = torch.save
    def crashing_save(obj, f, *a, **kw):  # a power cut halfway through writing
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        train(_cfg(**{"train.steps": 20}), phantom_cohort, run, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert RunDir(run).latest() == "step_00000010"
    _assert_same(good, _final_state(run))
    assert not list((run / "checkpoints").glob(".tmp-*"))
    train(_cfg(**{"train.steps": 20}), phantom_cohort, run, resume=True)  # the kept checkpoint loads
    assert RunDir(run).latest() == "step_00000020"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_in_the_loop_writes_checkpoint(phantom_cohort, tmp_path, sig):
    run = tmp_path / "run"
    p = subprocess.Popen([MEDSYN, "train", "--config", str(CONFIG), "--cohort", str(phantom_cohort),
                          "--out", str(run), "--steps", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 3 and f"stopped by {sig.name} at step" in err, err[-2000:]
    tag = RunDir(run).latest()
    assert tag is not None and "step_00000010" <= tag < "step_00000500"  # not a multiple-of-10 boundary only


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_during_data_loading_then_resume(phantom_cohort, tmp_path, sig):
    """A signal while the run reads its cohort: status 3 at once, no checkpoint yet; --resume starts
    it from step 0. The run is held in data loading deterministically: with train.cache_gb 0 every
    case goes to the run's cache/, and the first case's file there is a FIFO nobody writes."""
    import json
    import os

    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.setdefault("train", {})["cache_gb"] = 0
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    first = next(c for c in json.loads((phantom_cohort / "cohort.json").read_text())["cases"] if c["split"] == "train")
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    fifo = run / "cache" / f"{first['sha256']['image'][:32]}.npy"
    os.mkfifo(fifo)
    args = ["--config", str(config), "--cohort", str(phantom_cohort), "--out", str(run), "--steps", "10"]
    p = subprocess.Popen([MEDSYN, "train", *args, "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (run / "config.yaml").exists():
        time.sleep(0.05)
    time.sleep(1)  # it cannot get past the FIFO: from here on it reads the cohort, or waits for the FIFO
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 3 and f"stopped by {sig.name} before the first training step" in err, err[-2000:]
    assert RunDir(run).latest() is None and not (run / "metrics.csv").exists()
    fifo.unlink()
    proc = subprocess.run([MEDSYN, "train", *args, "--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert RunDir(run).latest() == "step_00000010"


def test_stop_signal_while_loading_libraries(phantom_cohort, tmp_path):
    """While torch loads (the handler is installed before): status 3."""
    run = tmp_path / "run"
    p = subprocess.Popen([MEDSYN, "train", "--config", str(CONFIG), "--cohort", str(phantom_cohort),
                          "--out", str(run), "--steps", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{p.pid}/maps")  # the moment torch's library is mapped: it is being imported
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 3 and "stopped by SIGTERM" in err, err[-2000:]


@pytest.mark.parametrize("change, error, expect", [
    ({"train.patch_size": (128, 128, 128)}, PatchError, "larger than the volume"),
    ({"diffusion.schedule": "wavy"}, ConfigError, "diffusion.schedule"),
    ({"model.in_channels": 4}, ConfigError, "takes 5 channels"),
    ({"model.type_levels": (0.0, 0.5, 1.0)}, ConfigError, "type_levels"),
    ({"train.patch_size": (18, 18, 18)}, ConfigError, "must be divisible by 4"),
])
def test_bad_config_fails_before_work(phantom_cohort, tmp_path, change, error, expect):
    run = tmp_path / "run"
    with pytest.raises(error, match=expect):
        train(_cfg(**change), phantom_cohort, run)
    assert not run.exists()


def test_missing_cohort_and_resume_without_checkpoint(phantom_cohort, tmp_path):
    with pytest.raises(CohortError, match="cohort folder not found"):
        train(_cfg(), tmp_path / "nope", tmp_path / "run")
    proc = _run(["--cohort", str(phantom_cohort), "--out", str(tmp_path / "fresh"), "--resume"])
    assert proc.returncode == 1 and "no checkpoint to resume from" in proc.stderr


def test_weights_from_before_nodule_types_start_a_typed_run(tmp_path):
    """0/1-mask weights (no ``nodule_types`` in their config) may start a typed run (same network), and
    so may weights trained with another loss; weights of another network or noise process may not."""
    from medsyn_site.diffusion.rundir import RunError
    from medsyn_site.diffusion.train import initial_weights

    cfg = _cfg()
    assert cfg.model.nodule_types
    model = cfg.model.model_dump(mode="json")
    model.pop("nodule_types")
    state = build_unet(cfg.model).state_dict()
    old = tmp_path / "old.pt"
    torch.save({"ema": state, "step": 7, "model": model, "diffusion": cfg.diffusion.model_dump(mode="json")}, old)
    got = initial_weights(str(old), cfg)
    assert all(torch.equal(got[k], state[k]) for k in state)
    # and typed weights may start a run with other type levels (the fine-tune relearns what each paints)
    torch.save({"ema": state, "step": 7, "model": cfg.model.model_dump(mode="json"),
                "diffusion": cfg.diffusion.model_dump(mode="json")}, tmp_path / "typed.pt")
    relevelled = cfg.model_copy(update={"model": cfg.model.model_copy(update={"type_levels": (0.15, 0.6, 1.0)})})
    got = initial_weights(str(tmp_path / "typed.pt"), relevelled)
    assert all(torch.equal(got[k], state[k]) for k in state)
    other = tmp_path / "other.pt"
    torch.save({"ema": state, "step": 7, "model": model | {"channels": [16, 32, 64]},
                "diffusion": cfg.diffusion.model_dump(mode="json")}, other)
    with pytest.raises(RunError, match="another model config"):
        initial_weights(str(other), cfg)
    # the loss is the new run's choice (weights from before loss_weighting existed, too); the noise process is not
    weighted = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"loss": "l2", "loss_weighting": "min_snr"})})
    got = initial_weights(str(old), weighted)
    assert all(torch.equal(got[k], state[k]) for k in state)
    # so is the cosine schedule's offset (a fine-tune to a smaller smallest noise), also from weights
    # written before the offset was a setting
    finer = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"cosine_s": 0.0005})})
    before = cfg.diffusion.model_dump(mode="json")
    before.pop("cosine_s")
    torch.save({"ema": state, "step": 7, "model": model, "diffusion": before}, other)
    for path in (old, other):
        got = initial_weights(str(path), finer)
        assert all(torch.equal(got[k], state[k]) for k in state)
    noise = cfg.diffusion.model_dump(mode="json")
    noise.pop("loss_weighting"), noise.pop("min_snr_gamma")
    torch.save({"ema": state, "step": 7, "model": model, "diffusion": noise | {"prediction_type": "epsilon"}}, other)
    with pytest.raises(RunError, match="another diffusion config"):
        initial_weights(str(other), cfg)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule(schedule):
    """Linear warm-up, then constant or cosine-annealed to 0 at the last step (written out by hand)."""
    import math

    from medsyn_site.diffusion.engine import lr_factor

    t = _cfg().train.model_copy(update={"warmup_steps": 10, "steps": 110, "lr_schedule": schedule})
    got = [lr_factor(t, s) for s in range(110)]
    assert got[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    want = [1.0] * 100 if schedule == "constant" else [0.5 * (1 + math.cos(math.pi * k / 100)) for k in range(1, 101)]
    assert got[10:] == pytest.approx(want)
    if schedule == "cosine":
        assert got[59] == pytest.approx(0.5) and got[-1] == pytest.approx(0.0, abs=1e-12)


def test_runs_begun_before_a_setting_existed_resume_with_what_they_trained_with(tmp_path):
    """A run dir whose config.yaml predates a setting (``train.pos_sampling``, the loss weighting, ...)
    resumes with the value it trained with (rundir.ADDED_SETTINGS); asking for another value on it is
    a different config."""
    import yaml

    from medsyn_site.diffusion.rundir import ADDED_SETTINGS, RunError

    other = {("train", "pos_sampling"): "type", ("diffusion", "loss_weighting"): "min_snr",
             ("diffusion", "min_snr_gamma"): 2.0, ("model", "nodule_types"): True, ("model", "type_levels"): [0.2, 0.5, 1.0]}
    for (section, key), old in ADDED_SETTINGS.items():
        cfg = _cfg(**{f"{section}.{key}": old})
        run = RunDir(tmp_path / key)
        run.create(cfg, False)
        saved = yaml.safe_load((run.root / "config.yaml").read_text())
        assert saved[section].pop(key) == old
        (run.root / "config.yaml").write_text(yaml.safe_dump(saved))
        RunDir(tmp_path / key).check_resume(cfg)
        (run.root / "config.yaml").write_text(yaml.safe_dump(saved))
        with pytest.raises(RunError, match=f"different config.*{key}"):
            RunDir(tmp_path / key).check_resume(_cfg(**{f"{section}.{key}": other[(section, key)]}))


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_min_snr_loss_is_the_x0_error_weighted_by_min_snr_gamma(prediction):
    """Min-SNR-gamma (Hang et al.): whatever the network predicts, the weighted loss equals
    mean_b min(SNR_t, gamma) * mean((x0 - x0_hat)^2), x0_hat derived from the prediction as sampling
    derives it (an all-zero network here, so x0_hat is known in closed form)."""
    from medsyn_site.diffusion.model import predicted_x0
    from medsyn_site.diffusion.train import _step_generator

    cfg = _cfg(**{"diffusion.prediction_type": prediction, "diffusion.loss": "l2", "diffusion.loss_weighting": "min_snr",
                  "diffusion.min_snr_gamma": 5.0, "train.seed": 3})
    sched = scheduler(cfg.diffusion)
    x0 = torch.rand(6, 1, 8, 8, 8) * 2 - 1
    batch = {"image": x0, "mask": torch.zeros_like(x0), "coords": torch.zeros(6, 3, 8, 8, 8)}
    zero_net = lambda inp, timesteps: torch.zeros_like(inp[:, :1])  # noqa: E731
    got = diffusion_loss(zero_net, sched, batch, cfg, step=7, dev=torch.device("cpu"), dtype=torch.float32)
    g = _step_generator(3, 7)
    t = torch.randint(0, sched.num_train_timesteps, (6,), generator=g)
    noisy = sched.add_noise(original_samples=x0, noise=torch.randn(x0.shape, generator=g), timesteps=t)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    x0_hat = predicted_x0(torch.zeros_like(x0), noisy, abar, prediction)
    snr = (abar / (1 - abar)).flatten()
    want = (snr.clamp(max=5.0) * ((x0 - x0_hat) ** 2).flatten(1).mean(1)).mean()
    assert snr.min() < 5.0 < snr.max()  # both sides of gamma drawn
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
