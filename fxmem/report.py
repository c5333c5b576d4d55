"""``fxmem.explain`` and ``fxmem.optimize``: run the pipeline on a model and keep what it saw.

Inference (``model.eval()``, or ``mode="inference"``): the model is traced to a frozen ATen
graph (:mod:`fxmem.capture`), the ``inference`` passes run over it, and ``report.module`` is the
transformed graph with the model's call signature — a plain module that can be called, saved,
exported and compiled.

Training (``model.training`` with parameters that require grad, or ``mode="training"``): the
model is compiled with the fxmem backend and run forward and backward once on the example
inputs (gradients already on the parameters are restored afterwards); the report holds the
joint, forward and backward graphs and the partition. ``report.module`` is then the compiled
model (``torch.compile(model, backend=fxmem.backend(**options))``).
"""

from __future__ import annotations

import html
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxmem import peakview
from fxmem.analysis.sizes import module_parameter_bytes
from fxmem.analysis.timeline import StepTimeline
from fxmem.backend import DECOMPOSITIONS, FxmemBackend
from fxmem.capture import OptimizedModule, capture_inference
from fxmem.config import FxmemConfig, OptionError, parse_options
from fxmem.freeze import WeightWatch
from fxmem.measure import PeakMemory, peak_memory, training_loss
from fxmem.pipeline import PassRecord, Recorder, run_pipeline

MODES = ("inference", "training")


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f}"


