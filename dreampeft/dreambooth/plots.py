"""Plots a person compares with: fidelity along a run, and subject against prompt fidelity."""

from __future__ import annotations

from pathlib import Path

CURVES = (("subject", "subject fidelity"), ("prompt", "prompt fidelity"), ("drift", "drift (class prompt)"),
          ("score", "balanced score"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here, and none needed
    import matplotlib.pyplot as plt

    return plt


def fidelity_plot(runs: dict[str, list[dict]], path: Path, chosen: dict[str, int] | None = None) -> Path:
    """Each metric against step, one line per run (``runs``: name → fidelity rows); the chosen
    step of each run is marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2), constrained_layout=True)
    for (key, title), ax in zip(CURVES, axes):
        for name, rows in runs.items():
            steps = [r["step"] for r in rows]
            line, = ax.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=name)
            if chosen and name in chosen:
                best = next(r for r in rows if r["step"] == chosen[name])
                ax.plot([best["step"]], [best[key]], marker="*", ms=14, color=line.get_color(), mec="black")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pareto_plot(runs: dict[str, list[dict]], path: Path, chosen: dict[str, int] | None = None) -> Path:
    """Subject against prompt fidelity over every evaluation of every run, one colour per run,
    each run's chosen point starred, the base (step 0) as a black cross."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    base_drawn = False
    for name, rows in runs.items():
        points = [r for r in rows if r["step"] > 0]
        sc = ax.scatter([r["prompt"] for r in points], [r["subject"] for r in points], s=18, label=name, alpha=0.8)
        if chosen and name in chosen:
            best = next(r for r in rows if r["step"] == chosen[name])
            ax.scatter([best["prompt"]], [best["subject"]], marker="*", s=260, color=sc.get_facecolor()[0],
                       edgecolors="black", zorder=3)
        if rows and rows[0]["step"] == 0 and not base_drawn:
            ax.scatter([rows[0]["prompt"]], [rows[0]["subject"]], marker="x", s=80, color="black", label="base")
            base_drawn = True
    ax.set_xlabel("prompt fidelity")
    ax.set_ylabel("subject fidelity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _subject_axes():
    """A figure for subject against prompt fidelity (the method and scale Pareto plots)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    return plt, fig, ax


def _save_subject_plot(plt, fig, ax, subject: str, path: Path, xlabel: str = "prompt fidelity",
                       fixed_limits: bool = True, draw=None, points: list | None = None) -> Path:
    """``draw(axes)`` draws the content again into a zoomed inset when ``points`` ((x, y, x_sd, y_sd)
    of every method's point) sit in one small patch of the fixed [0, 1] axes: at the bench's figures every
    method fell in one 0.1-wide patch, its labels on top of each other."""
    ax.set(xlabel=xlabel, ylabel=f"subject fidelity: {subject}")
    if fixed_limits:  # shares in [0, 1]; similarities such as CLIP-T span a narrow band: let it fill the axes
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02))
        if draw is not None and points:
            _zoom(ax, draw, points)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


ZOOM_SPAN = 0.35  # an inset when every point (± its sd) fits in a square this wide


def _zoom(ax, draw, points: list) -> None:
    lo_x, hi_x = min(x - dx for x, _, dx, _ in points), max(x + dx for x, _, dx, _ in points)
    lo_y, hi_y = min(y - dy for _, y, _, dy in points), max(y + dy for _, y, _, dy in points)
    if max(hi_x - lo_x, hi_y - lo_y) > ZOOM_SPAN:
        return
    pad = 0.02 + 0.1 * max(hi_x - lo_x, hi_y - lo_y)
    # the inset goes to the side away from the points, so that it hides none of them
    left, bottom = (0.08 if (lo_x + hi_x) / 2 > 0.5 else 0.45), (0.08 if (lo_y + hi_y) / 2 > 0.5 else 0.47)
    inset = ax.inset_axes([left, bottom, 0.47, 0.45])
    draw(inset)
    inset.set(xlim=(lo_x - pad, hi_x + pad), ylim=(lo_y - pad, hi_y + pad))
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)
    ax.indicate_inset_zoom(inset, edgecolor="gray")


def method_pareto(cells: dict[str, dict], subject: str, path: Path, prompt_share: float = 0.9) -> Path:
    """Subject against prompt fidelity, one point per method ± one standard deviation over its
    training seeds (``cells``: name → mean and ``*_sd`` of both); "base" as a black cross with a
    dashed line at ``prompt_share`` × its prompt fidelity (issue 17's bar: right of it, the prompt kept)."""
    plt, fig, ax = _subject_axes()
    methods = {name: r for name, r in cells.items() if name != "base"}

    def draw(a):
        if "base" in cells:
            _base(a, cells["base"], prompt_share)
        for name, r in methods.items():
            a.errorbar([r["prompt"]], [r["subject"]], xerr=[r.get("prompt_sd", 0)], yerr=[r.get("subject_sd", 0)],
                       fmt="o", ms=7, capsize=3, label=name)

    draw(ax)
    points = [(r["prompt"], r["subject"], r.get("prompt_sd", 0), r.get("subject_sd", 0)) for r in methods.values()]
    return _save_subject_plot(plt, fig, ax, subject, path, draw=draw, points=points)


def _base(ax, base: dict, prompt_share: float) -> None:
    """The base as a black cross, and the prompt bar: a dashed line at ``prompt_share`` × its prompt fidelity."""
    ax.scatter([base["prompt"]], [base["subject"]], marker="x", s=80, color="black", label="base", zorder=3)
    ax.axvline(prompt_share * base["prompt"], color="gray", ls="--", lw=1, label=f"{prompt_share:g}× base prompt")


def scale_pareto(lines: dict[str, list[tuple[float, dict]]], base: dict, subject: str, path: Path,
                 prompt_share: float = 0.9, xlabel: str = "prompt fidelity", fixed_limits: bool = True,
                 point_label: str = "×{:g}") -> Path:
    """Subject against prompt fidelity along adapter scales: per method (``lines``: name → [(scale,
    cell)]) a line through its scales, each point ± one sd and labelled with its scale
    (``point_label``: any other knob's values, e.g. "bg {:g}"); the base as a black cross and a
    dashed line at ``prompt_share`` × its prompt fidelity (issue 17's bar)."""
    plt, fig, ax = _subject_axes()

    def draw(a):
        _base(a, base, prompt_share)
        for name, points in lines.items():
            x, y = [c["prompt"] for _, c in points], [c["subject"] for _, c in points]
            bar = a.errorbar(x, y, xerr=[c.get("prompt_sd", 0) for _, c in points],
                             yerr=[c.get("subject_sd", 0) for _, c in points], fmt="o-", ms=5, capsize=3, label=name)
            for (scale, _), xi, yi in zip(points, x, y):
                a.annotate(point_label.format(scale), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                           color=bar[0].get_color())

    draw(ax)
    points = [(c["prompt"], c["subject"], c.get("prompt_sd", 0), c.get("subject_sd", 0))
              for pts in lines.values() for _, c in pts]
    return _save_subject_plot(plt, fig, ax, subject, path, xlabel, fixed_limits, draw, points)
