"""Plots (matplotlib, Agg) and the Markdown report of ``steersample analyze``.

Everything here reads the plain ``result`` dictionary that ``analyze.run`` also writes as JSON,
so a report can be re-drawn from ``analyze.json`` alone.
"""

from __future__ import annotations

import statistics
from pathlib import Path

__all__ = ["headline", "markdown", "write_all"]

_GROUP_COLOURS = {"rare": "tab:red", "frequent": "tab:blue"}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f}"


def small_sigma_means(result: dict) -> dict:
    """Mean small-σ dimension per source and group, e.g. ``{"model": {"rare": 1.5, ...}}``."""
    key = str(result["small_sigma"])
    return {source: {group: _mean_sd(per[key])[0] for group, per in groups.items()}
            for source, groups in result["dimension_vs_sigma"].items()}


def headline(result: dict) -> str:
    """One paragraph: is the model's small-σ local dimension lower on rare classes?"""
    key = str(result["small_sigma"])
    dims = result["dimension_vs_sigma"]
    model_rare, model_freq = dims["model"]["rare"][key], dims["model"]["frequent"][key]
    verdict = "lower" if _mean_sd(model_rare)[0] < _mean_sd(model_freq)[0] else "NOT lower"
    where = result.get("points_at", "held-out")
    return (
        f"small-sigma local dimension (sigma = {result['small_sigma']}, D = {result['dim']}, "
        f"{len(model_rare)} {where} points per group): model rare {_fmt(model_rare)} vs frequent "
        f"{_fmt(model_freq)} -> {verdict} on rare classes; oracle rare "
        f"{_fmt(dims['oracle']['rare'][key])} vs frequent {_fmt(dims['oracle']['frequent'][key])}"
    )