@dataclass
class Report:
    """What one run of the pipeline saw. ``print(report)`` shows the table."""

    mode: str
    config: FxmemConfig
    records: list[PassRecord]
    graphs: dict[str, str]
    module: torch.nn.Module
    partitions: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[Any] = field(default_factory=list)
    eager_param_bytes: int = 0
    total_time_s: float = 0.0
    final_graphs: dict[str, fx.Graph] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what fxmem did to the model's call or outputs
    timelines: list[StepTimeline] = field(default_factory=list)
    measured_peak: PeakMemory | None = None   # training: one step measured from outside, after compiling

    @property
    def timeline(self) -> StepTimeline | None:
        """The live bytes over the (first) training step's forward and backward; None for inference."""
        return self.timelines[0] if self.timelines else None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per pass run (the table's rows)."""
        return [
            {"pass": r.name, "graph": r.graph, "status": r.status, "time_ms": r.time_s * 1e3,
             "nodes": f"{r.nodes_before}→{r.nodes_after}", "param_bytes": r.param_bytes,
             "saved_bytes": r.saved_bytes, "peak_bytes": r.peak_bytes, "stats": r.stats, "message": r.message}
            for r in self.records
        ]

    def __str__(self) -> str:
        head = f"fxmem report ({self.mode}; eager parameters {_mib(self.eager_param_bytes)} MiB; {self.total_time_s:.2f} s)"
        cols = ("pass", "graph", "status", "time ms", "nodes", "params MiB", "saved MiB", "peak MiB")
        body = [
            (r.name, r.graph, r.status, f"{r.time_s * 1e3:.1f}", f"{r.nodes_before}→{r.nodes_after}",
             _mib(r.param_bytes), _mib(r.saved_bytes), _mib(r.peak_bytes))
            for r in self.records
        ]
        widths = [max(len(c), *(len(row[i]) for row in body)) if body else len(c) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [head, fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        notes = [f"  {n}" for n in self.notes]
        notes += [f"  {r.name} [{r.graph}]: {r.message}" for r in self.records if r.message]
        stats = [f"  {r.name} [{r.graph}]: {_short(r.stats)}" for r in self.records if r.stats]
        if stats:
            lines += ["", "pass statistics:"] + stats
        if notes:
            lines += ["", "notes:"] + notes
        lines += _layer_lines(self.records)
        for p in self.partitions:
            lines += ["", f"partition: {_short(p)}"]
        if self.measured_peak is not None:
            lines += ["", _measured_line(self.measured_peak, self.timeline)]
        for t in self.timelines:
            lines += ["", peakview.text(t)]
        for k in self.kernels:
            lines += ["", f"kernel: {getattr(k, 'name', k)}"]
        return "\n".join(lines)

    __repr__ = __str__

    def to_html(self, path: str) -> str:
        """Write the tables and each graph (drawn with graphviz when installed) to ``path``."""
        parts = ["<html><head><meta charset='utf-8'><title>fxmem report</title>",
                 "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:left} "
                 "pre{background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
                 f"<h1>fxmem report — {html.escape(self.mode)}</h1><table border=1 cellspacing=0>",
                 "<tr>" + "".join(f"<th>{c}</th>" for c in ("pass", "graph", "status", "time ms", "nodes",
                                                            "params MiB", "saved MiB", "peak MiB", "statistics")) + "</tr>"]
        for r in self.records:
            cells = (r.name, r.graph, r.status, f"{r.time_s * 1e3:.1f}", f"{r.nodes_before}→{r.nodes_after}",
                     _mib(r.param_bytes), _mib(r.saved_bytes), _mib(r.peak_bytes), _short(r.stats) + (" " + r.message if r.message else ""))
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
        for note in self.notes:
            parts.append(f"<p>{html.escape(note)}</p>")
        for p in self.partitions:
            parts.append(f"<h2>partition</h2><pre>{html.escape(_short(p))}</pre>")
        if self.measured_peak is not None:
            parts.append(f"<p><b>{html.escape(_measured_line(self.measured_peak, self.timeline))}</b></p>")
        for t in self.timelines:
            parts.append(peakview.html_section(t))
        for k in self.kernels:
            parts.append(f"<h2>kernel {html.escape(str(getattr(k, 'name', k)))}</h2><pre>{html.escape(str(getattr(k, 'source', '')))}</pre>")
        for name, graph in self.final_graphs.items():
            parts.append(f"<h2>final graph: {html.escape(name)}</h2>{_draw(graph)}")
        for name, code in self.graphs.items():
            if "/" in name:
                parts.append(f"<h2>graph after {html.escape(name)}</h2><pre>{html.escape(code)}</pre>")
        parts.append("</body></html>")
        text = "\n".join(parts)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


def _layer_lines(records: list[PassRecord]) -> list[str]:
    """One line per layer a weight pass rewrote (int8, quantize, lowrank): what it became, its
    bytes before → after, and its weight SQNR and (where calibration data exist) output SQNR."""
    lines = []
    for r in records:
        rows = [row for row in r.stats.get("layers", []) if isinstance(row, dict) and "bytes_before" in row]
        if not rows:
            continue
        lines += ["", f"layers ({r.name} [{r.graph}]):"]
        for row in rows:
            if "rank" in row:
                what = f"rank {row['rank']} ({row.get('method', '')})"
            else:
                what = f"{row.get('scheme', 'int')}{row.get('bits', 8)} {row.get('granularity', '')}"
                if row.get("calibration"):
                    what += f" {row['calibration']}"
            quality = [f"{k.removesuffix('_db').replace('_', ' ')} {row[k]} dB" for k in ("sqnr_db", "output_sqnr_db")
                       if row.get(k) is not None]
            lines.append(f"  {row['layer']}: {what}; {row['bytes_before']:,} → {row['bytes_after']:,} B; " + ", ".join(quality))
    return lines


def _short(d: dict) -> str:
    items = []
    for k, v in d.items():
        if isinstance(v, (list, tuple)) and len(v) > 4:
            v = f"[{len(v)} items]"
        items.append(f"{k}={v}")
    return ", ".join(items)


def graph_to_dot(graph: fx.Graph) -> str:
    """DOT source of an FX graph: one box per node (op and shape), one edge per use."""
    lines = ["digraph G {", "  node [shape=box, fontsize=10, fontname=monospace];"]
    for node in graph.nodes:
        val = node.meta.get("val")
        shape = f"\\n{tuple(val.shape)} {str(val.dtype).removeprefix('torch.')}" if isinstance(val, torch.Tensor) else ""
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        label = f"{node.name}\\n{node.op}: {target}{shape}".replace('"', "'")
        lines.append(f'  "{node.name}" [label="{label}"];')
        for user in node.users:
            lines.append(f'  "{node.name}" -> "{user.name}";')
    lines.append("}")
    return "\n".join(lines)


def _draw(graph: fx.Graph) -> str:
    """An inline SVG drawn by graphviz's ``dot`` when it is installed; empty otherwise (the
    graph's code is always shown beside it)."""
    dot = shutil.which("dot")
    if dot is None:
        return "<p><i>graphviz (dot) is not installed: graph shown as code only</i></p>"
    try:
        svg = subprocess.run([dot, "-Tsvg"], input=graph_to_dot(graph), capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError) as err:
        return f"<p><i>graphviz failed: {html.escape(str(err))}</i></p>"
    return svg[svg.find("<svg"):]


def _graphs_from(recorder: Recorder) -> dict[str, str]:
    """``graphs[pass]``: code after that pass (its first graph); ``graphs["graph/pass"]``: per
    graph; ``graphs[graph]``: each graph's final code (``"inference"``, ``"forward"``, ...)."""
    graphs: dict[str, str] = dict(recorder.graphs)
    for r in recorder.records:
        graphs[f"{r.graph}/{r.name}"] = r.code
        graphs.setdefault(r.name, r.code)
    return graphs


def _default_mode(model: torch.nn.Module) -> str:
    trains = model.training and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    return "training" if trains else "inference"


def explain(model: torch.nn.Module, *args: Any, kwargs: dict | None = None, mode: str | None = None, **options: Any) -> Report:
    """Run fxmem's pipeline on ``model(*args, **kwargs)`` and return a :class:`Report`."""
    config = parse_options(options)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxmem.explain: model must be a torch.nn.Module; got {type(model).__name__}")
    mode = mode or _default_mode(model)
    if mode not in MODES:
        raise OptionError(f"fxmem.explain: mode={mode!r}; accepted: {MODES}")
    if mode == "training" and config.lossy_options():
        raise OptionError(
            f"fxmem options {config.lossy_options()} change weights and run on inference graphs only, "
            "but the model is in training mode. Call model.eval() first, or pass mode='inference'."
        )
    recorder = Recorder()
    notes: list[str] = []
    start = time.perf_counter()
    if mode == "inference":
        captured = capture_inference(model, args, kwargs, DECOMPOSITIONS)
        if captured.dropped_caches:
            notes.append(_cache_note(captured.dropped_caches))
            warnings.warn(f"fxmem: {notes[-1]}", UserWarning, stacklevel=2)
        gm = run_pipeline(captured.gm, "inference", config, recorder, example_inputs=captured.example_tensors)
        module: torch.nn.Module = OptimizedModule(gm, captured, WeightWatch.after(captured.originals, gm))
    else:
        module, measured = _explain_training(model, args, kwargs or {}, config, recorder)
    return Report(mode=mode, config=config, records=recorder.records, graphs=_graphs_from(recorder), module=module,
                  partitions=recorder.partitions, kernels=recorder.kernels,
                  eager_param_bytes=module_parameter_bytes(model), total_time_s=time.perf_counter() - start,
                  final_graphs=recorder.final_graphs, notes=notes, timelines=recorder.timelines,
                  measured_peak=measured if mode == "training" else None)


def _cache_note(paths: list[str]) -> str:
    return (f"the model returned a KV cache ({', '.join(paths)}); the optimized module returns None there. It is "
            "specialized to the example inputs' shapes and takes no cache, so it cannot continue generation from one, "
            "and keeping every layer's keys and values would only hold memory. The other outputs (logits) are "
            "unchanged. Pass use_cache=False to not compute the cache at all.")


def _explain_training(model, args, kwargs, config, recorder) -> tuple[torch.nn.Module, PeakMemory]:
    """Compile and run one step (forward + backward of :func:`fxmem.measure.training_loss`), then measure a
    second step's peak from outside (:func:`fxmem.measure.peak_memory`), gradients set to None
    first as a training loop's ``zero_grad`` does. The parameters' existing ``.grad`` are restored
    afterwards. The output is held through the backward, as ``out = model(...);
    out.loss.backward()`` holds it (and as the estimate assumes)."""
    compiled = torch.compile(model, backend=FxmemBackend(config, recorder))
    params = list(model.parameters())
    grads = {p: p.grad for p in params}

    def step() -> None:
        for p in params:
            p.grad = None
        out = compiled(*args, **kwargs)
        loss = training_loss(out)
        if loss is not None:
            loss.backward()

    device = params[0].device if params else torch.device("cpu")
    try:
        step()  # compiles
        measured, _ = peak_memory(step, device="cuda" if device.type == "cuda" else "cpu")
    finally:
        for p, g in grads.items():
            p.grad = g
    return compiled, measured


def _measured_line(measured: PeakMemory, timeline: StepTimeline | None) -> str:
    line = f"measured peak of a training step: {measured.mib:.2f} MiB ({measured.method}, {measured.device})"
    if timeline is not None:
        line += f"; fxmem's estimate {timeline.peak_bytes / 2**20:.2f} MiB"
    return line


def optimize(model: torch.nn.Module, *args: Any, kwargs: dict | None = None, mode: str = "inference", **options: Any) -> torch.nn.Module:
    """``explain(...).module``: the transformed, runnable module (inference by default)."""
    return explain(model, *args, kwargs=kwargs, mode=mode, **options).module
