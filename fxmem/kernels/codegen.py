"""Generate Triton kernels for fused row regions, compile them once, register them as torch ops.

A fused region (found by :mod:`fxmem.passes.lower`) is described as a small expression program
over one *iteration space*: a full shape ``rows + (N,)``. Every value in it is either

* ``full``: one element per (row, column), held as a ``[BLOCK]`` vector of columns, or
* ``row``: one element per row (a row reduction's result, or a ``[..., 1]`` tensor), a scalar.

The program is built with :class:`Program` (``load`` / ``const`` / ``pw`` / ``reduce`` /
``output``) and turned into Triton source by :func:`generate_source` in one of three forms:

* ``pointwise`` (no reduction): a 2-D grid ``(rows, cdiv(N, BLOCK))``, one block per program;
* ``persistent`` (a row fits in one block, ``N <= persistent_max``, as Inductor's
  ``triton_per_*``): one program per row, every value stays in registers, each input is read once;
* ``looped`` (longer rows, as Inductor's ``triton_red_*``): one program per row, one loop over
  column blocks per reduction (the full-kind values it needs are recomputed from the inputs in
  that loop, nothing is written back) and one last loop that stores the full outputs.

Inputs are addressed through their strides after ``expand(full_shape)``: broadcast dimensions get
stride 0, so views, transposes and broadcast operands are read in place with no copy. Outputs are
fresh contiguous tensors. Arithmetic is done in fp32 (booleans stay ``int1``); stores cast to the
output's dtype.

The generated source uses only ``tl.*`` and ``tl.math`` (no libdevice), so the same source runs
natively on a GPU and under ``TRITON_INTERPRET=1`` on a CPU. Every identifier in it is made here
(``in0``, ``v3``, ...); the only text taken from the graph — the kernel's name and a comment
listing the nodes it replaces — goes through :func:`sanitize`.

Generated kernels run through one ``torch.library`` custom op, ``fxmem::fused_kernel(inputs,
kernel)``, defined here at import with a fake implementation, so a graph holding kernels stays
traceable by FakeTensor, Dynamo and ``torch.export``. :func:`bind_kernel` binds a kernel to its
static shapes and CPU path under a key (the hash of its source and shapes); the graph that calls
it holds the :class:`BoundKernel` (``node.meta["fxmem_kernel"]``), and the op finds it by key in a
weak table — so nothing outlives the graphs that use it, and a pass that fails registers nothing
that stays. Each kernel compiles its source once and keeps the function. Triton is imported only
when a kernel is compiled, never when this module is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import keyword
import math
import os
import re
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fxmem.kernels import interpreter

# Inductor's rule: a reduction whose row has at most this many elements runs persistent.
PERSISTENT_MAX = 1024
# Column block of the looped and pointwise forms.
LOOP_BLOCK = 1024

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}


def sanitize(text: str, *, max_len: int = 48) -> str:
    """A safe Python identifier made from arbitrary graph text (node names, op names).

    Keeps ``[A-Za-z0-9_]``, turns every other run of characters into one ``_``, never starts
    with a digit, never is a keyword, and is at most ``max_len`` characters long.
    """
    ident = re.sub(r"[^0-9A-Za-z_]+", "_", str(text)).strip("_")[:max_len] or "x"
    if ident[0].isdigit():
        ident = "n_" + ident
    if keyword.iskeyword(ident) or not ident.isidentifier():
        ident = "n_" + ident
    return ident


def sanitize_comment(text: str, *, max_len: int = 400) -> str:
    """Graph text made safe for a one-line comment: identifier characters and single spaces."""
    return " ".join(sanitize(word, max_len=max_len) for word in str(text).split())[:max_len]


def float_literal(value: float | int | bool) -> str:
    """Source text for a constant, including infinities and NaN (``float("inf")``)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


