"""Which dimensions of which tensors are coupled in an ATen inference graph — read-only.

Structured pruning must remove a channel everywhere it lives at once: an MLP hidden neuron is a
row of ``up_proj.weight``, an entry of its bias and a column of ``down_proj.weight``; an attention
head is a block of rows of ``q/k/v_proj`` and a block of columns of ``o_proj``, reached through
``view`` into heads, ``transpose``, GQA's ``expand``/``repeat_interleave`` and ``bmm``.

The analysis gives every tensor dimension of every node a *factor list*: the channel spaces whose
row-major product the dimension is. A fresh dimension of size ``n`` is one space of size ``n``.
Ops relate their inputs' and outputs' factor lists:

* pointwise ops (broadcasting), ``clone``, ``_to_copy``: equal dimensions share spaces;
* ``addmm``/``mm``/``bmm``: the contracted dimensions share a space, batch dimensions too;
* ``view``/``reshape``/``unsqueeze``/``squeeze``: the flattened factor stream is re-cut into the
  new dimensions — a dimension of size 64 viewed as ``[4, 16]`` *refines* its space into a head
  space (4) and a head-dim space (16), everywhere that space appears (union-find with refinement);
* ``transpose``/``permute``: dimensions move; ``expand`` of a size-1 dimension makes a new space
  (GQA's repeat factor): ``q``'s heads meet ``k``'s through ``bmm`` and the heads space refines
  into (kv group × repeat);
* equal-size ``split``/``cat`` (GPT-2's fused ``c_attn``): the dimension refines into
  (chunk index × chunk), and every chunk shares the inner space;
* norms, softmax, reductions, gathers, slices and every op not listed *block* the dimension they
  mix: a blocked space is never pruned. Graph inputs and outputs are blocked too, so pruning never
  changes an output shape.

A *group* is an unblocked leaf space that some weight touches: pruning index ``i`` of it removes
the slice at ``i`` of every tensor and every shape it appears in. Spaces are tracked in a
union-find with refinement (``networkx.utils.UnionFind`` for the unions).
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from networkx.utils import UnionFind

from fxmem.analysis.grouped import grouped_mm_operands, is_last_two_transpose
from fxmem.analysis.sizes import fetch_attr
from fxmem.passes.base import val as _val  # one helper for every module

aten = torch.ops.aten

Factors = list[int]          # space ids whose row-major product is one dimension
Dims = list[Factors]         # one factor list per dimension of a tensor


class Spaces:
    """Channel spaces: union-find over space ids, plus refinement of a space into sub-spaces."""

    def __init__(self) -> None:
        self.size: list[int] = []
        self.uf = UnionFind()
        self.split: dict[int, list[int]] = {}   # root → its sub-spaces (outer first)
        self.blocked: dict[int, str] = {}        # root → why it may not be pruned

    def new(self, size: int, blocked: str | None = None) -> int:
        sid = len(self.size)
        self.size.append(int(size))
        self.uf[sid]  # registers it
        if blocked:
            self.blocked[sid] = blocked
        return sid

    def find(self, s: int) -> int:
        return self.uf[s]

    def leaves(self, s: int) -> list[int]:
        r = self.find(s)
        if r in self.split:
            return [leaf for c in self.split[r] for leaf in self.leaves(c)]
        return [r]

    def resolve(self, factors: Factors) -> Factors:
        return [leaf for s in factors for leaf in self.leaves(s)]

    def block(self, factors: Factors, reason: str) -> None:
        for leaf in self.resolve(factors):
            self.blocked.setdefault(leaf, reason)

    def is_blocked(self, leaf: int) -> bool:
        return self.find(leaf) in self.blocked

    def why_blocked(self, leaf: int) -> str | None:
        return self.blocked.get(self.find(leaf))

    def _refine(self, leaf: int, outer: int) -> tuple[int, int]:
        """Split a leaf space of size n into (outer, n // outer), row-major."""
        r = self.find(leaf)
        n = self.size[r]
        reason = self.blocked.get(r)
        a, b = self.new(outer, reason), self.new(n // outer, reason)
        self.split[r] = [a, b]
        return a, b

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        reason = self.blocked.get(ra) or self.blocked.get(rb)
        self.uf.union(ra, rb)
        r = self.find(ra)
        if reason:
            self.blocked[r] = reason

    def take(self, stream: list[int], n: int) -> Factors | None:
        """Pop leaf factors off ``stream`` whose product is ``n`` (refining one if needed)."""
        out: Factors = []
        need = n
        while need > 1:
            if not stream:
                return None
            s = self.find(stream.pop(0))
            size = self.size[s]
            if size <= need:
                if need % size:
                    return None
                out.append(s)
                need //= size
            else:
                if size % need:
                    return None
                a, b = self._refine(s, need)
                out.append(a)
                stream.insert(0, b)
                need = 1
        return out

    def unify(self, x: Factors, y: Factors) -> bool:
        """Make two factor lists (of equal product) the same spaces; False if they do not align."""
        xs, ys = self.resolve(x), self.resolve(y)
        while xs and ys:
            a, b = xs.pop(0), ys.pop(0)
            a, b = self.find(a), self.find(b)
            sa, sb = self.size[a], self.size[b]
            if sa == sb:
                self._union(a, b)
            elif sa > sb:
                if sa % sb:
                    return False
                a1, a2 = self._refine(a, sb)
                self._union(a1, b)
                xs.insert(0, a2)
            else:
                if sb % sa:
                    return False
                b1, b2 = self._refine(b, sa)
                self._union(a, b1)
                ys.insert(0, b2)
        return not xs and not ys


@dataclass
class Mention:
    """One weight dimension a space appears in: ``node`` (get_attr), its ``dim`` and the factors."""

    node: fx.Node
    dim: int
    position: int          # index of the space within the dimension's factor list
    factors: Factors       # the dimension's resolved leaf factors
    sizes: list[int]       # their sizes


@dataclass
class Group:
    """A prunable channel space: removing index ``i`` removes slice ``i`` everywhere."""

    space: int
    size: int
    kind: str                      # "mlp" | "heads" | "channels" | "experts"
    level: str                     # heads: "group" (outermost factor) | "query" (inner factor)
    mentions: list[Mention] = field(default_factory=list)

    @property
    def layer(self) -> str:
        """The module the group belongs to: the common prefix of its weights' names."""
        names = [m.node.meta.get("fxmem_fqn", str(m.node.target)) for m in self.mentions]
        parts = [n.split(".") for n in names]
        common = []
        for items in zip(*parts):
            if len(set(items)) != 1:
                break
            common.append(items[0])
        if len(common) == len(parts[0]):  # one weight only: drop the ".weight"
            common = common[:-1]
        return ".".join(common) or names[0].rsplit(".", 1)[0]

    @property
    def weights(self) -> list[str]:
        return sorted({m.node.meta.get("fxmem_fqn", str(m.node.target)) for m in self.mentions})


def _is_tensor_node(x) -> bool:
    return isinstance(x, fx.Node) and isinstance(_val(x), torch.Tensor)


def _packet(target):
    return getattr(target, "overloadpacket", None)


_IDENTITY = {aten.clone, aten._to_copy, aten.alias, aten.detach, aten.lift_fresh_copy, aten.contiguous,
             aten.native_dropout}
_RESHAPE = {aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze, aten.flatten}
_REDUCE = {aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.prod, aten.logsumexp,
           aten.var_mean, aten.max, aten.min, aten.any, aten.all, aten.argmax, aten.argmin, aten.norm,
           aten.linalg_vector_norm}


def _reduced_dims(node: fx.Node) -> object:
    """The ``dim`` argument of a reduction, found by name in the op's schema.

    Its position differs between overloads: ``sum.dim_IntList(self, dim, ...)`` but
    ``linalg_vector_norm(self, ord, dim, ...)``, ``norm.ScalarOpt_dim(self, p, dim, ...)``, and
    ``sum.default(self, dtype)`` has none (every dimension). Reading ``args[1]`` took the norm's
    order 2 for a dimension. ``None`` or an empty list: every dimension.
    """
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else ["self", "dim"]
    if "dim" not in names:
        return None
    index = names.index("dim")
    return node.args[index] if len(node.args) > index else node.kwargs.get("dim")


_SOFTMAX = {aten._softmax, aten._log_softmax, aten.softmax, aten.log_softmax}
_CREATE = {aten.zeros, aten.ones, aten.full, aten.empty}
# per-channel spatial ops: batch and channel dimensions pass, spatial ones are new
_POOL = {getattr(aten, n) for n in ("avg_pool2d", "max_pool2d_with_indices", "_adaptive_avg_pool2d",
                                     "adaptive_max_pool2d", "avg_pool1d", "max_pool2d", "upsample_nearest2d",
                                     "upsample_bilinear2d", "_adaptive_avg_pool3d", "avg_pool3d") if hasattr(aten, n)}
_SDPA = {getattr(aten, n) for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                     "_scaled_dot_product_attention_math",
                                     "_scaled_dot_product_efficient_attention",
                                     "_scaled_dot_product_flash_attention",
                                     "scaled_dot_product_attention") if hasattr(aten, n)}


class DependencyGraph:
    """The coupled dimensions of one inference graph (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.spaces = Spaces()
        self.dims: dict[fx.Node, object] = {}   # node → Dims, or a tuple of Dims (multi-output)
        self._tensor_attr: dict[int, fx.Node] = {}
        self._contracted: list[Factors] = []     # dimensions summed over by mm/bmm/conv/attention
        self._experts: set[fx.Node] = set()      # get_attr nodes of expert weights (grouped matmuls)
        for node in gm.graph.nodes:
            self.dims[node] = self._visit(node)

    # ---------------------------------------------------------------- helpers
    def _fresh(self, shape, blocked: str | None = None) -> Dims:
        return [[] if int(s) == 1 else [self.spaces.new(int(s), blocked)] for s in shape]

    def _of(self, x) -> Dims:
        d = self.dims.get(x)
        if d is None or (isinstance(d, tuple)):
            raise KeyError(x)
        return d

    def _block_inputs(self, node: fx.Node, reason: str) -> None:
        for a in node.all_input_nodes:
            d = self.dims.get(a)
            for dims in (d if isinstance(d, tuple) else (d,)):
                for f in dims or []:
                    self.spaces.block(f, reason)

    def _out_fresh(self, node: fx.Node, blocked: str | None) -> object:
        val = _val(node)
        if isinstance(val, torch.Tensor):
            return self._fresh(val.shape, blocked)
        if isinstance(val, (list, tuple)):
            return tuple(self._fresh(v.shape, blocked) if isinstance(v, torch.Tensor) else [] for v in val)
        return None

    def _opaque(self, node: fx.Node, reason: str) -> object:
        self._block_inputs(node, reason)
        return self._out_fresh(node, reason)

    def _broadcast(self, node: fx.Node, inputs) -> Dims:
        out_shape = _val(node).shape
        out = self._fresh(out_shape)
        for x in inputs:
            if not _is_tensor_node(x):
                continue
            shape = _val(x).shape
            offset = len(out_shape) - len(shape)
            for i, s in enumerate(shape):
                if int(s) != 1 and offset + i >= 0 and int(s) == int(out_shape[offset + i]):
                    if not self.spaces.unify(self._of(x)[i], out[offset + i]):
                        self.spaces.block(self._of(x)[i], "broadcast misaligned")
        return out

    def _reshape(self, node: fx.Node, x: fx.Node) -> Dims:
        stream = self.spaces.resolve([s for f in self._of(x) for s in f])
        out: Dims = []
        for s in _val(node).shape:
            f = self.spaces.take(stream, int(s))
            if f is None:
                return self._opaque(node, f"{node.target}: dims do not factor")
            out.append(f)
        return out

    # ---------------------------------------------------------------- rules
    def _visit(self, node: fx.Node) -> object:
        if node.op == "placeholder":
            return self._out_fresh(node, "graph input")
        if node.op == "get_attr":
            return self._attr(node)
        if node.op == "output":
            for leaf in torch.utils._pytree.tree_leaves(node.args[0]):
                if isinstance(leaf, fx.Node) and leaf in self.dims:
                    d = self.dims[leaf]
                    for dims in (d if isinstance(d, tuple) else (d,)):
                        for f in dims or []:
                            self.spaces.block(f, "graph output")
            return None
        if node.op != "call_function":
            return self._opaque(node, f"{node.op} {node.target}")
        try:
            return self._call(node)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            return self._opaque(node, f"{node.target}: unexpected arguments")

    def _attr(self, node: fx.Node) -> object:
        value = fetch_attr(self.gm, node.target)
        if not isinstance(value, torch.Tensor):
            return None
        dims = self._fresh(value.shape)
        twin = self._tensor_attr.get(id(value))
        if twin is not None:  # the same tensor read twice (tied weights): prune it one way
            for a, b in zip(self.dims[twin], dims):
                self.spaces.unify(a, b)
        else:
            self._tensor_attr[id(value)] = node
        return dims

    def _call(self, node: fx.Node) -> object:
        target = node.target
        args = node.args
        if target is operator.getitem:
            src = self.dims.get(args[0])
            if isinstance(src, tuple):
                return src[args[1]]
            return self._opaque(node, "getitem")
        packet = _packet(target)
        val = _val(node)
        if packet in _IDENTITY:
            return self._broadcast(node, [args[0]]) if isinstance(val, torch.Tensor) else self._opaque(node, str(target))
        if isinstance(val, torch.Tensor) and torch.Tag.pointwise in getattr(target, "tags", ()):
            return self._broadcast(node, node.all_input_nodes)
        if packet in _RESHAPE:
            return self._reshape(node, args[0])
        if packet in (aten.transpose, aten.t):
            d = list(self._of(args[0]))
            if len(d) >= 2:
                i, j = (args[1], args[2]) if packet is aten.transpose else (0, 1)
                d[i], d[j] = d[j], d[i]
            return d
        if packet is aten.permute:
            d = self._of(args[0])
            return [d[i] for i in args[1]]
        if packet is aten.expand:
            return self._expand(node)
        if packet is aten.slice:
            return self._slice(node)
        if packet in (aten.mm, aten.bmm):
            a, b = self._of(args[0]), self._of(args[1])
            return self._matmul(node, a, b)
        if packet in (aten.addmm, aten.baddbmm):
            a, b = self._of(args[1]), self._of(args[2])
            out = self._matmul(node, a, b)
            self._onto(out, args[0])
            return out
        if packet is aten.linear:
            x, w = self._of(args[0]), self._of(args[1])
            self.spaces.unify(x[-1], w[1])
            self._contracted.append(w[1])
            out = [list(f) for f in x[:-1]] + [w[0]]
            if len(args) > 2 and args[2] is not None:
                self._onto(out, args[2])
            return out
        if packet is aten.convolution:
            return self._conv(node)
        if packet in _SDPA:
            return self._sdpa(node)
        if packet in _SOFTMAX:
            d = [list(f) for f in self._of(args[0])]
            self.spaces.block(d[args[1]], "softmax")
            return d
        if packet in _REDUCE:
            return self._reduce(node)
        if packet is aten.native_layer_norm:
            x = self._of(args[0])
            k = len(args[1])
            for f in x[-k:]:
                self.spaces.block(f, "layer norm")
            for w in args[2:4]:
                if _is_tensor_node(w):
                    for a, b in zip(self._of(w), x[-k:]):
                        self.spaces.unify(a, b)
            stat = [list(f) for f in x[:-k]] + [[] for _ in range(k)]
            return ([list(f) for f in x], stat, stat)
        if packet in (aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.native_batch_norm):
            x = self._of(args[0])
            for w in args[1:5]:
                if _is_tensor_node(w):
                    self.spaces.unify(self._of(w)[0], x[1])
            rest = tuple(self._fresh(v.shape, "batch norm statistics") for v in val[1:])
            return ([list(f) for f in x], *rest)
        if packet is aten.native_group_norm:
            x = self._of(args[0])
            self.spaces.block(x[1], "group norm")  # channels are normalized together per group
            for w in args[1:3]:
                if _is_tensor_node(w):
                    self.spaces.unify(self._of(w)[0], x[1])
            return ([list(f) for f in x], *(self._fresh(v.shape, "group norm statistics") for v in val[1:]))
        if packet is aten.embedding:
            w, idx = self._of(args[0]), self._of(args[1])
            self.spaces.block(w[0], "embedding rows (gathered)")
            self.spaces.block([s for f in idx for s in f], "embedding indices")
            return [list(f) for f in idx] + [w[1]]
        if packet in (aten.split, aten.split_with_sizes):
            return self._split(node)
        if packet is aten.cat:
            return self._cat(node)
        if packet in _CREATE:
            return self._out_fresh(node, None)
        if packet in _POOL:
            x = self._of(args[0])
            outs = val if isinstance(val, (list, tuple)) else (val,)
            dims = tuple([list(f) for f in x[:2]] + self._fresh(o.shape[2:], "pooled spatial dim") for o in outs)
            return dims if isinstance(val, (list, tuple)) else dims[0]
        grouped = grouped_mm_operands(node)
        if grouped is not None:
            return self._grouped_mm(node, *grouped)
        if packet is getattr(aten, "_assert_tensor_metadata", None):
            return None  # a check of its input's metadata: the pruning pass rewrites its sizes
        return self._opaque(node, f"{target} is not known to keep channels apart")

    def _onto(self, out: Dims, bias) -> None:
        """A bias added onto ``out`` with broadcasting."""
        if not _is_tensor_node(bias):
            return
        shape = _val(bias).shape
        offset = len(out) - len(shape)
        for i, s in enumerate(shape):
            if int(s) != 1:
                self.spaces.unify(self._of(bias)[i], out[offset + i])

    def _matmul(self, node: fx.Node, a: Dims, b: Dims) -> Dims:
        self._contracted.append(a[-1])
        if not self.spaces.unify(a[-1], b[-2]):
            return self._opaque(node, "contraction misaligned")
        for x, y in zip(a[:-2], b[:-2]):
            self.spaces.unify(x, y)
        return [list(f) for f in a[:-1]] + [b[-1]]

    def _grouped_mm(self, node: fx.Node, x: fx.Node, w: fx.Node, offs: fx.Node) -> Dims:
        """``x [S, K]`` × ``w [E, K, N]`` by expert offsets: K is contracted, N is the output's.
        The experts dimension is routed (``offs``, the router's top-k): blocked. A group that
        reaches a weight this way is an ``experts`` group — the same channel index removed from
        every expert (their weights are one dense tensor)."""
        a, b = self._of(x), self._of(w)
        self.spaces.block(b[0], "experts dimension (routed)")
        self.spaces.block([s for f in self._of(offs) for s in f], "expert offsets")
        self._contracted.append(a[-1])
        if not self.spaces.unify(a[-1], b[-2]):
            return self._opaque(node, "grouped matmul contraction misaligned")
        src = w.args[0] if is_last_two_transpose(w) else w
        if src.op == "get_attr":
            self._experts.add(src)
        return [list(a[0]), b[-1]]

    def _expand(self, node: fx.Node) -> Dims:
        x = node.args[0]
        in_shape, out_shape = _val(x).shape, _val(node).shape
        d = self._of(x)
        offset = len(out_shape) - len(in_shape)
        out: Dims = []
        for i, s in enumerate(out_shape):
            j = i - offset
            if j >= 0 and int(in_shape[j]) == int(s):
                out.append(list(d[j]))
            else:  # a new or broadcast dimension: its own space (GQA's repeat factor)
                out.append([] if int(s) == 1 else [self.spaces.new(int(s))])
        return out

    def _slice(self, node: fx.Node) -> Dims:
        x = node.args[0]
        d = [list(f) for f in self._of(x)]
        dim = node.args[1] if len(node.args) > 1 else 0
        dim = dim % len(d)
        if int(_val(x).shape[dim]) == int(_val(node).shape[dim]):
            return d
        self.spaces.block(d[dim], "slice")
        d[dim] = self._fresh([_val(node).shape[dim]], "slice")[0]
        return d

    def _reduce(self, node: fx.Node) -> object:
        x = node.args[0]
        d = self._of(x)
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            return self._opaque(node, f"{node.target}")
        dims = _reduced_dims(node)
        if isinstance(dims, int):
            dims = [dims]
        dims = list(range(len(d))) if not dims else [i % len(d) for i in dims]
        for i in dims:
            self.spaces.block(d[i], f"reduction {node.target}")
        if val.dim() == len(d):  # keepdim
            return [[] if i in dims else list(f) for i, f in enumerate(d)]
        return [list(f) for i, f in enumerate(d) if i not in dims]

    def _conv(self, node: fx.Node) -> Dims:
        x, w = self._of(node.args[0]), self._of(node.args[1])
        bias = node.args[2]
        transposed, groups = node.args[6], node.args[8]
        out_shape = _val(node).shape
        out = self._fresh(out_shape, "convolution spatial")
        self.spaces.unify(x[0], out[0])
        if transposed or groups != 1:
            self.spaces.block(x[1], "grouped or transposed convolution")
            self.spaces.block(w[0], "grouped or transposed convolution")
            return out
        self.spaces.unify(x[1], w[1])
        self._contracted.append(w[1])
        out[1] = w[0]
        if _is_tensor_node(bias):
            self.spaces.unify(self._of(bias)[0], out[1])
        return out

    def _sdpa(self, node: fx.Node) -> object:
        q, k, v = (self._of(a) for a in node.args[:3])
        scale = node.kwargs.get("scale")
        for x, y, z in zip(q[:-2], k[:-2], v[:-2]):
            self.spaces.unify(x, y)
            self.spaces.unify(x, z)
        self.spaces.unify(q[-1], k[-1])
        self.spaces.unify(k[-2], v[-2])
        self._contracted += [q[-1], k[-2]]
        if scale is None:  # the default scale reads the head dim
            self.spaces.block(q[-1], "attention scale from head dim")
        out = [list(f) for f in q[:-1]] + [v[-1]]
        mask = node.kwargs.get("attn_mask")
        if mask is None and _packet(node.target) is aten.scaled_dot_product_attention and len(node.args) > 3:
            mask = node.args[3]
        if _is_tensor_node(mask):
            self._onto([list(f) for f in q[:-1]] + [k[-2]], mask)
        val = _val(node)
        if isinstance(val, torch.Tensor):
            return out
        rest = []
        for v_ in val[1:]:
            if isinstance(v_, torch.Tensor) and tuple(v_.shape) == tuple(_val(node.args[0]).shape[:-1]):
                rest.append([list(f) for f in q[:-1]])
            else:
                rest.append(self._fresh(v_.shape, "attention statistics") if isinstance(v_, torch.Tensor) else [])
        return (out, *rest)

    def _split(self, node: fx.Node) -> object:
        x = node.args[0]
        d = [list(f) for f in self._of(x)]
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(d)
        sizes = [int(v.shape[dim]) for v in _val(node)]
        n = int(_val(x).shape[dim])
        if len(set(sizes)) != 1 or sizes[0] * len(sizes) != n:
            self.spaces.block(d[dim], "unequal split")
            return tuple([list(f) for f in d[:dim]] + self._fresh([s], "unequal split") + [list(f) for f in d[dim + 1:]] for s in sizes)
        inner = self._fresh([sizes[0]])[0]
        chunk = [] if len(sizes) == 1 else [self.spaces.new(len(sizes), "chunk index of a split")]
        if not self.spaces.unify(d[dim], chunk + inner):
            self.spaces.block(d[dim], "split misaligned")
        return tuple(d[:dim] + [list(inner)] + d[dim + 1:] for _ in sizes)

    def _cat(self, node: fx.Node) -> Dims:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = _val(node).shape
        dim %= len(out_shape)
        out = self._fresh(out_shape)
        parts = [t for t in tensors if _is_tensor_node(t) and _val(t).dim() == len(out_shape)]
        sizes = [int(_val(t).shape[dim]) for t in parts]
        equal = len(set(sizes)) == 1 and sizes[0] * len(sizes) == int(out_shape[dim])
        inner = self._fresh([sizes[0]])[0] if equal else None
        if equal and len(parts) > 1:
            self.spaces.unify(out[dim], [self.spaces.new(len(parts), "chunk index of a cat")] + inner)
        for t in parts:
            td = self._of(t)
            for i, f in enumerate(td):
                if i != dim:
                    self.spaces.unify(f, out[i])
                elif equal:
                    self.spaces.unify(f, inner)
                else:
                    self.spaces.block(f, "unequal cat")
        if not equal:
            self.spaces.block(out[dim], "unequal cat")
        return out

    # ---------------------------------------------------------------- queries
    def node_dims(self, node: fx.Node) -> list[Factors] | tuple | None:
        """The resolved leaf factors of each dimension of ``node``'s output(s)."""
        d = self.dims.get(node)
        if d is None:
            return None
        if isinstance(d, tuple):
            return tuple([self.spaces.resolve(f) for f in dims] if dims is not None else None for dims in d)
        return [self.spaces.resolve(f) for f in d]

    def mentions(self) -> dict[int, list[Mention]]:
        """Leaf space → the weight dimensions it appears in."""
        out: dict[int, list[Mention]] = defaultdict(list)
        for node in self.gm.graph.nodes:
            if node.op != "get_attr" or self.dims.get(node) is None:
                continue
            for dim, factors in enumerate(self.node_dims(node)):
                for pos, leaf in enumerate(factors):
                    out[leaf].append(Mention(node, dim, pos, factors, [self.spaces.size[f] for f in factors]))
        return out

    def groups(self) -> list[Group]:
        """The prunable groups: unblocked spaces that some weight touches, with their kind."""
        groups = []
        # a channel must end in a contraction, where its contribution is summed away: then a
        # channel whose weights are all zero contributes exactly nothing
        contracted = {leaf for f in self._contracted for leaf in self.spaces.resolve(f)}
        for leaf, ms in self.mentions().items():
            if self.spaces.is_blocked(leaf) or self.spaces.size[leaf] < 2 or leaf not in contracted:
                continue
            kind, level = self._classify(leaf, ms)
            if kind is not None:
                groups.append(Group(leaf, self.spaces.size[leaf], kind, level, ms))
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        groups.sort(key=lambda g: min(order[m.node] for m in g.mentions))
        return groups

    def blocked_reason(self, leaf: int) -> str | None:
        return self.spaces.why_blocked(leaf)

    def _classify(self, leaf: int, ms: list[Mention]) -> tuple[str | None, str]:
        """What a group is.

        ``experts``: a channel of mixture-of-experts weights (a grouped matmul's ``[E, K, N]``),
        the same index in every expert. ``channels``: a dimension of a convolution kernel. ``mlp``: a whole dimension of a matrix.
        ``heads``: a non-innermost factor of a weight dimension viewed into heads; its level is
        ``"query"`` if an outer head factor precedes it (GQA: query heads within a kv group),
        ``"group"`` if an inner head factor follows it (GQA: whole kv groups), else ``"head"``
        (plain multi-head attention). The innermost factor (head_dim) is never a target.
        """
        if any(m.node in self._experts for m in ms):
            return "experts", ""
        if any(_val(m.node) is not None and _val(m.node).dim() >= 3 for m in ms):
            return "channels", ""

        def free(f: int) -> bool:
            return not self.spaces.is_blocked(f) and self.spaces.size[f] > 1

        outer = []
        for m in ms:
            if m.position < len(m.factors) - 1:
                outer.append(m)
            elif any(free(f) for f in m.factors[:-1]):
                return None, ""  # the innermost of several head factors: head_dim
        if not outer:  # a whole dimension (up to blocked chunk indices of a split or cat)
            return "mlp", ""
        if any(any(free(f) for f in m.factors[:m.position]) for m in outer):
            return "heads", "query"
        if any(free(f) for m in outer for f in m.factors[m.position + 1:-1]):
            return "heads", "group"
        return "heads", "head"


def analyze(gm: fx.GraphModule) -> DependencyGraph:
    """The dependency analysis of an inference graph (parameters frozen as ``get_attr``)."""
    return DependencyGraph(gm)


def dim_index(factors: Factors, sizes: dict[int, int], kept: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The kept indices of a dimension whose factors are ``factors`` (None: nothing removed)."""
    if not any(f in kept for f in factors):
        return None
    shape = [sizes[f] for f in factors]
    idx = torch.arange(math.prod(shape)).view(shape)
    for p, f in enumerate(factors):
        if f in kept:
            idx = idx.index_select(p, kept[f])
    return idx.reshape(-1)


__all__ = ["DependencyGraph", "Group", "Mention", "Spaces", "analyze", "dim_index"]
