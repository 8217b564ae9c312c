"""Collect finished trainings, pick the targeted cases, and write the utility report: report.json,
report.md (a table like the paper's Table 1) and figures (Dice change per case as the paper's Fig. 3,
Dice per training per arm, example slices with each arm's prediction)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medsyn_site import request as request_contract
from medsyn_site.atomic import atomic_write, atomic_write_text
from medsyn_site.data.cohort import Cohort
from medsyn_site.evaluate import detection, stats
from medsyn_site.evaluate.datasets import ARMS, EvaluationError, dataset_name, load_workspace, parse_arm
from medsyn_site.evaluate.runs import RESULT, run_dir
from medsyn_site.imaging import diameters_mm, label_nodules

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
    labels, n = label_nodules(mask)
    return max(diameters_mm(labels, spacing)) if n else 0.0


def _training_cases(ws: Path, arm: str) -> int | None:
    split = ws / "nnUNet_preprocessed" / dataset_name(arm) / "splits_final.json"
    return len(json.loads(split.read_text())[0]["train"]) if split.is_file() else None


def baseline_of(arm: str) -> str | None:
    """The arm each arm is compared with: real for the four arms, real@N for real+synthetic@N."""
    base, n = parse_arm(arm)
    if base == "real":
        return None
    return "real" if n is None else f"real@{n}"


def _row(ws: Path, arm: str, res: list[dict], base: list[dict] | None, sizes: dict) -> dict:
    means = [float(np.mean(list(case_dice(r, "test").values()))) for r in res]
    nn = [float(np.nanmean([m["nnunet_dice"] if m["nnunet_dice"] is not None else np.nan
                            for m in r["test"].values()])) for r in res]
    per_case = mean_case_dice(res, "test")
    row = {"arm": arm, "training_cases": _training_cases(ws, arm), "trainings": len(res),
           "seeds": [r["seed"] for r in res],
           "dice_mean": float(np.mean(means)), "dice_std": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
           "per_training": means, "nnunet_dice_mean": float(np.mean(nn)), "per_case": per_case,
           "by_size": {s: float(np.mean([per_case[c] for c in per_case if stats.stratum(sizes[c]) == s]))
                       for s in sorted({stats.stratum(sizes[c]) for c in per_case})}}
    if all("detection" in r for r in res):  # results written before detection existed have none
        row["detection"] = detection.summarise([case for r in res for case in r["detection"].values()])
    if base is not None:
        base_case = mean_case_dice(base, "test")
        base_means = [np.mean(list(case_dice(r, "test").values())) for r in base]
        cases = sorted(c for c in per_case if c in base_case)
        diff = [per_case[c] - base_case[c] for c in cases]
        row["compared_with"] = baseline_of(arm)
        row["p_vs_real"] = stats.compare_means(base_means, means)
        row["wilcoxon_p_vs_real"] = stats.paired_wilcoxon([base_case[c] for c in cases], [per_case[c] for c in cases])
        row["diff_vs_real_ci95"] = stats.bootstrap_ci(diff)
        row["diff_vs_real_mean"] = float(np.mean(diff)) if diff else float("nan")
    return row


def _arm_rows(ws: Path, done: dict, sizes: dict) -> list[dict]:
    """One row per finished arm: the four arms first, then the low-data arms by size."""
    order = sorted(done, key=lambda a: (parse_arm(a)[1] or 0, list(ARMS).index(parse_arm(a)[0])))
    return [_row(ws, a, done[a], done.get(baseline_of(a)) if baseline_of(a) else None, sizes) for a in order]


def _fmt(x, nd=4):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def _p(x) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def low_data_curve(rows: list[dict]) -> list[dict]:
    """Per real-set size N: real-only and real + synthetic Dice (the full real set as its largest
    point), and what real + synthetic at N is worth in real cases: the N at which the real-only curve
    (linear in log N between measured sizes) reaches the same Dice ('>' the largest N when above it)."""
    by = {r["arm"]: r for r in rows}
    full_n = by["real"]["training_cases"] if "real" in by else None
    sizes = sorted({parse_arm(a)[1] for a in by if parse_arm(a)[1] is not None})
    if not sizes:
        return []
    points = []
    for n in sizes + ([full_n] if full_n and full_n not in sizes and "real+synthetic" in by else []):
        real = by.get(f"real@{n}") or (by.get("real") if n == full_n else None)
        syn = by.get(f"real+synthetic@{n}") or (by.get("real+synthetic") if n == full_n else None)
        if real:
            points.append({"n": n, "real": real, "real+synthetic": syn})
    xs = np.log([p["n"] for p in points])
    ys = np.array([p["real"]["dice_mean"] for p in points])
    out = []
    for p in points:
        row = {"n": p["n"], "real_dice": p["real"]["dice_mean"], "real_std": p["real"]["dice_std"],
               "real_trainings": p["real"]["trainings"]}
        syn = p["real+synthetic"]
        if syn:
            row.update({"synthetic_dice": syn["dice_mean"], "synthetic_std": syn["dice_std"],
                        "p": syn.get("p_vs_real"), "wilcoxon_p": syn.get("wilcoxon_p_vs_real")})
            target = syn["dice_mean"]
            order = np.argsort(xs)
            if target > ys.max():
                row["worth_real_cases"] = f"> {max(pp['n'] for pp in points)}"
            elif target <= ys[order][0]:
                row["worth_real_cases"] = f"<= {points[int(order[0])]['n']}"
            else:  # the first crossing of the measured real-only curve
                xo, yo = xs[order], ys[order]
                k = int(np.argmax(yo >= target))
                t = (target - yo[k - 1]) / max(yo[k] - yo[k - 1], 1e-12)
                row["worth_real_cases"] = f"{float(np.exp(xo[k - 1] + t * (xo[k] - xo[k - 1]))):.1f}"
        out.append(row)
    return out


def conclusion(rows: list[dict]) -> str:
    """One plain-language sentence per comparison with the real-only arm, as far as the tests go:
    Welch's over the trainings (the paper's) when each arm has >= 2, else the paired per-case one."""
    said, single = [], False
    real = next((x for x in rows if x["arm"] == "real"), None)
    for r in rows:
        if real is None or "p_vs_real" not in r or parse_arm(r["arm"])[1] is not None:
            continue
        d, p, w = r["dice_mean"] - real["dice_mean"], r["p_vs_real"], r["wilcoxon_p_vs_real"]
        if not np.isnan(p):
            tests, decisive = f"Welch p = {_p(p)} over {r['trainings']} trainings each, paired per-case Wilcoxon " \
                              f"p = {_p(w)}", p
        elif not np.isnan(w):
            tests, decisive, single = f"paired per-case Wilcoxon p = {_p(w)}", w, True
        else:
            said.append(f"{r['arm']}: too few trainings and cases for a test (Dice {r['dice_mean']:.3f} against "
                        f"{real['dice_mean']:.3f} real-only).")
            continue
        if decisive < 0.05:
            verb = "raised" if d > 0 else "lowered"
            said.append(f"Training on {r['arm']} data {verb} the test Dice by {abs(d):.3f} against real data "
                        f"alone ({tests}).")
        else:
            said.append(f"Training on {r['arm']} data did not change the test Dice detectably "
                        f"({d:+.3f}; {tests}).")
    if single:
        said.append("One training per arm: the variation between trainings is not in the per-case test.")
    return " ".join(said) or "Nothing to compare yet: only the real-only arm has finished."


def _markdown(rows: list[dict], missing, targeted: list[str], curve: list[dict], figures: list[str]) -> str:
    main = [r for r in rows if parse_arm(r["arm"])[1] is None]
    lines = ["# Synthetic data utility (nnU-Net v2)", "", "**Conclusion.** " + conclusion(main), "",
             "Table 1 (as arXiv 2410.12542): test Dice on the real test cases.", "",
             "| training data | cases | trainings | test Dice (mean ± SD over trainings) | p vs real (Welch) "
             "| Wilcoxon p (paired cases) | Δ per case, 95% CI | nnU-Net mean (empty/empty dropped) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in main:
        ci = r.get("diff_vs_real_ci95")
        lines.append(f"| {r['arm']} | {r['training_cases'] or '?'} | {r['trainings']} | "
                     f"{_fmt(r['dice_mean'])} ± {_fmt(r['dice_std'])} | {_p(r.get('p_vs_real'))} | "
                     f"{_p(r.get('wilcoxon_p_vs_real'))} | "
                     + (f"{_fmt(r['diff_vs_real_mean'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "—")
                     + f" | {_fmt(r['nnunet_dice_mean'])} |")
    strata = sorted({s for r in main for s in r["by_size"]})
    lines += ["", "Test Dice by nodule size (largest nodule of the case):", "",
              "| arm | " + " | ".join(strata) + " |", "|---|" + "---|" * len(strata)]
    for r in main:
        lines.append(f"| {r['arm']} | " + " | ".join(_fmt(r["by_size"].get(s)) for s in strata) + " |")
    det = [r for r in main if "detection" in r]
    if det:
        keys = ["all"] + [k for k in sorted({k for r in det for k in r["detection"]}) if k.startswith("size ")] + \
               [k for k in sorted({k for r in det for k in r["detection"]}) if k.startswith("type ")]
        lines += ["", "Nodule-level detection on the test cases (a nodule is found when the prediction overlaps "
                  "it; all trainings of the arm pooled): sensitivity (found/of), and false-positive components "
                  "per case:", "", "| arm | " + " | ".join(k.replace("size ", "").replace("type ", "")
                                                           for k in keys) + " | FP per case |",
                  "|---|" + "---|" * (len(keys) + 1)]
        for r in det:
            d = r["detection"]
            cells = [f"{d[k]['sensitivity']:.2f} ({d[k]['found']}/{d[k]['of']})" if k in d else "—" for k in keys]
            lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {d['fp_per_case']:.2f} |")
    if curve:
        lines += ["", "The low-data curve (`low_data_curve.png`): real-only against real + the synthetic set, on "
                  "N real training cases. 'Worth' is the number of real cases the real-only curve needs to reach "
                  "the real + synthetic Dice.", "",
                  "| real cases N | real | real + synthetic | p (Welch) | Wilcoxon p | worth (real cases) |",
                  "|---|---|---|---|---|---|"]
        for c in curve:
            syn = f"{_fmt(c['synthetic_dice'])} ± {_fmt(c['synthetic_std'])}" if "synthetic_dice" in c else "—"
            lines.append(f"| {c['n']} | {_fmt(c['real_dice'])} ± {_fmt(c['real_std'])} | {syn} | {_p(c.get('p'))} | "
                         f"{_p(c.get('wilcoxon_p'))} | {c.get('worth_real_cases', '—')} |")
    lines += ["", f"How Dice counts empty cases: {stats.EMPTY_RULE}", "",
              f"Targeted cases (validation cases below the real-only mean): {', '.join(targeted) or 'none selected'}. "
              "Their masks conditioned the targeted training data, so their own validation Dice is not counted "
              "as an improvement; the gain of real+targeted is the test split's (its row above: Δ per test case "
              "against real, with its CI).", "",
              "Figures: " + ", ".join(f"`{f}`" + (" (as the paper's Fig. 3)" if f == "dice_change.png" else "")
                                      for f in figures) + ".", ""]
    gain = next((r for r in main if r["arm"] == "real+targeted" and "diff_vs_real_ci95" in r), None)
    if gain:
        lo, hi = gain["diff_vs_real_ci95"]
        lines += [f"Gain of real+targeted over real on the test split: {_fmt(gain['diff_vs_real_mean'])} Dice per "
                  f"case (95% CI [{_fmt(lo)}, {_fmt(hi)}]).", ""]
    if missing:
        lines.append("Missing trainings (not finished yet): " + ", ".join(f"{a} seed {s}" for a, s in missing))
    return "\n".join(lines) + "\n"


def _figures(ws: Path, out: Path, done: dict, real: Cohort, targeted: list[str], curve: list[dict]) -> list[str]:
    """The report's figures, each written atomically into ``out``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        try:
            atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
            written.append(name)
        finally:
            plt.close(fig)

    arms = [a for a in ARMS if a in done]
    save(_dice_per_training(plt, done, arms), "dice_per_training.png")
    other = "real+targeted" if "real+targeted" in done else "real+synthetic" if "real+synthetic" in done else None
    if "real" in done and other:
        save(_dice_change(plt, done, other, targeted), "dice_change.png")
    save(_examples(plt, done, arms, real), "examples.png")
    if curve:
        save(_low_data_curve(plt, curve), "low_data_curve.png")
    return written


