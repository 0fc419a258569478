"""Markdown table and JSON of the medians, with ratios to the plain directory and to
fuse-overlayfs. A ratio is a cost ratio: above 1.0 means slower (more time, fewer MB/s,
more memory) than the reference."""

from __future__ import annotations

from typing import Any

from .runner import Cell
from .workloads import Workload

REFS = ("plain", "fuse-overlayfs")
RATIO_TARGETS = ("kernel", "fuse-overlayfs", "fusesnap-overlay", "fusesnap", "fusesnap-writeback")


def ratio(w: Workload, value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or value <= 0 or ref <= 0:
        return None
    return ref / value if w.higher_is_better else value / ref


def fmt_value(w: Workload, v: float | None) -> str:
    if v is None:
        return ""
    if w.unit == "s":
        ms = v * 1000
        return f"{ms:.3g} ms" if ms < 1000 else f"{ms:,.0f} ms"
    if w.unit == "MB/s":
        return f"{v:,.0f} MB/s"
    return f"{v:.1f} MB"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def table(workloads: list[Workload], titles: dict[str, str], results: dict[str, dict[str, Cell]],
          targets: list[str]) -> str:
    """The markdown table plus numbered footnotes giving each n/a's reason."""
    notes: list[str] = []

    def note(reason: str) -> str:
        if reason not in notes:
            notes.append(reason)
        return f"n/a[{notes.index(reason) + 1}]"

    ratio_cols: list[tuple[str, str]] = []
    for t in targets:
        if t in RATIO_TARGETS and "plain" in targets and t != "plain":
            ratio_cols.append((t, "plain"))
    for t in targets:
        if t.startswith("fusesnap") and "fuse-overlayfs" in targets:
            ratio_cols.append((t, "fuse-overlayfs"))
    head = ["workload"] + targets + [f"{t} / {r}" for t, r in ratio_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for w in workloads:
        row = [titles.get(w.name, w.title) + (" ↑" if w.higher_is_better else "")]
        cells = results[w.name]
        for t in targets:
            c = cells[t]
            row.append(note(c.error) if c.error else fmt_value(w, c.median) or "—")
        for t, r in ratio_cols:
            row.append(fmt_ratio(ratio(w, cells[t].median, cells[r].median)))
        lines.append("| " + " | ".join(row) + " |")
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\n" + "\n".join(f"[{i + 1}] {n}" for i, n in enumerate(notes)) + "\n"
    return out


def as_json(workloads: list[Workload], titles: dict[str, str], results: dict[str, dict[str, Cell]],
            targets: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for w in workloads:
        cells = results[w.name]
        rows.append({
            "name": w.name,
            "title": titles.get(w.name, w.title),
            "unit": w.unit,
            "higher_is_better": w.higher_is_better,
            "cold": w.cold,
            "targets": {t: {"runs": cells[t].runs, "median": cells[t].median, "error": cells[t].error}
                        for t in targets},
            "ratios": {f"{t}/{r}": ratio(w, cells[t].median, cells[r].median)
                       for t in targets for r in REFS if r in targets and t != r},
        })
    return {"meta": meta, "workloads": rows}
