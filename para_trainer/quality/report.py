"""The study's results from its finished cells: results.json, results.md (mean ± std over concepts and seeds),
the comparisons the papers make (each with a verdict), and two plots.

A comparison pairs cells of the same concept and training seed. A claim "holds" when the mean paired difference
is more than two standard errors in its favour, "does not hold" when more than two against it, and is "within
noise" otherwise (fewer than 3 pairs: "too few cells").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .methods import KS, METHODS
from .scores import METRICS, SINGLE_IMAGE_METRICS

COMBINED = ("fidelity", "alignment", "class_accuracy")  # the sweep's criterion: their mean


def load_cells(out: Path, task: str = "subject") -> list[dict]:
    pattern = "*-steps/*/*.json" if task == "subject" else f"*-steps/{task}/*/*.json"
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob(pattern))]


def by_group(cells: list[dict]) -> dict[str, list[dict]]:
    """Cells by method, rank, learning rate and steps (one table row each), in the order first met."""
    groups: dict[str, list[dict]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    return groups


def single_image_table(cells: list[dict]) -> dict[str, dict]:
    """Single-image editing per method: the base model's scores (step 0) and the adapter's, means over cells."""
    table = {}
    for name, members in by_group(cells).items():
        table[name] = {"cells": len(members), "parameters": int(np.mean([m["parameters"] for m in members])),
                       **{metric: {"base": float(np.mean([m["by_step"]["0"][metric] for m in members])),
                                   "mean": float(np.mean([m["final"][metric] for m in members])),
                                   "std": float(np.std([m["final"][metric] for m in members]))}
                          for metric in SINGLE_IMAGE_METRICS}}
    return table


def single_image_markdown(table: dict) -> str:
    lines = ["", "Single-image editing (one photo; its caption and three edits over 4 noise seeds; base model -> "
             "adapter):", "", "| method | params | cells | " + " | ".join(SINGLE_IMAGE_METRICS) + " |",
             "|---|---|---|" + "---|" * len(SINGLE_IMAGE_METRICS)]
    for name, row in sorted(table.items()):
        lines.append(f"| {name} | {row['parameters']:,} | {row['cells']} | " + " | ".join(
            f"{row[m]['base']:.3f} -> {row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in SINGLE_IMAGE_METRICS)
            + " |")
    return "\n".join(lines) + "\n"


def group_key(cell: dict) -> str:
    factor = cell.get("lr_factor", 1.0)
    lr = "" if factor == 1 else f" lr x{factor:g}"
    rank = f" r={cell['rank']}" if METHODS.get(cell["method"]) is None or METHODS[cell["method"]].ranked else ""
    return f"{METHODS[cell['method']].label if cell['method'] in METHODS else cell['method']}{rank}{lr}" + (
        f" ({cell['steps']} steps)" if cell["steps"] != 200 else "")


def combined(scores: dict) -> float:
    return float(np.mean([scores[m] for m in COMBINED]))


def derived(cell: dict, metric: str) -> float:
    """A final score, the combined score, or the fidelity gained over the base model on the same concept."""
    if metric == "combined":
        return combined(cell["final"])
    if metric == "fidelity_gain":
        return cell["final"]["fidelity"] - cell["by_step"]["0"]["fidelity"]
    return cell["final"][metric]


def summarize(cells: list[dict]) -> dict[str, dict]:
    table = {}
    for name, members in by_group(cells).items():
        row = {"method": members[0]["method"], "rank": members[0]["rank"],
               "lr_factor": members[0].get("lr_factor", 1.0), "learning_rate": members[0]["learning_rate"],
               "cells": len(members), "concepts": len({m["concept"] for m in members}),
               "seeds": len({m["seed"] for m in members}),
               "parameters": int(np.mean([m["parameters"] for m in members])),
               "file_bytes": int(np.mean([m["file_bytes"] for m in members])),
               "train_seconds": round(float(np.mean([m["train_seconds"] for m in members])), 1)}
        for metric in METRICS + ("combined", "fidelity_gain"):
            values = [derived(m, metric) for m in members]
            row[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        steps = sorted({int(s) for m in members for s in m["by_step"]})
        row["by_step"] = {str(s): {metric: float(np.mean([m["by_step"][str(s)][metric] for m in members
                                                           if str(s) in m["by_step"]]))
                                   for metric in METRICS} for s in steps}
        table[name] = row
    return table


def base_scores(out: Path, concepts: set[str]) -> dict | None:
    rows = [json.loads((out / "base" / f"{c}.json").read_text()) for c in sorted(concepts)
            if (out / "base" / f"{c}.json").exists()]
    if not rows:
        return None
    return {metric: float(np.mean([r[metric] for r in rows])) for metric in METRICS}


def verdict(diffs: list[float]) -> dict:
    if len(diffs) < 3:
        return {"pairs": len(diffs), "mean_difference": float(np.mean(diffs)) if diffs else None,
                "verdict": "too few cells"}
    mean, se = float(np.mean(diffs)), float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
    word = "holds" if mean > 2 * se else "does not hold" if mean < -2 * se else "within noise"
    return {"pairs": len(diffs), "mean_difference": mean, "standard_error": se, "verdict": word}


def compare(cells: list[dict], a: tuple[str, int], b: tuple[str, int], metrics=("fidelity", "alignment",
                                                                                 "class_accuracy", "combined")):
    """Paired differences a - b over (concept, seed, steps); a and b are (method, rank[, learning-rate factor]),
    factor 1 unless given."""
    def index(method, rank, factor=1.0):
        return {(c["concept"], c["seed"], c["steps"]): c for c in cells
                if c["method"] == method and c["rank"] == rank and c.get("lr_factor", 1.0) == factor}

    left, right = index(*a), index(*b)
    pairs = sorted(set(left) & set(right))
    result = {}
    for metric in metrics:
        diffs = [(combined(left[p]["final"]) - combined(right[p]["final"])) if metric == "combined"
                 else left[p]["final"][metric] - right[p]["final"][metric] for p in pairs]
        result[metric] = verdict(diffs)
    return result


def claims(cells: list[dict]) -> list[dict]:
    """PaRa against LoRA at equal parameters (r = 2k vs k) and equal rank (k vs k), for each k."""
    out = []
    for para in ("para", "para-exca", "para-exca-low-energy"):
        for k in KS:
            for label, para_rank in (("equal parameters", 2 * k), ("equal rank", k)):
                result = compare(cells, (para, para_rank), ("lora", k))
                if result["fidelity"]["pairs"]:
                    out.append({"claim": f"{METHODS[para].label} r={para_rank} vs LoRA r={k} ({label})",
                                "a": [para, para_rank], "b": ["lora", k], **result})
    best = best_factors(cells)
    for para in ("para", "para-exca"):  # each at the learning rate that did best for it
        for k in KS:
            for label, para_rank in (("equal parameters", 2 * k), ("equal rank", k)):
                a, b = (para, para_rank, best.get((para, para_rank), 1.0)), ("lora", k, best.get(("lora", k), 1.0))
                if a[2] == b[2] == 1.0:
                    continue
                result = compare(cells, a, b)
                if result["fidelity"]["pairs"]:
                    out.append({"claim": f"{METHODS[para].label} r={para_rank} lr x{a[2]:g} vs LoRA r={k} lr x{b[2]:g} "
                                f"({label}, each at its better rate)", "a": list(a), "b": list(b), **result})
    for rank in sorted({r for k in KS for r in (k, 2 * k)}):  # the starting point alone: W0's quiet directions
        result = compare(cells, ("para-exca-low-energy", rank), ("para-exca", rank))
        if result["fidelity"]["pairs"]:
            out.append({"claim": f"PaRa (exca) r={rank}: low-energy init vs random init",
                        "a": ["para-exca-low-energy", rank], "b": ["para-exca", rank], **result})
    for k in KS:  # the paper's composition against either part alone
        for other in ("para", "lora"):
            result = compare(cells, ("para+lora", k), (other, k))
            if result["fidelity"]["pairs"]:
                out.append({"claim": f"PaRa r={k} + LoRA r=1 vs {METHODS[other].label} r={k}",
                            "a": ["para+lora", k], "b": [other, k], **result})
    others = [(other, k, f"{METHODS[other].label} r={k}") for other in ("locon", "lokr") for k in KS]
    for other, k, label in others + [("krona", 0, METHODS["krona"].label)]:  # PaRa at 2k against the rest at k
        for para in ("para-exca", "para"):
            result = compare(cells, (para, 2 * max(k, 1)), (other, k))
            if result["fidelity"]["pairs"]:
                out.append({"claim": f"{METHODS[para].label} r={2 * max(k, 1)} vs {label}",
                            "a": [para, 2 * max(k, 1)], "b": [other, k], **result})
    result = compare(cells, ("krona", 0), ("lora", 1))  # DiffuseKronA's own claim against LoRA
    if result["fidelity"]["pairs"]:
        out.append({"claim": "KronA vs LoRA r=1 (DiffuseKronA)", "a": ["krona", 0], "b": ["lora", 1], **result})
    return out


def sensitivity(cells: list[dict]) -> list[dict]:
    """DiffuseKronA's claim as a paired test: for each (concept, seed) the spread of the combined score across the
    learning-rate factors that both methods ran on every such pair; LoRA's spread minus the other method's, so
    "holds" means less sensitive to the learning rate than LoRA."""
    runs: dict[tuple, dict[tuple, dict[float, float]]] = {}
    for cell in cells:
        pair = (cell["concept"], cell["seed"], cell["steps"])
        by_rate = runs.setdefault((cell["method"], cell["rank"]), {}).setdefault(pair, {})
        by_rate[cell.get("lr_factor", 1.0)] = combined(cell["final"])
    out = []
    for (method, rank), pairs in sorted(runs.items()):
        for lora_rank in sorted({r for m, r in runs if m == "lora" and method != "lora"}):
            lora = runs[("lora", lora_rank)]
            keys = [key for key in sorted(set(pairs) & set(lora)) if len(set(pairs[key]) & set(lora[key])) >= 2]
            factors = set.intersection(*(set(pairs[key]) & set(lora[key]) for key in keys)) if keys else set()
            diffs = [(max(lora[key][f] for f in factors) - min(lora[key][f] for f in factors))
                     - (max(pairs[key][f] for f in factors) - min(pairs[key][f] for f in factors)) for key in keys]
            if len(factors) >= 2:
                label = METHODS[method].label + (f" r={rank}" if METHODS[method].ranked else "")
                out.append({"claim": f"{label} less sensitive to the learning rate than LoRA r={lora_rank}",
                            "a": [method, rank], "b": ["lora", lora_rank],
                            "factors": [f"{f:g}" for f in sorted(factors)], "spread": verdict(diffs)})
    return out


def best_factors(cells: list[dict]) -> dict[tuple, float]:
    """(method, rank) -> the learning-rate factor with the best mean combined score on the pairs all rates share."""
    return {key: row["best_factor"] for key, row in _spread_by_key(cells).items()}


def _spread_by_key(cells: list[dict]) -> dict[tuple, dict]:
    runs: dict[tuple, dict[float, dict[tuple, float]]] = {}
    for cell in cells:
        runs.setdefault((cell["method"], cell["rank"]), {}).setdefault(cell.get("lr_factor", 1.0), {})[
            (cell["concept"], cell["seed"], cell["steps"])] = combined(cell["final"])
    out = {}
    for key, factors in sorted(runs.items()):
        common = set.intersection(*(set(v) for v in factors.values()))
        if len(factors) < 2 or not common:
            continue
        means = {f: float(np.mean([v[k] for k in common])) for f, v in sorted(factors.items())}
        out[key] = {"by_factor": {f"{f:g}": m for f, m in means.items()}, "cells_per_factor": len(common),
                    "spread": max(means.values()) - min(means.values()), "best_factor": max(means, key=means.get)}
    return out


def sweep_spread(cells: list[dict]) -> dict[str, dict]:
    """DiffuseKronA's claim: per method and rank, how much the combined score moves across learning rates, on the
    (concept, seed) pairs that every learning rate of it has."""
    spread = {}
    for (method, rank), row in _spread_by_key(cells).items():
        label = METHODS[method].label if method in METHODS else method
        spread[f"{label} r={rank}" if rank else label] = row
    return spread


def _difference(result: dict) -> str:
    if result["mean_difference"] is None:
        return "-"
    if "standard_error" not in result:
        return f"{result['mean_difference']:+.3f} ({result['verdict']})"
    return f"{result['mean_difference']:+.3f} ± {2 * result['standard_error']:.3f} ({result['verdict']})"


def _fmt(cell: dict) -> str:
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def markdown(table: dict, base: dict | None, comparisons: list[dict], spread: dict,
             sensitive: list[dict] = ()) -> str:
    lines = ["| method | params | file KB | cells | fidelity | fidelity gain | recognition | alignment | leak | "
             "class acc. | diversity | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if base:
        lines.append("| base model (no adapter) | 0 | 0 | - | " + f"{base['fidelity']:.3f} | 0 | "
                     + " | ".join(f"{base[m]:.3f}" for m in METRICS[1:]) + " | - |")
    for name, row in sorted(table.items(), key=lambda kv: (kv[1]["method"], kv[1]["rank"], kv[1]["lr_factor"])):
        lines.append(f"| {name} | {row['parameters']:,} | {row['file_bytes'] / 1024:.0f} | {row['cells']} | "
                     + " | ".join(_fmt(row[m]) for m in ("fidelity", "fidelity_gain") + METRICS[1:])
                     + f" | {row['train_seconds']:.0f} |")
    if comparisons:
        lines += ["", "Comparisons: mean paired difference (first minus second) ± two standard errors, and the "
                  "verdict for the first.", "",
                  "| comparison (paired over concept and seed) | pairs | Δ fidelity | Δ alignment | Δ class acc. | "
                  "Δ combined |", "|---|---|---|---|---|---|"]
        for c in comparisons:
            cells = [c[m] for m in ("fidelity", "alignment", "class_accuracy", "combined")]
            lines.append(f"| {c['claim']} | {c['fidelity']['pairs']} | " + " | ".join(_difference(x) for x in cells)
                         + " |")
    if sensitive:
        lines += ["", "Learning-rate sensitivity: per concept and seed, the spread of the combined score over the rates "
                  "both ran; LoRA's spread minus the method's (± two standard errors; \"holds\": less sensitive).", "",
                  "| claim | rates | pairs | Δ spread |", "|---|---|---|---|"]
        for c in sensitive:
            lines.append(f"| {c['claim']} | x{', x'.join(c['factors'])} | {c['spread']['pairs']} | "
                         f"{_difference(c['spread'])} |")
    if spread:
        lines += ["", "Learning rates (combined score, on the concept and seed pairs every rate has):", "",
                  "| method | " + " | ".join(f"x{f}" for f in ("0.3", "1", "3")) + " | pairs | spread | best |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in spread.items():
            values = [row["by_factor"].get(f) for f in ("0.3", "1", "3")]
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values)
                         + f" | {row['cells_per_factor']} | {row['spread']:.3f} | x{row['best_factor']:g} |")
    return "\n".join(lines) + "\n"


def plots(out: Path, table: dict, base: dict | None) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    figure, axis = plt.subplots(figsize=(7, 5))
    for i, (name, row) in enumerate(sorted(table.items())):  # tab10 repeats after ten rows: vary the marker too
        axis.errorbar(row["alignment"]["mean"], row["fidelity_gain"]["mean"], xerr=row["alignment"]["std"],
                      yerr=row["fidelity_gain"]["std"], fmt="osD^v<>"[i // 10 % 7], capsize=3, label=name,
                      color=f"C{i % 10}")
    if base:
        axis.plot(base["alignment"], 0, "kx", markersize=10, label="base model")
    axis.set_xlabel("alignment: edit prompts' attributes found (CLIP-T role)")
    axis.set_ylabel("fidelity gain over the base model (DINO role)")
    axis.set_title("fidelity against alignment (mean ± std over concepts and seeds)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "fidelity_vs_alignment.png", dpi=110)
    written.append("fidelity_vs_alignment.png")
    plt.close(figure)
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for i, (name, row) in enumerate(sorted(table.items())):
        steps = sorted(int(s) for s in row["by_step"])
        for axis, metric in zip(axes, ("fidelity", "alignment", "class_accuracy")):  # means over the same cells
            axis.plot(steps, [row["by_step"][str(s)][metric] for s in steps], "osD^v<>"[i // 10 % 7] + "-",
                      color=f"C{i % 10}", label=name)
            axis.set_title(metric)
            axis.set_xlabel("training steps")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "scores_vs_steps.png", dpi=110)
    written.append("scores_vs_steps.png")
    plt.close(figure)
    return written


def write_report(out) -> dict:
    out = Path(out)
    cells = load_cells(out)
    table = summarize(cells)
    base = base_scores(out, {c["concept"] for c in cells})
    comparisons = claims(cells)
    spread, sensitive = sweep_spread(cells), sensitivity(cells)
    single = single_image_table(load_cells(out, "single-image"))
    summary = {"cells": len(cells), "base": base, "table": table, "comparisons": comparisons,
               "learning_rate_sweep": spread, "learning_rate_sensitivity": sensitive, "single_image": single}
    figures = plots(out, table, base) if table else []
    summary["plots"] = figures
    tmp = out / ".results.json.tmp"
    out.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(markdown(table, base, comparisons, spread, sensitive)
                                    + (single_image_markdown(single) if single else ""))
    return summary