# --------------------------------------------------------------------------------------------
# The expression program
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Expr:
    """One value of a fused program. ``op``: load | const | pw | reduce."""

    op: str
    kind: str  # "full" | "row"
    args: tuple[Expr, ...] = ()
    template: str = ""  # pw: format string over the operands, e.g. "({0} + {1})"
    value: Any = None  # load: input index; const: the number; reduce: "sum" | "max"
    is_bool: bool = False


@dataclass
class Output:
    expr: Expr
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Program:
    """A fused region as expressions over ``num_inputs`` input tensors and one full shape."""

    full_shape: tuple[int, ...]
    num_inputs: int = 0
    input_bool: list[bool] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    has_reduction: bool = False

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(self.full_shape[:-1])

    @property
    def n(self) -> int:
        return int(self.full_shape[-1]) if self.full_shape else 1

    def add_input(self, is_bool: bool) -> int:
        self.input_bool.append(is_bool)
        self.num_inputs += 1
        return self.num_inputs - 1

    def load(self, index: int, kind: str) -> Expr:
        return Expr("load", kind, value=index, is_bool=self.input_bool[index])

    @staticmethod
    def const(value: float | int | bool) -> Expr:
        return Expr("const", "row", value=value, is_bool=isinstance(value, bool))

    @staticmethod
    def pw(template: str, *args: Expr, is_bool: bool = False) -> Expr:
        kind = "full" if any(a.kind == "full" for a in args) else "row"
        return Expr("pw", kind, tuple(args), template=template, is_bool=is_bool)

    def reduce(self, how: str, arg: Expr) -> Expr:
        if how not in ("sum", "max"):
            raise ValueError(f"unknown reduction {how!r}; accepted: 'sum', 'max'")
        self.has_reduction = True
        if arg.kind == "row":  # reducing a row-constant over N columns
            return self.pw("({0} * N)", arg) if how == "sum" else arg
        return Expr("reduce", "row", (arg,), value=how)

    def output(self, expr: Expr, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        kind = "full" if tuple(shape) == tuple(self.full_shape) else "row"
        if kind == "full" and expr.kind == "row":  # a row constant written to every column
            expr = self.pw("({0} + tl.zeros([BLOCK], dtype=tl.float32))", expr)
        self.outputs.append(Output(expr, kind, tuple(shape), dtype))

    def form(self, persistent_max: int = PERSISTENT_MAX) -> str:
        if not self.has_reduction:
            return "pointwise"
        return "persistent" if self.n <= persistent_max else "looped"


# --------------------------------------------------------------------------------------------
# Source generation
# --------------------------------------------------------------------------------------------


class _Scope:
    """Lines being written and the variables already computed in them."""

    def __init__(self, indent: str, parent: _Scope | None = None):
        self.indent = indent
        self.lines: list[str] = []
        self.memo: dict[int, str] = {}
        self.parent = parent

    def lookup(self, expr: Expr) -> str | None:
        scope: _Scope | None = self
        while scope is not None:
            if id(expr) in scope.memo:
                return scope.memo[id(expr)]
            scope = scope.parent
        return None


class _Writer:
    def __init__(self, program: Program, form: str):
        self.program = program
        self.form = form
        self.counter = 0

    def fresh(self, prefix: str = "v") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def load_text(self, expr: Expr) -> str:
        i = expr.value
        last = len(self.program.full_shape) - 1 if self.program.full_shape else 0
        if expr.kind == "row":
            text = f"tl.load(in{i} + roff{i})"
        else:
            text = f"tl.load(in{i} + roff{i} + cols * s{i}_{last}, mask=mask, other=0)"
        return text if expr.is_bool else text + ".to(tl.float32)"

    def emit(self, expr: Expr, scope: _Scope, row_scope: _Scope) -> str:
        """Emit ``expr`` (and what it needs) into ``scope``; row values go to ``row_scope``."""
        if expr.op == "const":
            return float_literal(expr.value)
        target = row_scope if expr.kind == "row" else scope
        found = target.lookup(expr)
        if found is not None:
            return found
        if expr.op == "load":
            text = self.load_text(expr)
        elif expr.op == "pw":
            # full operands live in this scope (a loop body); row operands in the row scope.
            operands = [self.emit(a, scope if a.kind == "full" else row_scope, row_scope) for a in expr.args]
            text = expr.template.format(*operands)
        elif expr.op == "reduce":
            text = self.reduction(expr, scope, row_scope)
        else:  # pragma: no cover - Program builds only the ops above
            raise ValueError(f"unknown expression op {expr.op!r}")
        name = self.fresh()
        target.lines.append(f"{target.indent}{name} = {text}")
        target.memo[id(expr)] = name
        return name

    def reduction(self, expr: Expr, scope: _Scope, row_scope: _Scope) -> str:
        (arg,) = expr.args
        identity = "0.0" if expr.value == "sum" else 'float("-inf")'
        combine = "tl.sum" if expr.value == "sum" else "tl.max"
        if self.form != "looped":
            value = self.emit(arg, scope, row_scope)
            return f"{combine}(tl.where(mask, {value}, {identity}), axis=0)"
        # looped: one pass over the row's column blocks accumulates a [BLOCK] vector.
        body = _Scope(row_scope.indent + "    ")
        value = self.emit(arg, body, row_scope)
        acc = self.fresh("acc")
        step = (f"{acc} = {acc} + tl.where(mask, {value}, 0.0)" if expr.value == "sum"
                else f"{acc} = tl.maximum({acc}, tl.where(mask, {value}, float(\"-inf\")))")
        ind = row_scope.indent
        row_scope.lines += [
            f"{ind}{acc} = tl.full([BLOCK], {identity}, dtype=tl.float32)",
            f"{ind}for start in range(0, N, BLOCK):",
            f"{ind}    cols = start + tl.arange(0, BLOCK)",
            f"{ind}    mask = cols < N",
            *body.lines,
            f"{ind}    {step}",
        ]
        return f"{combine}({acc}, axis=0)"


def generate_source(program: Program, name: str, *, persistent_max: int = PERSISTENT_MAX,
                    comment: str = "") -> str:
    """Triton source of ``program`` as a ``@triton.jit`` function called ``name`` (sanitized)."""
    name = sanitize(name, max_len=80)
    form = program.form(persistent_max)
    rank = len(program.rows)
    params = [f"in{i}" for i in range(program.num_inputs)] + [f"out{j}" for j in range(len(program.outputs))]
    params += [f"R{d}" for d in range(rank)]
    params += [f"s{i}_{d}" for i in range(program.num_inputs) for d in range(rank + 1)]
    params += ["N", "BLOCK: tl.constexpr"]
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {name}({', '.join(params)}):",
    ]
    if comment:
        lines.insert(0, f"# {sanitize_comment(comment)}")
        lines.insert(1, f"# form: {form}")
    ind = "    "
    lines.append(f"{ind}row = tl.program_id(0)")
    # Row index → one index per row dimension (last dimension varies fastest).
    if rank:
        lines.append(f"{ind}rem = row")
        for d in reversed(range(rank)):
            lines.append(f"{ind}r{d} = rem % R{d}")
            if d:
                lines.append(f"{ind}rem = rem // R{d}")
    for i in range(program.num_inputs):
        terms = " + ".join(f"r{d} * s{i}_{d}" for d in range(rank)) or "0"
        lines.append(f"{ind}roff{i} = {terms}")
    writer = _Writer(program, form)
    top = _Scope(ind)
    if form == "pointwise":
        top.lines += [f"{ind}cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)", f"{ind}mask = cols < N"]
    elif form == "persistent":
        top.lines += [f"{ind}cols = tl.arange(0, BLOCK)", f"{ind}mask = cols < N"]
    stores: list[str] = []
    full_outs = [(j, o) for j, o in enumerate(program.outputs) if o.kind == "full"]
    row_outs = [(j, o) for j, o in enumerate(program.outputs) if o.kind == "row"]
    if form == "looped":
        if full_outs:
            body = _Scope(ind + "    ")
            for j, out in full_outs:
                value = writer.emit(out.expr, body, top)
                body.lines.append(f"{ind}    tl.store(out{j} + row * N + cols, {value}, mask=mask)")
            top.lines += [f"{ind}for start in range(0, N, BLOCK):", f"{ind}    cols = start + tl.arange(0, BLOCK)",
                          f"{ind}    mask = cols < N", *body.lines]
    else:
        for j, out in full_outs:
            value = writer.emit(out.expr, top, top)
            stores.append(f"{ind}tl.store(out{j} + row * N + cols, {value}, mask=mask)")
    for j, out in row_outs:
        value = writer.emit(out.expr, top, top)
        stores.append(f"{ind}tl.store(out{j} + row, {value})")
    return "\n".join(lines + top.lines + stores) + "\n"


