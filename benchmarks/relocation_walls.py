"""Where do relocated ground-glass nodules sit against the chest wall the generator draws?

The generator sees nodule masks and positions, never the scan a mask came from, and draws lungs of
its own. This samples the held-out volumes of benchmarks/realism.py's nodule stage (seed 9) that
hold a ground-glass nodule, from their masks relocated (`relocate:`, the first --volumes of them),
and reports per ground-glass nodule: its pleural depth in the sample and where it was placed (the
source scan's lungs; 1 = touching the pleura), the share of its voxels denser than -300 HU (the
wall's tissue inside the nodule), its median HU, and the cohort's lung prior on and around it
(`masks.lung_prior`); then the mean contrast against the lung by type, inside the lung and at the
pleura (`realism.contrasts_by_type`, `realism.pleural_by_type`), beside the real set's.

Variants (each kept in --out/walls.json under its label and skipped when there):
  --no-prior        relocation as before the lung prior (inside this scan's lungs only)
  --ggo-level L     the weights' ground-glass mask level replaced by L at sampling (a probe of how
                    the painted density follows the level; the weights were trained at 1/3)

  python benchmarks/relocation_walls.py --out benchmarks/out/realism --label before --no-prior
  python benchmarks/relocation_walls.py --out benchmarks/out/realism --label before-level0.15 --no-prior --ggo-level 0.15
  python benchmarks/relocation_walls.py --out benchmarks/out/realism --label prior
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

import realism as realism_bench  # noqa: E402  (benchmarks/realism.py: the held-out cohorts)
from medsyn_site import realism
from medsyn_site.diffusion import masks
from medsyn_site.diffusion.sample import Sampler
from medsyn_site.imaging import lung_mask, pleural_depth


def by_contact(vols: list) -> dict:
    """Mean contrast against the lung (HU) and count per type, all / inside the lung / at the pleura."""
    got, pleural = realism.contrasts_by_type(vols), realism.pleural_by_type(vols)
    out = {}
    for t in realism.NODULE_TYPES:
        a, b = np.array(got.get(t, [])), np.array(pleural.get(t, []), bool)
        out[t] = {where: {"hu": round(float(a[sel].mean()), 1) if sel.any() else None, "n": int(sel.sum())}
                  for where, sel in (("all", np.ones(len(a), bool)), ("interior", ~b), ("pleural", b))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/realism")
    ap.add_argument("--label", required=True)
    ap.add_argument("--weights", default="medsyn_site/pretrained/phantom-tiny.pt")
    ap.add_argument("--sampler", default="dpm++:10:patch")
    ap.add_argument("--volumes", type=int, default=12)
    ap.add_argument("--no-prior", action="store_true")
    ap.add_argument("--ggo-level", type=float)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    res_file = out / "walls.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    paths = realism_bench.cohorts(out)
    if "real" not in results:
        results["real"] = by_contact(realism.cohort_volumes(paths["nodules"]))
    if a.label not in results:
        lung_prior = masks.lung_prior
        if a.no_prior:  # the relocation before the prior: MaskJob passes no prior
            masks.lung_prior = lambda root, shape: None
        jobs = masks.mask_jobs(f"relocate:{paths['nodules']}", 1)
        conds = [j.conditioning(0) for j in jobs]
        chosen = [i for i, c in enumerate(conds) if (c.codes == 1).any()][: a.volumes]
        sampler, steps, window = a.sampler.split(":")
        gen = Sampler(Path(a.weights), sampler, int(steps), device="cpu", **realism_bench.evaluation(window))
        if a.ggo_level is not None:
            gen.model_cfg = gen.model_cfg.model_copy(update={"type_levels": (a.ggo_level, *gen.model_cfg.type_levels[1:])})
        vols, nodules, t0 = [], [], time.perf_counter()
        for i in chosen:
            c = conds[i]
            hu = sitk.GetArrayFromImage(gen.volumes([c.mask], [2000 + i], [c.codes])[0])
            src = jobs[i].cohort.arrays(jobs[i].source_id)[0]
            prior = lung_prior(str(paths["nodules"]), src.shape)
            vols.append(realism.Volume(hu, None, c.mask.GetSpacing(), codes=c.codes))
            labels, kinds = vols[-1].nodules()
            d_own, d_src = (pleural_depth(lung_mask(x) | (c.codes > 0)) for x in (hu, src))
            for lab, kind in enumerate(kinds, 1):
                comp = labels == lab
                if kind == "ground-glass":
                    nodules.append({"volume": i, "voxels": int(comp.sum()), "depth": int(d_own[comp].min()),
                                    "placed_depth": int(d_src[comp].min()),
                                    "dense_share": round(float((hu[comp] > -300).mean()), 3),
                                    "median_hu": round(float(np.median(hu[comp])), 1),
                                    "prior_min": round(float(prior[comp].min()), 2),
                                    "prior_min_around": round(float(prior[ndimage.binary_dilation(comp, np.ones((3, 3, 3)))].min()), 2)})
        results[a.label] = {"by_contact": by_contact(vols), "ground_glass": nodules,
                            "seconds_per_volume": round((time.perf_counter() - t0) / len(chosen), 1),
                            "args": {k: v for k, v in vars(a).items() if k not in ("out", "threads")}}
        res_file.write_text(json.dumps(results, indent=1))
    for label in ("real", a.label):
        r = results[label]
        print(label, {t: {w: (v["hu"], v["n"]) for w, v in d.items()} for t, d in r.get("by_contact", r).items()})
    gg = results[a.label]["ground_glass"]
    print(f"{a.label}: {sum(n['depth'] == 1 for n in gg)} of {len(gg)} ground-glass nodules touch the generated pleura, "
          f"{sum(n['placed_depth'] == 1 for n in gg)} where placed; mean share of voxels > -300 HU "
          f"{np.mean([n['dense_share'] for n in gg]):.3f}")


if __name__ == "__main__":
    main()
