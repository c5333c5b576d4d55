"""Where the peak is: the live bytes of a training step drawn for the terminal and for HTML.

Renders :class:`fxmem.analysis.timeline.StepTimeline` — the live activation bytes after every
node of the forward and then the backward graph, the peak marked, and the tensors alive at the
peak with the op and the user's source line that made them, saved-for-backward or transient.
"""

from __future__ import annotations

import html

from fxmem.analysis.timeline import LiveTensor, StepTimeline


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _row(t: LiveTensor) -> tuple[str, ...]:
    return (t.name, t.kind, t.stage, "×".join(map(str, t.shape)) or "()", t.dtype, _mib(t.bytes), t.op, t.source)


HEADER = ("tensor", "kind", "made in", "shape", "dtype", "MiB", "op", "source")


def text(timeline: StepTimeline, *, top: int = 8, width: int = 60) -> str:
    """The sparkline, the peak, and the ``top`` largest tensors alive at it."""
    lines = ["live bytes over the step (forward | backward):", timeline.sparkline(width)]
    alive = timeline.live_at_peak
    if alive:
        kinds: dict[str, int] = {}
        for t in alive:
            kinds[t.kind] = kinds.get(t.kind, 0) + t.bytes
        lines.append("alive at the peak: " + ", ".join(f"{k} {_mib(v)} MiB" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
        for t in alive[:top]:
            name, kind, stage, shape, dtype, mib, op, source = _row(t)
            lines.append(f"  {name:<16} {kind:<9} {shape:<16} {mib:>8} MiB  {op}  {source}")
        if len(alive) > top:
            lines.append(f"  ... {len(alive) - top} more ({_mib(sum(t.bytes for t in alive[top:]))} MiB)")
    dropped = dropped_outputs_line(timeline)
    if dropped:
        lines.append(dropped)
    return "\n".join(lines)


def dropped_outputs_line(timeline: StepTimeline) -> str:
    """One line on the same step when the caller keeps only the loss (``loss = model(**batch).loss``,
    as HF's ``Trainer`` does), where that lowers the peak; else ``""``."""
    other = timeline.outputs_dropped
    if other is None or other.peak_bytes >= timeline.peak_bytes:
        return ""
    return (f"if the caller keeps only the loss (drops the other outputs before the backward, as HF's "
            f"Trainer does): peak {_mib(other.peak_bytes)} MiB at {other.peak_stage} {other.peak_node}")


def svg(timeline: StepTimeline, *, width: int = 900, height: int = 220) -> str:
    """An inline SVG plot: live MiB over the nodes of the step, forward and backward shaded apart,
    the peak marked with a dot and its value."""
    pts = timeline.points
    if not pts:
        return ""
    pad_l, pad_b, pad_t = 60, 30, 20
    w, h = width - pad_l - 10, height - pad_b - pad_t
    top = max(p[2] for p in pts) or 1
    n = max(len(pts) - 1, 1)

    def xy(i: int, v: int) -> tuple[float, float]:
        return pad_l + w * i / n, pad_t + h * (1 - v / top)

    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, p[2]) for i, p in enumerate(pts)))
    split_x = xy(timeline.forward_end, 0)[0]
    px, py = xy(timeline.peak_index, timeline.peak_bytes)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect x="{split_x:.1f}" y="{pad_t}" width="{pad_l + w - split_x:.1f}" height="{h}" fill="#f2f2fa"/>',
             f'<text x="{pad_l + 4}" y="{pad_t + 12}">forward</text>',
             f'<text x="{split_x + 4:.1f}" y="{pad_t + 12}">backward</text>',
             f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#888"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#888"/>',
             f'<text x="4" y="{pad_t + 4}">{_mib(top)} MiB</text><text x="4" y="{pad_t + h}">0</text>',
             f'<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{path}"/>',
             f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="#d33"/>',
             f'<text x="{min(px + 6, width - 200):.1f}" y="{max(py - 6, 12):.1f}" fill="#d33">peak {_mib(timeline.peak_bytes)} MiB at '
             f'{html.escape(timeline.peak_stage)} {html.escape(timeline.peak_node)}</text>',
             f'<text x="{pad_l}" y="{height - 8}">nodes of the forward and backward graphs, in run order</text>',
             "</svg>"]
    return "".join(parts)


def html_section(timeline: StepTimeline, *, top: int = 30) -> str:
    """The plot and the table of tensors alive at the peak."""
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row(t)) + "</tr>" for t in timeline.live_at_peak[:top])
    more = len(timeline.live_at_peak) - top
    dropped = dropped_outputs_line(timeline)
    return (f"<h2>live bytes over the step</h2>{svg(timeline)}"
            f"<h3>alive at the peak ({_mib(timeline.peak_bytes)} MiB, {html.escape(timeline.peak_stage)} "
            f"{html.escape(timeline.peak_node)})</h3><table border=1 cellspacing=0><tr>"
            + "".join(f"<th>{c}</th>" for c in HEADER) + "</tr>" + rows + "</table>"
            + (f"<p>… {more} more</p>" if more > 0 else "")
            + (f"<p>{html.escape(dropped)}</p>" if dropped else ""))