def source_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Compiling and launching
# --------------------------------------------------------------------------------------------


def interpreter_enabled() -> bool:
    """True when Triton runs generated kernels on CPU tensors (:func:`fxmem.kernels.interpreter.enabled`)."""
    return interpreter.enabled()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cache_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"fxmem_kernels_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def compile_source(source: str, name: str) -> Any:
    """Load generated source as a module (Triton's ``jit`` reads the source from a file) and
    return its ``@triton.jit`` function. The file is named by the source's hash, so processes
    share it; the loaded module is not put in ``sys.modules`` (each :class:`GeneratedKernel`
    keeps the function it compiled)."""
    key = source_hash(source)
    path = os.path.join(_cache_dir(), f"k_{key}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"fxmem_kernels.k_{key}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return getattr(module, sanitize(name, max_len=80))


@dataclass
class GeneratedKernel:
    """A generated kernel with what is needed to launch it on tensors of its static shapes."""

    name: str
    source: str
    program: Program
    form: str
    block: int
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def compiled(self) -> Any:
        """The ``@triton.jit`` function, compiled on first launch and kept by this kernel."""
        if self._compiled is None:
            self._compiled = compile_source(self.source, self.name)
        return self._compiled

    def launch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        program = self.program
        device = inputs[0].device if inputs else torch.device("cpu")
        outs = [torch.empty(o.shape, dtype=o.dtype, device=device) for o in program.outputs]
        full = program.full_shape
        rows = program.rows
        m = math.prod(rows) if rows else 1
        n = program.n
        if m == 0 or n == 0:
            return outs
        strides: list[int] = []
        for t in inputs:
            strides += list(t.expand(full).stride()) if full else [0]
        kernel = self.compiled()
        grid = (m, triton_cdiv(n, self.block)) if self.form == "pointwise" else (m,)
        if device.type == "cpu":
            # the interpreter computes masked-off lanes too (e.g. log(0)); NumPy would warn
            import numpy as np

            with np.errstate(all="ignore"):
                kernel[grid](*inputs, *outs, *rows, *strides, n, BLOCK=self.block)
        else:
            kernel[grid](*inputs, *outs, *rows, *strides, n, BLOCK=self.block)
        return outs


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_size(program: Program, persistent_max: int = PERSISTENT_MAX, loop_block: int = LOOP_BLOCK) -> int:
    form = program.form(persistent_max)
    n = program.n
    if form == "persistent":
        return max(1, 1 << (n - 1).bit_length())
    return max(1, min(loop_block, 1 << (max(n, 1) - 1).bit_length()))


def build_kernel(program: Program, base_name: str, *, persistent_max: int = PERSISTENT_MAX,
                 loop_block: int = LOOP_BLOCK, comment: str = "") -> GeneratedKernel:
    """Generate a kernel for ``program``; its name ends in the hash of its body."""
    form = program.form(persistent_max)
    base = sanitize(base_name, max_len=40)
    body = generate_source(program, "fxmem_kernel", persistent_max=persistent_max)
    name = f"fxk_{base}_{source_hash(body)[:8]}"
    source = generate_source(program, name, persistent_max=persistent_max, comment=comment)
    return GeneratedKernel(name, source, program, form, block_size(program, persistent_max, loop_block))


# --------------------------------------------------------------------------------------------
# The op: one, defined here at import; the kernels it runs are held by the graphs that call it
# --------------------------------------------------------------------------------------------

# kernel key → the BoundKernel a graph holds. Weak: an entry lives exactly as long as some graph
# (a node's meta) or caller holds the kernel, so a pass that fails, or a graph that is dropped,
# leaves nothing behind here once it is collected.
_LIVE: weakref.WeakValueDictionary[str, BoundKernel] = weakref.WeakValueDictionary()
META_KEY = "fxmem_kernel"  # node.meta key under which a graph holds the kernel its node calls


@dataclass(eq=False)
class BoundKernel:
    """A generated kernel bound to its static shapes and its CPU path; call it with a list of
    input tensors (it goes through ``torch.ops.fxmem.fused_kernel``, so it is traceable)."""

    key: str
    kernel: GeneratedKernel
    outputs: list[tuple[tuple[int, ...], torch.dtype]]
    fallback: Callable[..., list[torch.Tensor]] | None = None

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.fallback is not None and inputs and inputs[0].device.type == "cpu" and not interpreter_enabled():
            return [t.contiguous() for t in self.fallback(*inputs)]
        return self.kernel.launch(list(inputs))

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return torch.ops.fxmem.fused_kernel(list(inputs), self.key)

    def __deepcopy__(self, memo):  # immutable once bound: a deep-copied graph shares it (and its key)
        return self


def _live(key: str) -> BoundKernel:
    bound = _LIVE.get(key)
    if bound is None:
        raise RuntimeError(
            f"fxmem::fused_kernel: kernel {key!r} is not held by any graph any more (the graph that fxmem's lower "
            "pass built it for was freed); keep the optimized module or compiled model alive while calling it"
        )
    return bound


@torch.library.custom_op("fxmem::fused_kernel", mutates_args=())
def fused_kernel(inputs: list[torch.Tensor], kernel: str) -> list[torch.Tensor]:
    """Run the generated kernel ``kernel`` (a key of a live :class:`BoundKernel`) on ``inputs``."""
    return _live(kernel).run(inputs)


@fused_kernel.register_fake
def _fused_kernel_fake(inputs: list[torch.Tensor], kernel: str) -> list[torch.Tensor]:
    device = inputs[0].device if inputs else torch.device("cpu")
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _live(kernel).outputs]