def _dice_per_training(plt, done: dict, arms: list[str]):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, arm in enumerate(arms):
        vals = [np.mean(list(case_dice(r, "test").values())) for r in done[arm]]
        ax.scatter([i] * len(vals), vals, color=COLORS[arm])
        ax.errorbar(i + 0.15, np.mean(vals), yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0, fmt="_", color="k")
    ax.set_xticks(range(len(arms)), arms, fontsize=8)
    ax.set_ylabel("test Dice (mean per training)")
    fig.tight_layout()
    return fig


def _dice_change(plt, done: dict, other: str, targeted: list[str]):
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
    return fig


def _examples(plt, done: dict, arms: list[str], real: Cohort):
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
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))  # room for the legend below and the titles above
    return fig


def _low_data_curve(plt, curve: list[dict]):
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, arm in (("real", "real"), ("synthetic", "real+synthetic")):
        pts = [c for c in curve if f"{key}_dice" in c]
        n = [c["n"] for c in pts]
        ax.errorbar(n, [c[f"{key}_dice"] for c in pts], yerr=[c[f"{key}_std"] for c in pts], marker="o",
                    capsize=3, color=COLORS[arm], label=arm if key == "real" else "real + synthetic set")
    ax.set_xscale("log", base=2)
    ax.set_xticks([c["n"] for c in curve], [str(c["n"]) for c in curve])
    ax.set_xlabel("real training cases")
    ax.set_ylabel("test Dice (mean ± SD over trainings)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
    rows = _arm_rows(ws, done, sizes)
    curve = low_data_curve(rows)
    out = ws / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = {"arms": rows, "missing": missing, "targeted_cases": targeted, "empty_case_rule": stats.EMPTY_RULE,
              "test_cases": sorted(sizes), "test_nodule_size_mm": sizes, "low_data_curve": curve,
              "conclusion": conclusion([r for r in rows if parse_arm(r["arm"])[1] is None]),
              "p_value_test": "Welch's t-test over the per-training mean test Dice (as arXiv 2410.12542)"}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=float))
    figures = _figures(ws, out, {a: r for a, r in done.items() if parse_arm(a)[1] is None}, real, targeted, curve)
    atomic_write_text(out / "report.md", _markdown(rows, missing, targeted, curve, figures))
    return report
