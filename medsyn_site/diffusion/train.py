"""``medsyn train``: the site trainer. Random 3-D patches + coordinates -> DeepSpeed engine -> EMA,
atomic resumable checkpoints, metrics (CSV + TensorBoard) and denoising previews."""
from __future__ import annotations

import csv
import logging
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medsyn_site.atomic import atomic_write_text
from medsyn_site.config import Config, DiffusionConfig, ModelConfig
from medsyn_site.data.cohort import Cohort
from medsyn_site.diffusion import engine as eng
from medsyn_site.diffusion.model import EMA, build_unet, network_input, scheduler
from medsyn_site.diffusion.patches import PatchDataset
from medsyn_site.diffusion.rundir import RunDir, training_scale
from medsyn_site.diffusion.stop import Interrupted, StopSignals
from medsyn_site.errors import write_failure

log = logging.getLogger(__name__)


def _step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + rank * 2 ** 40)


def rank_samples(start: int, steps: int, batch: int, world: int, rank: int) -> list[int]:
    """The patch indices rank ``rank`` draws for steps start+1 .. steps: step s takes global samples
    ((s-1) * world + rank) * batch + j, so the ranks see different patches and one process (world 1)
    sees what it always did."""
    return [((s * world) + rank) * batch + j for s in range(start, steps) for j in range(batch)]


def diffusion_loss(net, sched, batch: dict, cfg: Config, step: int, dev, dtype, rank: int = 0) -> torch.Tensor:
    """One training loss: noise a patch at random timesteps and regress the configured target."""
    x0 = batch["image"].to(dev)
    g = _step_generator(cfg.train.seed, step, rank)
    t = torch.randint(0, sched.num_train_timesteps, (x0.shape[0],), generator=g).to(dev)
    noise = torch.randn(x0.shape, generator=g).to(dev)
    noisy = sched.add_noise(original_samples=x0, noise=noise, timesteps=t)
    target = noise if cfg.diffusion.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    inp = network_input(noisy, batch["mask"].to(dev), batch["coords"].to(dev)).to(dtype)
    pred = net(inp, timesteps=t).float()
    loss_fn = F.l1_loss if cfg.diffusion.loss == "l1" else F.mse_loss
    if cfg.diffusion.loss_weighting == "none":
        return loss_fn(pred, target)
    return (loss_fn(pred, target, reduction="none").flatten(1).mean(1) * min_snr_weight(sched, t, cfg.diffusion)).mean()


def min_snr_weight(sched, t: torch.Tensor, dc: DiffusionConfig) -> torch.Tensor:
    """Min-SNR-gamma per-sample weights (diffusers' compute_snr): min(SNR, gamma) on the x0 error,
    i.e. min(SNR, gamma) / SNR on an epsilon loss and min(SNR, gamma) / (SNR + 1) on a v loss
    (exactly so for L2; an L1 loss takes the same weights)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t.cpu()).to(t.device)
    return snr.clamp(max=dc.min_snr_gamma) / (snr if dc.prediction_type == "epsilon" else snr + 1)


def peak_memory_mb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Metrics:
    """metrics.csv (rows past a resumed step are dropped) and TensorBoard scalars."""

    FIELDS = ["step", "loss", "lr", "patches_per_s", "peak_mem_mb"]

    def __init__(self, root: Path, start_step: int):
        self.path = root / "metrics.csv"
        rows = []
        if self.path.exists() and start_step:
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        atomic_write_text(self.path, ",".join(self.FIELDS) + "\n" + "".join(
            ",".join(r[k] for k in self.FIELDS) + "\n" for r in rows))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(root / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])
                                 for k in self.FIELDS) + "\n")
        except OSError as e:  # a full disk: name the file
            raise write_failure(self.path, e) from e
        if self.tb:
            for k in self.FIELDS[1:]:
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()


@torch.no_grad()
def preview(net, cfg: Config, samples: list[dict], out: Path, dev, dtype) -> Path:
    """PNG: per validation patch, the real middle slice, it noised to t = T/2, the network's
    one-step estimate of the clean image (MONAI's scheduler.step), and the mask."""
    from medsyn_site.diffusion.preview import denoise_figure

    sched = scheduler(cfg.diffusion)
    t = sched.num_train_timesteps // 2
    rows = []
    was_training = net.training
    net.eval()
    for i, s in enumerate(samples):
        x0 = s["image"][None].to(dev)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i)).to(dev)
        tt = torch.full((1,), t, device=dev, dtype=torch.long)
        noisy = sched.add_noise(x0, noise, tt)
        pred = net(network_input(noisy, s["mask"][None].to(dev), s["coords"][None].to(dev)).to(dtype),
                   timesteps=tt).float()
        _, x0_hat = sched.step(pred, t, noisy)
        rows.append((x0[0, 0], noisy[0, 0], x0_hat[0, 0], s["mask"][0]))
    net.train(was_training)
    return denoise_figure(rows, out, cfg.diffusion.hu_window)


PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


def weights_path(source: str) -> Path:
    """The file behind a ``train.init_weights`` value: a weights file, a run dir (its latest), or
    ``builtin:NAME`` (medsyn_site/pretrained/NAME.pt)."""
    from medsyn_site.diffusion.rundir import RunDir, RunError

    path = PRETRAINED / f"{source.partition(':')[2]}.pt" if source.startswith("builtin:") else Path(source)
    if path.is_dir():
        path = RunDir(path).latest_weights()
    if not path.is_file():
        raise RunError(f"{path}: train.init_weights not found")
    return path


TYPING = {"nodule_types", "type_levels"}  # model settings a fine-tune may change (the mask channel's values)


def initial_weights(source: str, cfg: Config) -> dict:
    """The EMA weights a new run starts from (``weights_path``). The model and noise process must match."""
    from medsyn_site.diffusion.rundir import RunError

    path = weights_path(source)
    blob = torch.load(path, map_location="cpu")
    # the same network and noise process; whether the mask channel carries nodule types may change
    # (0/1 weights learn the types' levels when fine-tuned with nodule_types on), and so may the levels
    # themselves (a fine-tune relearns what each level paints), the loss
    # and the cosine schedule's offset (it moves the timesteps' noise by < 1 % of their index except
    # at the low-noise end, which a fine-tune relearns first: the v loss weighs it most)
    model = ModelConfig.of_weights(blob.get("model") or {})
    have_diffusion = DiffusionConfig(**blob["diffusion"]) if blob.get("diffusion") else None
    for section, have, want in (("model", model.model_dump(mode="json", exclude=TYPING),
                                 cfg.model.model_dump(mode="json", exclude=TYPING)),
                                ("diffusion", have_diffusion and have_diffusion.noise_process() | {"cosine_s": None},
                                 cfg.diffusion.noise_process() | {"cosine_s": None})):
        if have != want:
            raise RunError(f"{path}: train.init_weights was trained with another {section} config "
                           f"({blob.get(section)}); use the config it was made with")
    notes = ["its 0/1 mask channel now carries nodule types"] if cfg.model.nodule_types > model.nodule_types else []
    if model.nodule_types and cfg.model.nodule_types and model.type_levels != cfg.model.type_levels:
        notes.append(f"nodule type levels {list(model.type_levels)} -> {list(cfg.model.type_levels)}")
    if have_diffusion.cosine_s != cfg.diffusion.cosine_s:
        notes.append(f"cosine schedule offset {have_diffusion.cosine_s} -> {cfg.diffusion.cosine_s}")
    log.info("starting from %s (step %s of its run%s)", path, blob.get("step"), "".join(f"; {n}" for n in notes))
    return blob["ema"]


def set_weights(engine, state: dict) -> None:
    """Load a full fp32 state_dict into a DeepSpeed engine: the module's (possibly bf16/fp16) weights
    and DeepSpeed's fp32 master copy (ZeRO or bf16 optimizer), so the next step starts from it."""
    from deepspeed.utils import safe_set_full_fp32_param

    engine.module.load_state_dict(state)
    for name, p in engine.module.named_parameters():
        safe_set_full_fp32_param(p, state[name].to(p.device, torch.float32))


