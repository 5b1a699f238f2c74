"""The metric against trainable parameters (or time), one colour per method family: drawn the same
way in a task's figure (``compare``) and in the suite's panels (``suite``)."""

from __future__ import annotations

COLOURS = {"ntk": "tab:red", "lora": "tab:blue", "prefix": "tab:green", "full": "black", "head": "tab:gray",
           "base": "tab:gray"}


def draw_methods(axes, points: list[tuple[str, str, float, float, float]], *, log_x: bool, fontsize: int = 7) -> None:
    """``points``: ``(label, method, x, y, error)``. Points at ``x = 0`` (no trainable parameters:
    head only, untuned) become dashed horizontal lines; the others are error bars joined per method."""
    families: dict[str, list] = {}
    for label, method, x, y, error in points:
        colour = COLOURS.get(method, "tab:purple")
        if log_x and x == 0:
            axes.axhline(y, color=colour, linestyle="--", linewidth=1, label=label)
            continue
        axes.errorbar(x, y, yerr=error, fmt="o", ms=4, capsize=2, color=colour)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=fontsize - 1)
        families.setdefault(method, []).append((x, y))
    for method, xy in families.items():
        axes.plot(*zip(*sorted(xy)), color=COLOURS.get(method, "tab:purple"), alpha=0.4, label=method)
    if log_x:
        axes.set_xscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=fontsize - 1)
