"""The benchmark figures as the charts the documentation shows, drawn from recorded results.

    python benchmarks/charts.py                 # every chart, into docs/assets/charts/
    python benchmarks/charts.py --out DIR       # elsewhere
    python benchmarks/charts.py --results DIR   # from another results folder (a newer run's)

Nothing is measured here: each chart reads one JSON file that a benchmark wrote into
`benchmarks/results/` (the command that makes it is in the chart's entry below and on the
site's Benchmarks page), so the charts show exactly the recorded figures, and re-running the
benchmarks then this script updates both. Each chart is a small `Chart`: the results file it
reads, a function that takes the figures out of that file's JSON, and a function that draws
them, so a benchmark whose output format changes needs only its `figures` function changed.

Needs matplotlib (the `docs` dependency group: `uv run --group docs python benchmarks/charts.py`).
SVGs are written with fixed ids and no date, so an unchanged result gives an unchanged file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "docs" / "assets" / "charts"

# One colour per series, the same wherever a series appears again.
BLUE, ORANGE, GREEN, GREY, PURPLE = "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#9467bd"


@dataclass(frozen=True)
class Chart:
    name: str  # the file written: <name>.svg
    results: str  # the results file it reads, in the results folder
    command: str  # what records that file
    figures: Callable[[Any], Any]  # the results file's JSON -> what `draw` takes
    draw: Callable[[Any, Any], None]  # (figures, matplotlib Figure) -> None


# Side by side with the Node reference: compare.json's table.


def versus_node(data: dict[str, Any]) -> list[tuple[str, float]]:
    """(figure, how many times better ours is than the Node reference), for the rows that are
    a speed or a time; the rows that count commands are equal and stay in the table."""
    rows = []
    for row in data["table"]:
        ratio = row.get("python/node")
        if ratio is None or row["figure"].startswith(("Redis commands", "same,", "PUBLISH")):
            continue
        try:
            value = float(ratio)
        except ValueError:
            continue  # a row whose ratio is text ("exact")
        better = value if row["better"] == "higher" else 1 / value
        rows.append((row["figure"], better))
    return rows


def draw_versus_node(rows: list[tuple[str, float]], fig: Any) -> None:
    ax = fig.subplots()
    labels = [label for label, _ in rows][::-1]
    values = [value for _, value in rows][::-1]
    colours = [GREEN if v >= 1 else ORANGE for v in values]
    ax.barh(labels, values, color=colours)
    ax.set_xscale("log")
    ax.axvline(1, color=GREY, linewidth=1)
    for y, v in enumerate(values):
        ax.annotate(f"{v:.2f}x", (v, y), xytext=(3, 0), textcoords="offset points", va="center")
    ax.set_xlabel("times better than the Node reference (log scale; right of 1: ours is better)")
    fig.suptitle("resumable_stream against npm resumable-stream 2.2.13 (same Redis, same run)")


# Capacity over HTTP: capacity.json's rows.


def capacity(data: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{server: {variant: [(streams, p99 ms), ...]}}, the median p99 of each point's runs."""
    by_server: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in data["rows"]:
        series = by_server.setdefault(row["server"], {}).setdefault(row["variant"], [])
        series.append((int(row["streams"]), float(row["p99_ms"])))
    for variants in by_server.values():
        for points in variants.values():
            points.sort()
    return by_server