def get_weights(engine) -> dict:
    """The engine's full fp32 state_dict on the CPU (parameters from the fp32 master copy if any)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        if master is not None:
            out[name] = master.detach().float().cpu().clone()
    return out


def _configure_torch(cfg: Config) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)


class Trainer:
    """One site's training run, built once (improved-diffusion's TrainLoop): the cohort's patches,
    the run dir (new or resumed), the DeepSpeed engine and the EMA. ``run_loop()`` trains to
    ``train.steps``; ``run_steps(n)`` trains n more steps and returns their losses; ``save()`` writes
    a checkpoint. `medsyn train` runs the loop; a federated site runs a few steps per round from the
    global weights (``set_weights``) with an extra loss term (``extra_loss``, FedProx's proximal term).

    With ``stop`` (a StopSignals) a stop signal ends the current step, writes a checkpoint and raises
    Interrupted; without it the caller handles signals (a Flower ClientApp process does)."""

    def __init__(self, cfg: Config, cohort_dir: str | Path, run_dir: str | Path, resume: bool = False,
                 force: bool = False, stop: StopSignals | None = None):
        self.cfg, self.stop = cfg, stop
        self.cohort = Cohort(cohort_dir)  # fails early: missing or broken cohort
        self.scale = training_scale(self.cohort.split("train"))  # recorded in the weights (sampling checks masks)
        self.run = run = RunDir(run_dir)
        t = cfg.train
        eng.select_accelerator(t.device)
        eng.init_distributed()
        self.rank, self.world = rank, _ = eng.rank_world()
        # rank 0 is the one writer of the run dir; checked before the volumes are cached
        eng.on_rank0(run.check_resume, cfg) if resume else eng.on_rank0(run.check_new, force)
        levels = cfg.model.mask_levels()
        self.data = PatchDataset(self.cohort, "train", t.patch_size, cfg.diffusion.hu_window, t.pos_fraction, t.seed,
                                 levels=levels, pos_sampling=t.pos_sampling)
        val_split = "val" if self.cohort.split("val") else "train"
        previews = PatchDataset(self.cohort, val_split, t.patch_size, cfg.diffusion.hu_window, 1.0, t.seed + 1,
                                levels=levels)

        def start_run() -> None:
            from medsyn_site.provenance import record_training_cohort

            if not resume:
                run.create(cfg, force)
            self._stop_message("before the first training step; continue with --resume")  # the run dir exists
            record_training_cohort(run.root, cohort_dir)  # the model is bound to its cohort (publish audits against it)

        eng.on_rank0(start_run)
        self._stop_message("before the first training step; continue with --resume")
        self.data.load(cache_bytes=t.cache_gb * 2 ** 30, spill_dir=run.root / "cache")
        self.preview_samples = [previews[i] for i in range(3)] if rank == 0 else []  # read from disk: once
        del previews

        _configure_torch(cfg)
        net = build_unet(cfg.model)
        if t.init_weights and not resume:  # before the engine exists: its fp32 master copy starts from them
            net.load_state_dict(initial_weights(t.init_weights, cfg))
        self.engine, _ = eng.make_engine(net, t)
        self.ema = EMA(self.engine.module, t.ema_decay, master=eng.fp32_masters(self.engine))  # fp32, on the device
        self.dev = eng.device()
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
        self.sched = scheduler(cfg.diffusion)
        self.step = run.load(self.engine, self.ema) if resume else 0
        self.saved_step = self.step
        self.extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None
        self.metrics = Metrics(run.root, self.step) if rank == 0 else None  # one writer

    def _stop_message(self, message: str) -> None:
        if self.stop:
            self.stop.message = message

    def set_weights(self, state: dict) -> None:
        """Replace the weights and the EMA (a federated round starts from the global model)."""
        set_weights(self.engine, state)
        self.ema.load_state_dict(state)

    def weights(self) -> dict:
        """The full fp32 weights on the CPU. Collective (ZeRO: every rank holds a part)."""
        return get_weights(self.engine)

    def run_loop(self) -> Path:
        """Train to ``train.steps`` (nothing if the run is there already); the latest EMA weights file."""
        if self.step >= self.cfg.train.steps:
            log.info("run already at step %d of %d", self.step, self.cfg.train.steps)
        else:
            self.run_steps(self.cfg.train.steps - self.step)
        return self.run.latest_weights()

    def run_steps(self, n: int) -> list[float]:
        """Train n steps; their losses. Metrics, previews and checkpoints on the config's schedule, and
        a checkpoint at ``train.steps``. Each step's patches depend only on the step (a resumed or
        federated run sees the data order of one uninterrupted run)."""
        from tqdm import tqdm

        t, start, end = self.cfg.train, self.step, self.step + n
        loader = DataLoader(self.data, batch_size=t.batch_size,
                            sampler=rank_samples(start, end, t.batch_size, self.world, self.rank),
                            num_workers=t.num_workers, persistent_workers=t.num_workers > 0)
        bar = tqdm(total=max(t.steps, end), initial=start, desc="train", unit="step", disable=self.rank != 0)
        tick, logged, losses = time.perf_counter(), start, []
        if self.stop:
            self.stop.defer()  # from here a stop signal ends the current step and writes a checkpoint
        try:
            for step, batch in enumerate(loader, start=start + 1):
                loss = diffusion_loss(self.engine, self.sched, batch, self.cfg, step, self.dev, self.dtype, self.rank)
                self.engine.backward(loss + self.extra_loss(self.engine) if self.extra_loss else loss)
                self.engine.step()
                self.ema.update(self.engine.module)
                self.step = step
                losses.append(loss.item())
                bar.update(1)
                stopping = eng.any_rank(self.stop is not None and self.stop.signum is not None)  # all ranks alike
                if self.metrics and (step % t.log_every == 0 or step in (t.steps, end)):
                    rate = self.world * t.batch_size * (step - logged) / max(time.perf_counter() - tick, 1e-9)
                    tick, logged = time.perf_counter(), step
                    row = {"step": step, "loss": losses[-1], "lr": self.engine.get_lr()[0], "patches_per_s": rate,
                           "peak_mem_mb": peak_memory_mb(self.dev)}
                    self.metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", patches_s=f"{rate:.1f}", mem_mb=f"{row['peak_mem_mb']:.0f}")
                if self.rank == 0 and (step % t.preview_every == 0 or step == t.steps):
                    preview(self.engine.module, self.cfg, self.preview_samples,
                            self.run.root / "previews" / f"step_{step:08d}.png", self.dev, self.dtype)
                if step % t.checkpoint_every == 0 or step == t.steps or stopping:
                    self.save()  # collective: every rank
                if stopping:
                    raise Interrupted(f"stopped by {self.stop.name or 'a stop signal to another rank'} at step {step}; "
                                      "checkpoint written; continue with --resume")
        finally:
            bar.close()
        return losses

    def save(self) -> Path:
        """A checkpoint of the current step (once per step). Collective: every rank calls it."""
        if self.saved_step != self.step or not self.run.tags():
            self.run.save(self.engine, self.ema, self.step, self.cfg, self.cfg.train.keep_checkpoints,
                          scale=self.scale)
            self.saved_step = self.step
        return self.run.ckpt / self.run.latest()

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()


def train(cfg: Config, cohort_dir: str | Path, run_dir: str | Path, resume: bool = False,
          force: bool = False) -> Path:
    """Train (or resume) a run; returns the latest EMA weights file. Raises Interrupted on a stop
    signal at any point: before the first step at once (a run dir resumes from step 0), in the loop
    after writing a checkpoint."""
    with StopSignals() as stop:
        trainer = Trainer(cfg, cohort_dir, run_dir, resume, force, stop)
        try:
            return trainer.run_loop()
        finally:
            trainer.close()
