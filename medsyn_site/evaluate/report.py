"""Collect finished trainings, pick the targeted cases, and write the utility report: report.json,
report.md (a table like the paper's Table 1) and figures (Dice change per case as the paper's Fig. 3,
Dice per training per arm, example slices with each arm's prediction)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medsyn_site import request as request_contract
from medsyn_site.atomic import atomic_write, atomic_write_text
from medsyn_site.data.cohort import Cohort
from medsyn_site.evaluate import stats
from medsyn_site.evaluate.datasets import ARMS, EvaluationError, load_workspace
from medsyn_site.evaluate.runs import RESULT, run_dir

COLORS = {"real": "tab:blue", "synthetic": "tab:orange", "real+synthetic": "tab:purple", "real+targeted": "tab:red"}


def collect(ws: Path) -> tuple[dict[str, list[dict]], list[tuple[str, int]]]:
    """Finished results per arm, and the (arm, seed) pairs planned but not finished."""
    state = load_workspace(ws)
    done, missing = {}, []
    for arm in state["arms"]:
        for seed in state.get("seeds", []):
            f = run_dir(ws, arm, seed) / RESULT
            if f.exists():
                done.setdefault(arm, []).append(json.loads(f.read_text()))
            else:
                missing.append((arm, seed))
    return done, missing


def case_dice(result: dict, split: str) -> dict[str, float]:
    return {c: stats.dice(m["TP"], m["FP"], m["FN"]) for c, m in result[split].items()}


def mean_case_dice(results: list[dict], split: str) -> dict[str, float]:
    per = [case_dice(r, split) for r in results]
    return {c: float(np.mean([p[c] for p in per])) for c in per[0]}


def select_targeted(ws: str | Path, out: str | Path | None = None, per_mask: int = 1,
                    verbatim: bool = False) -> tuple[Path, list[str]]:
    """The paper's targeted cases: validation cases whose Dice under the real-only model (mean over
    its trainings) is below that model's mean validation Dice. Written as a request to the site
    (medsyn_site/request.py): relocated masks unless ``verbatim``."""
    ws = Path(ws)
    done, _ = collect(ws)
    if "real" not in done:
        raise EvaluationError(f"{ws}: no finished real-only training to select targeted cases from")
    val = mean_case_dice(done["real"], "val")
    mean = float(np.mean(list(val.values())))
    worst = sorted(c for c, d in val.items() if d < mean)
    if not worst:  # every case equal: nothing is below the mean; take the single worst
        worst = [min(val, key=val.get)]
    path = Path(out) if out else ws / "targeted_request.json"
    request_contract.write(path, request_contract.Request(
        cases=worst, per_mask=per_mask, mask_mode="verbatim" if verbatim else "relocated",
        cohort=load_workspace(ws)["real"], reason=f"validation cases below the real-only model's mean Dice {mean:.4f}"))
    return path, worst


def _largest_diameter(mask: np.ndarray, spacing) -> float:
    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    if n == 0:
        return 0.0
    voxels = np.bincount(labels.ravel())[1:].max()
    return float((6 * voxels * np.prod(spacing) / np.pi) ** (1 / 3))


def _arm_rows(done: dict, sizes: dict) -> list[dict]:
    real_case = mean_case_dice(done["real"], "test") if "real" in done else None
    real_means = [np.mean(list(case_dice(r, "test").values())) for r in done.get("real", [])]
    rows = []
    for arm in [a for a in ARMS if a in done]:
        res = done[arm]
        means = [float(np.mean(list(case_dice(r, "test").values()))) for r in res]
        nn = [float(np.nanmean([m["nnunet_dice"] if m["nnunet_dice"] is not None else np.nan
                                for m in r["test"].values()])) for r in res]
        per_case = mean_case_dice(res, "test")
        row = {"arm": arm, "trainings": len(res), "seeds": [r["seed"] for r in res],
               "dice_mean": float(np.mean(means)), "dice_std": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
               "per_training": means, "nnunet_dice_mean": float(np.mean(nn)),
               "by_size": {s: float(np.mean([per_case[c] for c in per_case if stats.stratum(sizes[c]) == s]))
                           for s in sorted({stats.stratum(sizes[c]) for c in per_case})}}
        if arm != "real" and real_case is not None:
            cases = sorted(per_case)
            diff = [per_case[c] - real_case[c] for c in cases]
            row["p_vs_real"] = stats.compare_means(real_means, means)
            row["wilcoxon_p_vs_real"] = stats.paired_wilcoxon([real_case[c] for c in cases], [per_case[c] for c in cases])
            row["diff_vs_real_ci95"] = stats.bootstrap_ci(diff)
            row["diff_vs_real_mean"] = float(np.mean(diff)) if diff else float("nan")
        rows.append(row)
    return rows


def _fmt(x, nd=4):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def _markdown(rows: list[dict], missing, targeted: list[str]) -> str:
    lines = ["# Synthetic data utility (nnU-Net v2)", "",
             "| arm | trainings | test Dice (mean ± std over trainings) | nnU-Net mean (empty/empty dropped) "
             "| p vs real (Welch, over trainings) | Wilcoxon p vs real (paired cases) | 95% CI of Δ per case |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("diff_vs_real_ci95")
        lines.append(f"| {r['arm']} | {r['trainings']} | {_fmt(r['dice_mean'])} ± {_fmt(r['dice_std'])} | "
                     f"{_fmt(r['nnunet_dice_mean'])} | {_fmt(r.get('p_vs_real'))} | {_fmt(r.get('wilcoxon_p_vs_real'))} | "
                     + (f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "—") + " |")
    strata = sorted({s for r in rows for s in r["by_size"]})
    lines += ["", "Test Dice by nodule size (largest nodule of the case):", "",
              "| arm | " + " | ".join(strata) + " |", "|---|" + "---|" * len(strata)]
    for r in rows:
        lines.append(f"| {r['arm']} | " + " | ".join(_fmt(r["by_size"].get(s)) for s in strata) + " |")
    lines += ["", f"How Dice counts empty cases: {stats.EMPTY_RULE}", "",
              f"Targeted cases (validation cases below the real-only mean): {', '.join(targeted) or 'none selected'}. "
              "Their masks conditioned the targeted training data, so their own validation Dice is not counted "
              "as an improvement; the gain of real+targeted is the test split's (its row above: Δ per test case "
              "against real, with its CI).", "",
              "Figures: `dice_per_training.png`, `dice_change.png` (as the paper's Fig. 3), `examples.png`.", ""]
    gain = next((r for r in rows if r["arm"] == "real+targeted" and "diff_vs_real_ci95" in r), None)
    if gain:
        lo, hi = gain["diff_vs_real_ci95"]
        lines += [f"Gain of real+targeted over real on the test split: {_fmt(gain['diff_vs_real_mean'])} Dice per "
                  f"case (95% CI [{_fmt(lo)}, {_fmt(hi)}]).", ""]
    if missing:
        lines.append("Missing trainings (not finished yet): " + ", ".join(f"{a} seed {s}" for a, s in missing))
    return "\n".join(lines) + "\n"


def _figures(ws: Path, out: Path, done: dict, real: Cohort, targeted: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        try:
            atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)

    arms = [a for a in ARMS if a in done]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, arm in enumerate(arms):
        vals = [np.mean(list(case_dice(r, "test").values())) for r in done[arm]]
        ax.scatter([i] * len(vals), vals, color=COLORS[arm])
        ax.errorbar(i + 0.15, np.mean(vals), yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0, fmt="_", color="k")
    ax.set_xticks(range(len(arms)), arms, fontsize=8)
    ax.set_ylabel("test Dice (mean per training)")
    fig.tight_layout()
    save(fig, "dice_per_training.png")

    other = "real+targeted" if "real+targeted" in done else "real+synthetic" if "real+synthetic" in done else None
    if "real" in done and other:
        # The targeted cases' masks conditioned the targeted training data: their own Dice is no
        # measure of improvement (shown hollow, not counted); the gain is the test split's.
        fig, ax = plt.subplots(figsize=(7, 3.2))
        groups = [("targeted val (masks in training:\nnot counted)", "val", list(targeted)),
                  ("other val", "val", [c for c in mean_case_dice(done["real"], "val") if c not in targeted]),
                  ("test (the gain)", "test", list(mean_case_dice(done["real"], "test")))]
        for i, (name, split, cases) in enumerate(groups):
            base, new = mean_case_dice(done["real"], split), mean_case_dice(done[other], split)
            d = [new[c] - base[c] for c in cases if c in base and c in new]
            x = np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d) or 1)[: len(d)]
            ax.scatter(x, d, s=12, facecolors="none" if i == 0 else None, edgecolors="gray" if i == 0 else None)
            if d and i > 0:
                ax.hlines(np.mean(d), i - 0.25, i + 0.25, color="k")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xticks(range(3), [g[0] for g in groups], fontsize=8)
        ax.set_ylabel(f"Dice({other}) - Dice(real)")
        fig.tight_layout()
        save(fig, "dice_change.png")

    test = [c.id for c in real.split("test")]
    show = sorted(test, key=lambda c: -int(real.arrays(c)[1].sum()))[:3]
    fig, axes = plt.subplots(1, len(show), figsize=(3.2 * len(show), 3.4), squeeze=False)
    for ax, case in zip(axes[0], show):
        image, mask = real.arrays(case)
        z = int(mask.sum((1, 2)).argmax()) if mask.any() else mask.shape[0] // 2
        ax.imshow(image[z], cmap="gray", vmin=-1350, vmax=150)
        if mask[z].any():
            ax.contour(mask[z], levels=[0.5], colors="lime", linewidths=1.2)
        for arm in arms:
            pred = Path(done[arm][0]["pred_test"]) / f"{case}.nii.gz"
            if pred.exists():
                p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))[z]
                if p.any():
                    ax.contour(p, levels=[0.5], colors=COLORS[arm], linewidths=0.8)
        ax.set_title(f"{case} z={z}", fontsize=8)
        ax.axis("off")
    handles = [plt.Line2D([], [], color="lime", label="ground truth")] + \
              [plt.Line2D([], [], color=COLORS[a], label=a) for a in arms]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save(fig, "examples.png")


def write_report(ws: str | Path) -> dict:
    """Report on whatever has finished; says what is missing."""
    ws = Path(ws)
    state = load_workspace(ws)
    done, missing = collect(ws)
    if not done:
        raise EvaluationError(f"{ws}: no finished training yet (missing: {missing})")
    real = Cohort(state["real"])
    sizes = {c.id: _largest_diameter(real.arrays(c.id)[1], c.spacing[::-1]) for c in real.split("test")}
    targeted = []
    req = ws / "targeted_request.json"
    if req.exists():
        targeted = request_contract.read(req).cases
    rows = _arm_rows(done, sizes)
    out = ws / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = {"arms": rows, "missing": missing, "targeted_cases": targeted, "empty_case_rule": stats.EMPTY_RULE,
              "test_cases": sorted(sizes), "test_nodule_size_mm": sizes,
              "p_value_test": "Welch's t-test over the per-training mean test Dice (as arXiv 2410.12542)"}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=float))
    atomic_write_text(out / "report.md", _markdown(rows, missing, targeted))
    _figures(ws, out, done, real, targeted)
    return report
