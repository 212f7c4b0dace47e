"""Plots of a results file (:mod:`gspn.bench.core` schema): PNG files beside the JSON."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402

from .core import describe  # noqa: E402


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str, log: bool) -> None:
    width = 0.8 / max(1, len(series))
    for index, (label, values) in enumerate(series.items()):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [float("nan") if v is None else v for v in values]
        ax.bar(xs, heights, width, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _series(rows, group_key, value_key):
    groups = list(dict.fromkeys(group_key(r) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    table = {(group_key(r), r["backend"]): r.get(value_key, r["extra"].get(value_key)) for r in rows}
    return groups, {b: [table.get((g, b)) for g in groups] for b in backends}


def _save(fig, machine: dict, path: Path) -> Path:
    """Title the figure with the machine, write it to ``path`` and free it."""
    fig.suptitle(describe(machine), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scans(rows: list[dict], machine: dict, path: Path) -> Path | None:
    """Time over the memory floor per shape and direction, forward and backward, per backend."""
    rows = [r for r in rows if r["table"] == "scan"]
    if not rows:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(12, 8))
    for ax, pass_ in zip(axes, ("forward", "backward")):
        selected = [r for r in rows if r["pass"] == pass_]
        groups, series = _series(selected, lambda r: f"{r['case']} {r['direction']}", "x_floor")
        _grouped_bars(ax, groups, series, "time / memory floor (log)", log=True)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"scan {pass_}: time over the memory floor (1 = at the floor)", fontsize=9)
    return _save(fig, machine, path)


def plot_fused(rows: list[dict], machine: dict, path: Path) -> Path | None:
    """Fused scan against the unfused ops it replaces: time over the fused floor, per backend."""
    rows = [r for r in rows if r["table"] == "fused"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(12, 4.5))
    groups, series = _series(rows, lambda r: f"{r['case']} {r['direction']}", "x_floor")
    _grouped_bars(ax, groups, series, "time / memory floor (log)", log=True)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title("one direction of the layer: fused scan vs normalize + scan + gate/skip (1 = at the floor)", fontsize=9)
    return _save(fig, machine, path)


def plot_models(rows: list[dict], machine: dict, path: Path) -> Path | None:
    """Latency per case and backend, and the scan's share of it."""
    rows = [r for r in rows if r["table"] == "model"]
    if not rows:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(12, 8))
    groups, series = _series(rows, lambda r: r["case"], "ms")
    _grouped_bars(axes[0], groups, series, "ms (log)", log=True)
    axes[0].set_title("forward latency", fontsize=9)
    groups, series = _series(rows, lambda r: r["case"], "scan_share")
    _grouped_bars(axes[1], groups, series, "scan time / total", log=False)
    axes[1].set_title("share of the time spent in the scan", fontsize=9)
    return _save(fig, machine, path)


def plot_crossover(rows: list[dict], machine: dict, path: Path) -> Path | None:
    """Latency against the side of the map, GSPN layer (solid) and attention (dashed), per backend."""
    rows = [r for r in rows if r["table"] == "crossover"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for index, backend in enumerate(backends):
        color = f"C{index}"
        for model, style in (("GSPN", "-"), ("attention", "--")):
            points = sorted((int(r["case"].rsplit("x", 1)[1]), r["ms"]) for r in rows
                            if r["backend"] == backend and r["case"].startswith(model))  # fmt: skip
            if points:
                ax.plot(*zip(*points), style, marker="o", color=color, label=f"{model} ({backend})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("side of the map (tokens = side^2)")
    ax.set_ylabel("ms (log)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("GSPN layer vs attention over the same tokens", fontsize=9)
    return _save(fig, machine, path)


def plot_results(payload: dict, json_path: Path) -> list[Path]:
    """Every plot of ``payload``, named after ``json_path`` (``bench.json`` -> ``bench_scan.png``...)."""
    stem = Path(json_path).with_suffix("")
    made = [
        plot_scans(payload["rows"], payload["machine"], Path(f"{stem}_scan.png")),
        plot_fused(payload["rows"], payload["machine"], Path(f"{stem}_fused.png")),
        plot_models(payload["rows"], payload["machine"], Path(f"{stem}_models.png")),
        plot_crossover(payload["rows"], payload["machine"], Path(f"{stem}_crossover.png")),
    ]
    return [p for p in made if p is not None]