def bind_kernel(kernel: GeneratedKernel, fallback: Callable[..., list[torch.Tensor]] | None = None) -> BoundKernel:
    """Bind ``kernel`` to its static shapes (and its CPU path) for ``torch.ops.fxmem.fused_kernel``.

    The caller must hold the result for as long as anything calls it: the lower pass stores it in
    the calling node's ``meta[META_KEY]``. The same source and shapes give the same key; while a
    kernel with that key is alive it is returned (the same source means the same computation, so
    its fallback serves every region sharing it).

    ``fallback`` is the CPU path: called with the input tensors when they are on a CPU and
    Triton's interpreter is off (the ops the kernel replaced, run by ATen).
    """
    shapes = ";".join(f"{o.shape}:{o.dtype}" for o in kernel.program.outputs)
    key = f"{kernel.name}_" + source_hash(kernel.source + shapes + str(kernel.program.full_shape) + str(kernel.block))[:12]
    bound = _LIVE.get(key)
    if bound is None:
        bound = BoundKernel(key, kernel, [(o.shape, o.dtype) for o in kernel.program.outputs], fallback)
        _LIVE[key] = bound
    return bound


def live_kernels() -> list[str]:
    """Keys of the kernels some graph holds now (for tests and debugging)."""
    return list(_LIVE.keys())


__all__ = [
    "Expr", "Program", "Output", "GeneratedKernel", "BoundKernel", "generate_source", "build_kernel", "bind_kernel",
    "fused_kernel", "live_kernels", "META_KEY",
    "compile_source", "sanitize", "float_literal", "interpreter_enabled", "triton_available", "source_hash",
    "PERSISTENT_MAX", "LOOP_BLOCK",
]