def markdown(result: dict, plots: dict[str, Path]) -> str:
    dims = result["dimension_vs_sigma"]
    lines = [
        "# steersample analyze",
        "",
        f"Model: `{result['model']}`; D = {result['dim']}; rare classes "
        f"{result['rare_classes']}, frequent {result['frequent_classes']}; training images per "
        f"class {result['train_per_class']}.",
        "",
        "**" + headline(result) + "**",
        "",
        "## Local dimension vs sigma",
        "",
        "Count of singular values of M = (1 - sigma) dx0_hat/dx above 0.5 at forward-noised "
        f"{result.get('points_at', 'held-out')} digits, mean ± sd over {result['points_per_group']} points per group "
        "(class-conditional oracle and model).",
        "",
        "| sigma | oracle rare | oracle frequent | model rare | model frequent |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in result["sigmas"]:
        k = str(s)
        lines.append(f"| {s:g} | {_fmt(dims['oracle']['rare'][k])} | {_fmt(dims['oracle']['frequent'][k])} "
                     f"| {_fmt(dims['model']['rare'][k])} | {_fmt(dims['model']['frequent'][k])} |")
    lines += [
        "",
        "## Oracle local dimension vs training-set size",
        "",
        "Nested random subsets of each frequent class's training images; same held-out points.",
        "",
        "| N | " + " | ".join(f"sigma = {s:g}" for s in result["subset_sigmas"]) + " |",
        "|---:|" + "---:|" * len(result["subset_sigmas"]),
    ]
    for n in result["subset_sizes"]:
        row = result["dimension_vs_size"][str(n)]
        lines.append(f"| {n} | " + " | ".join(_fmt(row[str(s)]) for s in result["subset_sigmas"]) + " |")
    lines += [
        "",
        "## Reach, align, slide",
        "",
        f"Euler trajectories of the model (no guidance); distance of x_sigma to the "
        f"{result['ridge_dim']}-dim ridge of the class's smoothed training set, and the norms of "
        "the normal / tangential parts of the velocity error v_hat - v* (v* = class oracle). "
        "Final d1/d2 < 1/3 means the sample copies a training image.",
        "",
        "| class | group | traj | dist @ first sigma | dist @ mid | dist @ last | normal err (late half) "
        "| tangential err (late half) | final d1/d2 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tr in result["traces"]:
        group = "rare" if tr["label"] in result["rare_classes"] else "frequent"
        half = len(tr["sigmas"]) // 2
        for b, dist in enumerate(tr["distance"]):
            late_n = statistics.fmean(tr["normal_error"][b][half:])
            late_t = statistics.fmean(tr["tangential_error"][b][half:])
            lines.append(f"| {tr['label']} | {group} | {b} | {dist[0]:.3f} | {dist[half]:.3f} | "
                         f"{dist[-1]:.3f} | {late_n:.3f} | {late_t:.3f} | {tr['final_nn_ratio'][b]:.3f} |")
    lines += ["", "## Plots", ""] + [f"- {name}: `{path.name}`" for name, path in plots.items()] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _plot_dimension_vs_sigma(ax, result: dict) -> None:
    sigmas = result["sigmas"]
    for source, style in (("oracle", "--"), ("model", "-")):
        for group, values in result["dimension_vs_sigma"][source].items():
            stats = [_mean_sd(values[str(s)]) for s in sigmas]
            mean = [m for m, _ in stats]
            sd = [d for _, d in stats]
            ax.plot(sigmas, mean, style, marker="o", ms=3, color=_GROUP_COLOURS[group],
                    label=f"{source}, {group}")
            if source == "model":
                ax.fill_between(sigmas, [m - d for m, d in zip(mean, sd)],
                                [m + d for m, d in zip(mean, sd)], color=_GROUP_COLOURS[group], alpha=0.15)
    ax.axvline(result["small_sigma"], color="grey", lw=0.6, ls=":")
    _log_ticks(ax, sigmas)
    ax.set_xlim(max(sigmas) * 1.05, min(sigmas) / 1.05)
    ax.set_xlabel("sigma (log; 1 = noise)")
    ax.set_ylabel("local dimension (#sv > 0.5)")
    ax.set_title("local dimension vs sigma", fontsize=9)
    ax.legend(fontsize=7)


def _plot_dimension_vs_size(ax, result: dict) -> None:
    sizes = result["subset_sizes"]
    import matplotlib.pyplot as plt

    top = 1.0
    shades = plt.cm.viridis([i / max(1, len(result["subset_sigmas"])) for i in range(len(result["subset_sigmas"]))])
    for s, shade in zip(result["subset_sigmas"], shades):
        mean = [_mean_sd(result["dimension_vs_size"][str(n)][str(s)])[0] for n in sizes]
        ax.plot(sizes, mean, marker="o", ms=3, color=shade, label=f"oracle, sigma = {s:g}")
        top = max(top, *mean)
    key = str(result["small_sigma"])
    marked = []
    for group in ("rare", "frequent"):
        n = statistics.fmean(_sizes(result, group))
        m = _mean_sd(result["dimension_vs_sigma"]["model"][group][key])[0]
        ax.scatter([n], [m], marker="*", s=120, color=_GROUP_COLOURS[group], zorder=5,
                   label=f"model, {group} (sigma = {result['small_sigma']:g})")
        marked.append(round(n))
        top = max(top, m)
    _log_ticks(ax, sorted(set(sizes) | set(marked)))
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(0.0, 8.0 * top)                 # headroom for the legend
    ax.set_xlabel("training images per class N (log)")
    ax.set_ylabel("local dimension (symlog)")
    ax.set_title("local dimension vs training-set size", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", ncol=2)


def _sizes(result: dict, group: str) -> list[int]:
    """Training images per class of the group's classes (JSON keys may be strings)."""
    train = result["train_per_class"]
    return [train[c] if c in train else train[str(c)] for c in result[f"{group}_classes"]]


def _log_ticks(ax, values) -> None:
    """Log x axis labelled at ``values`` only (no crowded minor labels)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(list(values)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{v:g}" for v in values], fontsize=7)


def _plot_trace(ax_dist, ax_err, result: dict) -> None:
    for tr in result["traces"]:
        group = "rare" if tr["label"] in result["rare_classes"] else "frequent"
        colour = _GROUP_COLOURS[group]
        for b in range(len(tr["distance"])):
            lab = f"class {tr['label']} ({group})" if b == 0 else None
            ax_dist.plot(tr["sigmas"], tr["distance"][b], color=colour, lw=1, label=lab)
            ax_err.plot(tr["sigmas"], tr["normal_error"][b], color=colour, lw=1,
                        label=f"normal, class {tr['label']}" if b == 0 else None)
            ax_err.plot(tr["sigmas"], tr["tangential_error"][b], color=colour, lw=1, ls="--",
                        label=f"tangential, class {tr['label']}" if b == 0 else None)
    for ax in (ax_dist, ax_err):
        ax.set_xlim(1.0, 0.0)
        ax.set_yscale("log")
        ax.set_xlabel("sigma (1 = noise)")
        ax.legend(fontsize=7)
    ax_dist.set_ylabel("distance to ridge")
    ax_dist.set_title("reach / align: distance to the ridge", fontsize=9)
    ax_err.set_ylabel("|part of v_hat - v*|")
    ax_err.set_title("align / slide: normal vs tangential error", fontsize=9)


def write_all(result: dict, out: Path) -> list[Path]:
    """Write the PNGs and ``analyze.md`` into ``out``; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {name: out / f"{name}.png" for name in
             ("local_dimension", "dimension_vs_n", "ridge_trace", "geometry")}
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    _plot_dimension_vs_sigma(ax, result)
    _save(fig, plots["local_dimension"])
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    _plot_dimension_vs_size(ax, result)
    _save(fig, plots["dimension_vs_n"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    _plot_trace(axes[0], axes[1], result)
    _save(fig, plots["ridge_trace"])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    _plot_dimension_vs_sigma(axes[0], result)
    _plot_dimension_vs_size(axes[1], result)
    _plot_trace(axes[2], axes[3], result)
    _save(fig, plots["geometry"])
    md = out / "analyze.md"
    md.write_text(markdown(result, plots))
    return list(plots.values()) + [md]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