def draw_capacity(by_server: dict[str, dict[str, list[tuple[int, float]]]], fig: Any) -> None:
    servers = sorted(by_server, key=lambda s: s != "uvloop")  # uvloop first
    axes = fig.subplots(1, len(servers), sharey=True, squeeze=False)[0]
    colours = {
        "plain": GREY,
        "memory": BLUE,
        "redis": ORANGE,
        "memory+follower": GREEN,
        "redis+follower": PURPLE,
    }
    for ax, server in zip(axes, servers, strict=True):
        for variant, points in by_server[server].items():
            xs = [n for n, _ in points]
            ys = [p99 for _, p99 in points]
            ax.plot(xs, ys, marker="o", label=variant, color=colours.get(variant))
        ax.axhline(100, color=GREY, linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams (40 tokens/s each), one process")
        ax.set_title(
            {"uvloop": "uvloop + httptools", "asyncio": "asyncio + h11"}.get(server, server)
        )
    axes[0].set_ylabel("p99 delay per token, ms (log; dashed: 100 ms)")
    axes[-1].legend(loc="upper left", fontsize="small")
    fig.suptitle("One uvicorn process: a token's p99 delay as streams are added")


# Writers: writer.json's results.


def writers(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{backend: {"generator" | "async writer" | "sync writer": chunks/s (median of rounds)}}."""
    return {r["backend"]: dict(r["chunks_per_s"]) for r in data["results"]}


def draw_writers(by_backend: dict[str, dict[str, float]], fig: Any) -> None:
    ax = fig.subplots()
    backends = list(by_backend)
    kinds = list(next(iter(by_backend.values())))
    width = 0.8 / len(kinds)
    for i, (kind, colour) in enumerate(zip(kinds, (BLUE, ORANGE, GREEN), strict=False)):
        xs = [b + (i - (len(kinds) - 1) / 2) * width for b in range(len(backends))]
        values = [by_backend[backend][kind] / 1e6 for backend in backends]
        ax.bar(xs, values, width, label=kind, color=colour)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:.2f}M", (x, v), xytext=(0, 2), textcoords="offset points", ha="center")
    ax.set_xticks(range(len(backends)), [f"{b} backend" for b in backends])
    ax.set_ylabel("million chunks/s, to the producer's own reader")
    ax.set_title("A generator, the async writer and the sync writer (12-character chunks)")
    ax.legend(loc="lower right")


# Durable streams: durable.json's table.


def durable(data: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(figure, memory-only, durable) for each row of the table."""
    return [(r["figure"], float(r["memory-only"]), float(r["durable"])) for r in data["table"]]


def draw_durable(rows: list[tuple[str, float, float]], fig: Any) -> None:
    rates = [r for r in rows if "chunks/s" in r[0]]
    times = [r for r in rows if "chunks/s" not in r[0]]
    axes = fig.subplots(1, 2)
    for ax, group, scale, unit in (
        (axes[0], rates, 1e6, "million chunks/s (higher is better)"),
        (axes[1], times, 1.0, "ms (lower is better)"),
    ):
        labels = [
            _wrap(figure.replace(": chunks/s", "").replace(", ms", "")) for figure, *_ in group
        ]
        ys = range(len(group))
        ax.barh(
            [y + 0.2 for y in ys],
            [r[1] / scale for r in group],
            0.4,
            label="memory-only",
            color=BLUE,
        )
        ax.barh(
            [y - 0.2 for y in ys], [r[2] / scale for r in group], 0.4, label="durable", color=ORANGE
        )
        ax.set_yticks(list(ys), labels, fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel(unit)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.suptitle("Durable streams against memory-only ones (10,000 chunks of 64 characters)")


def _wrap(text: str, width: int = 34) -> str:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


CHARTS = [
    Chart(
        "versus-node",
        "compare.json",
        "python benchmarks/bench_compare.py",
        versus_node,
        draw_versus_node,
    ),
    Chart(
        "capacity",
        "capacity.json",
        "python benchmarks/bench_capacity.py --streams 250,500,750,1000 --duration 10 "
        "--followers --repeat 2",
        capacity,
        draw_capacity,
    ),
    Chart(
        "writers",
        "writer.json",
        "python benchmarks/bench_writer.py --rounds 9 --resumes 100 --redis URL",
        writers,
        draw_writers,
    ),
    Chart(
        "durable",
        "durable.json",
        "python benchmarks/bench_durable.py --runs 9",
        durable,
        draw_durable,
    ),
]


def render(chart: Chart, results: Path, out: Path) -> Path:
    """Draw `chart` from its file in `results` into `out`; the SVG's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.hashsalt": "resumable_stream",  # fixed element ids
            "svg.fonttype": "none",  # text stays text (smaller, searchable, the page's font)
            "font.size": 9,
        }
    )
    data = json.loads((results / chart.results).read_text())
    figures = chart.figures(data)
    fig = plt.figure(figsize=(10, 5), layout="constrained")
    try:
        chart.draw(figures, fig)
        path = out / f"{chart.name}.svg"
        fig.savefig(path, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    parser.add_argument("--out", type=Path, default=OUT, help="where the SVGs go")
    parser.add_argument("--only", nargs="*", help="chart names (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for chart in CHARTS:
        if args.only and chart.name not in args.only:
            continue
        path = render(chart, args.results, args.out)
        print(f"{path} (from {chart.results}: {chart.command})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
