"""The report of the main job: ``results.json``, ``results.md`` (tables, paired intervals, verdicts), plots.

``results.md`` has the mean ± standard deviation over seeds of every metric (raw and temperature-scaled,
in-domain and averaged over the corruption sweep), then FP-BMA minus every other method paired over seeds
with a 95 % Student-t interval (:mod:`experiments.analysis`) and the computed verdict on the paper's claim
that FP-BMA's BMA is better. Plots: a reliability diagram per method and BMA accuracy against corruption
severity.

>>> lookup({"in_domain": {"raw": {"acc": 0.9}}}, ("in_domain", "raw", "acc"))
0.9
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from experiments import analysis
from experiments.input_pipeline import target_data
from experiments.workdir import code_version, method_dir
from fpbma import calibration


def lookup(result: dict, path: tuple):
    """``result[path[0]][path[1]]…``, or None where a key is missing (e.g. no corruption sweep)."""
    for key in path:
        result = result.get(key) if isinstance(result, dict) else None
    return result


FPBMA_FAMILY = ("fpbma", "vi", "fpbma_released", "fpbma_mean")
"""FP-BMA and its ablations: drawn with thick lines and large markers in every plot."""

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")


def method_styles(names) -> dict:
    """A distinct ``{color, marker, linewidth, markersize, zorder}`` for every method, however many.

    Colours run through the 20 of ``tab20`` (then evenly spaced hues) and markers through 12 shapes, so no
    two methods share both; FP-BMA and its ablations (:data:`FPBMA_FAMILY`) come first, with thick lines.

    >>> styles = method_styles(["fpbma", "sgd", "laplace"])
    >>> styles["fpbma"]["linewidth"] > styles["sgd"]["linewidth"]
    True
    >>> len({(s["color"], s["marker"]) for s in method_styles([f"m{i}" for i in range(40)]).values()})
    40
    """
    import matplotlib

    names = list(names)
    ordered = [n for n in FPBMA_FAMILY if n in names] + [n for n in names if n not in FPBMA_FAMILY]
    n = len(ordered)
    if n <= 20:
        colors = [matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](i)) for i in range(20)]
        # the saturated half of tab20 first (even indices), the light half after
        colors = colors[0::2] + colors[1::2]
    else:
        colors = [matplotlib.colors.to_hex(matplotlib.colors.hsv_to_rgb((i / n, 0.85, 0.8))) for i in range(n)]
    out = {}
    for i, name in enumerate(ordered):
        highlighted = name in FPBMA_FAMILY
        out[name] = {"color": colors[i % len(colors)], "marker": _MARKERS[i % len(_MARKERS)],
                     "linewidth": 2.6 if highlighted else 1.2, "markersize": 8 if highlighted else 5,
                     "zorder": 3 if highlighted else 2}
    return out


def plot_training_curves(config, results: dict, path: str) -> None:
    """Training loss and validation NLL over steps, one line per method (first reported seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.training import read_metrics

    styles = method_styles(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in results:
        seed = min(results[m])
        lines = read_metrics(method_dir(config, m, int(seed)))
        style = {k: v for k, v in styles[m].items() if k != "marker"}
        train = [(r["step"], r["train/loss"]) for r in lines if "train/loss" in r]
        val = [(r["step"], r["validation/nll"]) for r in lines if "validation/nll" in r]
        if train:
            axes[0].plot(*zip(*train), label=m, **style)
        if val:
            axes[1].plot(*zip(*val), label=m, marker=styles[m]["marker"], **style)
    axes[0].set_ylabel("training loss ℓ (per step)")
    axes[1].set_ylabel(f"validation NLL of the BMA ({config.transfer.get('select_samples', '?')} samples)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Training curves, seed {min(min(r) for r in results.values())}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(config, results: dict, wall_time: float) -> None:
    """``results.json``, ``results.md`` and PNG plots in the work dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wd = config.workdir
    payload = {"config": config.to_dict(), "wall_time_s": wall_time, "devices": [str(d) for d in jax.devices()],
               "results": results}
    with open(os.path.join(wd, "results.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)

    def values(method, path):
        return [v for v in (lookup(r, path) for r in results[method].values()) if v is not None]

    def mean(method, path):
        vals = values(method, path)
        return np.mean(vals) if vals else float("nan")

    def cell(method, path):
        """mean, or mean ± standard deviation over seeds when there are several."""
        vals = values(method, path)
        if not vals:
            return "nan"
        return f"{np.mean(vals):.4f}" + (f" ± {np.std(vals, ddof=1):.4f}" if len(vals) > 1 else "")

    seeds = sorted({s for r in results.values() for s in r})
    n_test = int(target_data(config, seeds[0])["test_label"].shape[0])
    lines = [f"Transfer {config.data.source} → {config.data.target} ({config.data.k_shot}-shot, scheme "
             f"{config.transfer.scheme}), seeds {seeds}, wall time {wall_time / 60:.1f} min, "
             f"S = {config.eval.num_samples} in-domain ({n_test} test images) / "
             f"{config.eval.corruption_num_samples} under shift; code {code_version()}; "
             f"checkpoint selection {config.transfer.get('select', 'last')}. Mean ± std over seeds.", "",
             "| method | ACC ↑ | NLL ↓ | ECE ↓ | ACC (TS) | NLL (TS) | ECE (TS) | shift ACC ↑ | shift NLL ↓ "
             "| shift ECE ↓ | shift NLL (TS) | shift ECE (TS) |",
             "|---" * 12 + "|"]
    for m in results:
        row = [cell(m, ("in_domain", k, x)) for k in ("raw", "ts") for x in ("acc", "nll", "ece")]
        row += [cell(m, ("corruption_mean", "raw", x)) for x in ("acc", "nll", "ece")]
        row += [cell(m, ("corruption_mean", "ts", x)) for x in ("nll", "ece")]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += [""] + paired_report(results)
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    for m in results:
        seed = seeds[0] if seeds[0] in results[m] else next(iter(results[m]))
        lp = np.load(os.path.join(method_dir(config, m, seed), "test_log_probs.npy"))
        labels = target_data(config, seed)["test_label"]
        calibration.reliability_diagram(lp, labels, os.path.join(wd, f"reliability_{m}.png"),
                                        title=f"{m}: BMA on {config.data.target} test")
    severities = tuple(int(s) for s in config.eval.severities)
    if results:
        plot_training_curves(config, results, os.path.join(wd, "training_curves.png"))
    styles = method_styles(results)
    if any("corruptions" in r for res in results.values() for r in res.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in results:
            accs = [mean(m, ("in_domain", "raw", "acc"))]
            for s in severities:
                vals = [v["raw"]["acc"] for r in results[m].values() for k, v in r.get("corruptions", {}).items()
                        if k.endswith(f"_{s}")]
                accs.append(np.mean(vals) if vals else np.nan)
            ax.plot((0,) + severities, accs, label=m, **styles[m])
        ax.set_xlabel("corruption severity (0 = clean)")
        ax.set_ylabel("BMA accuracy (mean over corruptions)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(wd, "accuracy_vs_severity.png"), dpi=120)
        plt.close(fig)


def paired_report(results: dict) -> list[str]:
    """Lines of results.md: FP-BMA minus every method, paired over seeds (95 % t interval), and claim 2(b)."""
    if analysis.REFERENCE not in results:
        return []
    metric_paths = {"acc": ("in_domain", "raw", "acc"), "nll": ("in_domain", "raw", "nll"),
                    "shift acc": ("corruption_mean", "raw", "acc"), "shift nll": ("corruption_mean", "raw", "nll")}

    values = {name: {m: {s: v for s, v in ((s, lookup(r, path)) for s, r in per.items()) if v is not None}
                     for m, per in results.items()} for name, path in metric_paths.items()}
    values = {k: v for k, v in values.items() if v.get(analysis.REFERENCE)}
    tables = {k: analysis.paired_table(v, k.split()[-1]) for k, v in values.items()}
    n = len(values["acc"][analysis.REFERENCE])
    lines = [f"FP-BMA minus each method, paired over the {n} seeds: mean [95 % t interval]; "
             "(+) FP-BMA better, (−) worse, (?) undecided.", "",
             "| method | " + " | ".join(f"Δ {k.upper()}" for k in tables) + " |", "|---" * (len(tables) + 1) + "|"]
    mark = {"better": "(+)", "worse": "(−)", "undecided": "(?)"}
    for m in tables["acc"]:
        cells = [f"{analysis.format_interval(t[m])} {mark[t[m]['comparison']]}" if m in t else "" for t in tables.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    claim = analysis.claim_bma(values["acc"], values["nll"])
    lines += ["", "Verdicts (rules: experiments/analysis.py; a claim holds when FP-BMA is better than more than half "
              "of the other methods and worse than none, does not hold when it is worse than at least half):",
              f"* Claim 2, FP-BMA's BMA is better: on accuracy **{claim['acc']['verdict']}**, on NLL "
              f"**{claim['nll']['verdict']}** ({n} seeds).",
              "* Claim 1 (approximate-Bayes posteriors are sharp) and the flatness half of claim 2 need the "
              "Hessians: see flatness.md (`python -m experiments.flatness` with the same config)."]
    return lines
