"""Weights sampled at other mask levels per nodule type (``model.type_levels``), the network unchanged:
a calibration. The level a type is painted with sets its density (RESULTS, "Realism", parts 10-11: the
phantom model trained at 1/3 paints ground-glass nodules 1.4x as dense as real ones; sampled at 0.2,
0.97x). The levels the network was trained at are kept in ``trained_type_levels`` and ``made_by``.
``--training-cohort DIR``: weights from before ``medsyn train`` recorded the training scans' voxel
size and field of view (``scale``; a sampler warns for masks at another) get them from DIR's train split.

    python benchmarks/relevel.py IN.pt OUT.pt --type-levels 0.2 0.6666666666666666 1.0 [--training-cohort DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medsyn_site.config import ModelConfig
from medsyn_site.data.cohort import Cohort
from medsyn_site.diffusion.rundir import training_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type-levels", type=float, nargs=3, required=True, metavar=("GGO", "PART_SOLID", "SOLID"))
    ap.add_argument("--training-cohort", type=Path, help="the cohort the weights were trained on (records their scale)")
    a = ap.parse_args()
    blob = torch.load(a.weights, map_location="cpu", weights_only=False)
    trained = ModelConfig.of_weights(blob["model"])
    if not trained.nodule_types:
        raise SystemExit(f"{a.weights}: a 0/1-mask model (model.nodule_types off) has no type levels to set")
    try:
        levels = ModelConfig(**(trained.model_dump() | {"type_levels": tuple(a.type_levels)})).type_levels
    except ValueError as e:  # pydantic's, one line
        raise SystemExit(f"--type-levels {a.type_levels}: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}")
    blob["trained_type_levels"] = blob.get("trained_type_levels", list(trained.type_levels))
    blob["model"] = dict(blob["model"], type_levels=list(levels))
    blob["made_by"] = (f"{blob.get('made_by', a.weights.name)}; sampled at type levels {list(levels)} "
                       f"(trained at {blob['trained_type_levels']}): benchmarks/relevel.py")
    if a.training_cohort and not blob.get("scale"):
        blob["scale"] = training_scale(Cohort(a.training_cohort).split("train"))
    tmp = a.out.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(a.out)
    print("wrote", a.out, "type levels", list(levels), "trained at", blob["trained_type_levels"], "scale", blob.get("scale"))


if __name__ == "__main__":
    main()
