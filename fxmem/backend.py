"""The ``torch.compile`` backend: options → config → pipeline → AOTAutograd.

``torch.compile(model, backend="fxmem", options={...})`` finds :func:`fxmem_backend` through the
``torch_dynamo_backends`` entry point. Dynamo hands it a torch-level FX graph and example inputs
(parameters among them); then

* inference (grad disabled, or nothing requires grad): AOTAutograd traces an ATen inference
  graph; fxmem freezes the parameters into it (:mod:`fxmem.freeze`) and runs the ``inference``
  passes (tie → prune → lowrank → int8/quantize → precision → shard → lower). Frozen weights are watched: if one
  that a pass derived from changes in place, the graph is derived again before the next call.
* training: the ``dynamo`` passes (chunk) rewrite Dynamo's torch-level graph; AOTAutograd
  traces the joint graph; fxmem runs the ``joint`` passes, partitions it
  (:func:`partition`: :mod:`fxmem.passes.remat`'s min-cut, ``default_partition`` with
  ``remat=False``), then runs the
  ``forward`` and ``backward`` passes on the two halves, both compiled — nothing is left to eager.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fxmem.analysis.sizes import PARAM_META_KEY
from fxmem.analysis.timeline import step_timeline
from fxmem.codegen import casts_for_inductor, fxmem_identity, inductor_inference, inductor_training, releasing_call
from fxmem.config import FxmemConfig, LowerConfig, OptionError, parse_options
from fxmem.detached_logits import detach_logits_outputs, reattaching
from fxmem.freeze import WeightWatch, freeze_parameters
from fxmem.passes.base import copy_graph
from fxmem.pipeline import Recorder, run_partition, run_pipeline
from fxmem.verify import verify_outputs

# ATen ops that AOTAutograd keeps whole (softmax, native_layer_norm, gelu, SDPA) stay whole:
# passes pattern-match them and the cost model prices them. CompositeImplicit ops (linear, matmul)
# decompose on their own.
DECOMPOSITIONS: dict = {}


def is_training_call(example_inputs: Sequence[Any]) -> bool:
    """Training when grad mode is on and some input (a parameter, usually) requires grad."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.(?!_modules|_parameters|_buffers)([A-Za-z_]\w*)|\[(\d+)\]")


def _source_fqn(node: fx.Node) -> str | None:
    """``L['self']._modules['fc']._parameters['weight']`` → ``fc.weight`` (None if not a module tensor)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", source))
    if "_parameters" not in name and "_buffers" not in name:
        return None
    rest = name.split("]", 1)[1] if name.startswith(("L[", "G[")) else name
    parts = ["".join(groups) for groups in _SOURCE_PART.findall(rest)]
    return ".".join(parts) if parts else None


def parameter_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, str]:
    """Index → qualified name of the Dynamo inputs that are parameters or buffers."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        fqn = _source_fqn(node)
        source = str(getattr(node.meta.get("grapharg"), "source", ""))
        is_module_tensor = isinstance(value, torch.nn.Parameter) or (fqn is not None and "_buffers" in source)
        if is_module_tensor:
            found[i] = fqn or node.name
    return found


class FxmemBackend:
    """A ``torch.compile`` backend bound to one parsed config (and, for explain, a recorder)."""

    def __init__(self, config: FxmemConfig, recorder: Recorder | None = None, *, autograd_cache: bool = False):
        if config.codegen == "inductor":
            if config.lower.mode == "on":
                raise OptionError(
                    "fxmem option 'lower' asks for fxmem's own Triton kernels, which run on codegen='eager'; "
                    "with codegen='inductor' (the default) Inductor generates the kernels. Pass codegen='eager' "
                    "with lower, or drop lower.")
            # Inductor generates the kernels; remat estimates peaks of its fused code
            config = dataclasses.replace(config, lower=LowerConfig(mode="off"),
                                         remat=dataclasses.replace(config.remat, fused=True))
        self.config = config
        self.recorder = recorder if recorder is not None else Recorder()
        # AOTAutograd's on-disk cache may serve a training compile only where nobody reads the
        # recorder (a hit skips the partition, which then records nothing): fxmem.backend() and
        # backend="fxmem", not explain's, fit's or a test's recording backend
        self.autograd_cache = autograd_cache

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if is_training_call(example_inputs):
            lossy = self.config.lossy_options()
            if lossy:
                raise OptionError(
                    f"fxmem options {lossy} change weights and run on inference graphs only; this graph "
                    "trains (grad is enabled and parameters require grad). Call the model under "
                    "torch.no_grad()/torch.inference_mode(), or drop these options for training "
                    "(precision and remat work in training)."
                )
            compiled = self._compile_training(gm, example_inputs)
        else:
            compiled = self._compile_inference(gm, example_inputs)
        if self.config.verify is not None:
            return verify_outputs(gm, compiled, self.config.verify)
        return compiled

    # -- inference -------------------------------------------------------------------------
    def _compile_inference(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        # the torch-level rewrites (chunk) first, as in training: an evaluation loss or an
        # encoder's MLP holds one chunk of its [N, V] logits / [N, I] intermediate at a time
        gm = self._run_dynamo_pipeline(gm) if inference_chunks(gm, self.config) else gm
        params = parameter_inputs(gm, example_inputs)
        backend = self

        def inference_compiler(aten_gm: fx.GraphModule, flat_args: Sequence[Any]):
            placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
            if len(placeholders) != len(example_inputs) or any(map(is_traceable_wrapper_subclass, example_inputs)):
                # tensor subclasses (DTensor): the graph computes on their inner tensors, so the
                # inputs no longer map one-to-one to its placeholders (2.13 desugars them into
                # more placeholders; 2.11 keeps the count, and freezing the DTensor weights into
                # a graph of plain tensors then fails "mixed torch.Tensor and DTensor"). Run the
                # passes without freezing: the weight passes then find no frozen weights — said,
                # not silent (precision still computes low, casting the weights at each use)
                skipped = [w for w in inference_weight_options(backend.config) if w != "precision"]
                if skipped:
                    kinds = sorted({type(t).__name__ for t in example_inputs if is_traceable_wrapper_subclass(t)})
                    warnings.warn(f"fxmem: {skipped} not applied to this inference graph: its weights are tensor "
                                  f"subclasses ({', '.join(kinds) or 'unflattened inputs'}: a tensor-parallel "
                                  "model), which fxmem does not freeze into the graph, so the passes find no "
                                  "weights and the model keeps its own. Apply them before sharding "
                                  "(fxmem.optimize(model, ...)), or leave them out.", stacklevel=2)
                return backend._codegen_inference(backend._run_inference_pipeline(aten_gm, {}, flat_args), flat_args)
            frozen = {placeholders[i].name: (fqn, example_inputs[i]) for i, fqn in params.items()}
            user_idx = [i for i in range(len(placeholders)) if i not in params]
            template = aten_gm
            state: dict[str, Any] = {}

            def build() -> None:
                gm_copy = fx.GraphModule(template, copy_graph(template.graph))
                frozen_now = {name: (fqn, t) for name, (fqn, t) in frozen.items()}
                # Dynamo's example inputs are real tensors (AOT's flat_args are fake): passes that
                # calibrate on the example inputs (the precision overflow guard) need real values
                state["gm"] = backend._run_inference_pipeline(gm_copy, frozen_now, [example_inputs[i] for i in user_idx])
                sources = {fqn: t for fqn, t in frozen_now.values()}
                # Inductor's code keeps its own copies of the constants: every weight is watched
                inductor = backend.config.codegen == "inductor"
                state["watch"] = WeightWatch.every(sources) if inductor else WeightWatch.after(sources, state["gm"])
                state["call"] = backend._codegen_inference(state["gm"], state.get("args") or [flat_args[i] for i in user_idx])

            build()

            def run(args: list) -> Any:
                user_args = [args[i] for i in user_idx]
                args.clear()
                if state["watch"].changed():
                    state["args"] = user_args  # the code is generated again, for these inputs
                    with torch.no_grad():
                        build()  # a source weight changed in place: derive the frozen weights again
                    state.pop("args")
                return state["call"](user_args)

            run._boxed_call = True  # type: ignore[attr-defined]
            return run

        with torch.no_grad():
            return aot_module_simplified(gm, example_inputs, fw_compiler=inference_compiler,
                                         decompositions=DECOMPOSITIONS, keep_inference_input_mutations=True)

    def _codegen_inference(self, gm: fx.GraphModule, example_args: Sequence[Any]) -> Callable:
        """A boxed callable running the passes' final inference graph (option ``codegen``)."""
        if self.config.codegen == "inductor":
            try:
                # Inductor's post-grad passes rewrite the graph they compile: give it a copy
                return inductor_inference(fx.GraphModule(gm, copy_graph(gm.graph)), example_args)
            except Exception as exc:  # noqa: BLE001 - Inductor's own failure; the graph itself is sound
                # Known case (torch 2.13): HF GPT-2's eager attention retraced with Inductor's
                # decompositions fails a view on a transposed expand.
                self._inductor_failed(exc, "the inference graph")
        return releasing_call(gm)

    def _run_inference_pipeline(self, aten_gm: fx.GraphModule, frozen: dict, user_args: Sequence[Any]) -> fx.GraphModule:
        if frozen:
            freeze_parameters(aten_gm, frozen)
        # AOTAutograd compiles under its fake mode; the runner leaves it for the passes that
        # compute real tensors (the pass table's real_tensors column)
        return run_pipeline(aten_gm, "inference", self.config, self.recorder, example_inputs=user_args)

    # -- training --------------------------------------------------------------------------
    def _compile_training(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        gm = self._run_dynamo_pipeline(gm)
        # the chunk pass's logits outputs leave the compiled function without a gradient path (no
        # materialized zero gradient in the backward); their gradient path is put back outside
        plan = detach_logits_outputs(gm)
        compiled = self._compile_training_graph(gm, example_inputs)
        return reattaching(compiled, plan) if plan else compiled

    def _compile_training_graph(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        backend = self
        inductor = self.config.codegen == "inductor"
        state: dict[str, Any] = {}

        def mark_static(graph_module: fx.GraphModule) -> None:
            static = state.get("static", set())
            for i, node in enumerate(n for n in graph_module.graph.nodes if n.op == "placeholder"):
                if i in static:
                    node.meta[PARAM_META_KEY] = True

        def finish_forward(fw_gm: fx.GraphModule) -> fx.GraphModule:
            mark_static(fw_gm)
            name = backend.recorder.forward_graph_name()
            return run_pipeline(fw_gm, "forward", backend.config, backend.recorder, graph_name=name)

        def finish_backward(bw_gm: fx.GraphModule) -> fx.GraphModule:
            return run_pipeline(bw_gm, "backward", backend.config, backend.recorder)

        def partition_fn(joint_gm, joint_inputs, *, num_fwd_outputs, static_lifetime_input_indices=None, **kwargs):
            state["static"] = set(static_lifetime_input_indices or ())
            fw, bw = partition(joint_gm, joint_inputs, backend.config, backend.recorder, num_fwd_outputs=num_fwd_outputs,
                               static_lifetime_input_indices=static_lifetime_input_indices)
            mark_static(fw)
            # as fit does: Inductor's fusion, in-place reuse and addmm epilogues (analysis.timeline)
            timeline = step_timeline(fw, bw, num_fwd_outputs, fused=inductor, reuse=inductor)
            # and the step of a caller that keeps only the loss (HF's Trainer): explain shows both
            timeline.outputs_dropped = step_timeline(fw, bw, num_fwd_outputs, fused=inductor, reuse=inductor,
                                                     outputs_held=False)
            backend.recorder.timelines.append(timeline)
            if inductor:  # Inductor compiles what this returns: fxmem's forward/backward passes run here
                fw, bw = finish_forward(fw), finish_backward(bw)
                casts_for_inductor(fw), casts_for_inductor(bw)
            return fw, bw

        if inductor:
            rec = backend.recorder
            marks = (len(rec.records), len(rec.partitions), len(rec.timelines))
            try:
                # Dynamo's graph itself (a copy loses the node meta AOTAutograd reads, and the partition
                # then saves more); Inductor's pre-grad rewrites keep its meaning if we fall back
                return inductor_training(gm, example_inputs, partition_fn, identity=fxmem_identity(backend.config),
                                         autograd_cache=backend.autograd_cache)
            except Exception as exc:  # noqa: BLE001 - Inductor's own failure; fxmem's graphs are sound
                self._inductor_failed(exc, "the training graphs")
                del rec.records[marks[0]:], rec.partitions[marks[1]:], rec.timelines[marks[2]:]
                inductor = False  # partition_fn reads it: the eager path runs fxmem's passes in its compilers

        def fw_compiler(fw_gm: fx.GraphModule, args: Sequence[Any]):
            return releasing_call(finish_forward(fw_gm))

        def bw_compiler(bw_gm: fx.GraphModule, args: Sequence[Any]):
            return releasing_call(finish_backward(bw_gm))

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                                     partition_fn=partition_fn, decompositions=DECOMPOSITIONS)

    def _inductor_failed(self, exc: Exception, what: str) -> None:
        """Inductor could not compile fxmem's graphs: raise under ``strict``, else warn (naming the
        error) and let the caller run the same graphs op by op (``codegen="eager"``).

        Dynamo's restarts are not failures and pass through: with ``dynamic=True`` a float scalar
        input makes the compile raise ``TensorifyScalarRestartAnalysis``, and Dynamo traces the
        frame again and calls the backend with the new graph, as it does for torch.compile (fxmem
        used to run that frame op by op, with this warning)."""
        from torch._dynamo.exc import RestartAnalysis

        if self.config.strict or isinstance(exc, RestartAnalysis):
            raise exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(f"fxmem: Inductor could not compile {what} after fxmem's passes ({type(exc).__name__}: "
                      f"{first[:200]}); running them op by op instead (codegen='eager'), with the same numbers. "
                      "strict=True raises instead.", UserWarning, stacklevel=3)

    def _run_dynamo_pipeline(self, gm: fx.GraphModule, config: FxmemConfig | None = None) -> fx.GraphModule:
        """The ``dynamo`` stage (chunk): torch-level rewrites before AOTAutograd traces the graph.

        The pipeline works on a copy; Dynamo's own graph module is kept when no pass changed it.
        """
        name = self.recorder.new_graph_name("dynamo")
        new = run_pipeline(gm, "dynamo", config or self.config, self.recorder, graph_name=name)
        changed = any(r.graph == name and r.status == "changed" for r in self.recorder.records)
        if not changed:
            return gm
        keep_dynamo_metadata(gm, new)
        return new


def inference_weight_options(config: FxmemConfig) -> list[str]:
    """The options set in ``config`` that rewrite the inference graph's Linears (and so are not
    combined with chunking, :func:`inference_chunks`)."""
    weights = [w for w in config.lossy_options() if w != "tie_weights"]
    return weights + (["precision"] if config.precision is not None else [])


def inference_chunks(gm: fx.GraphModule, config: FxmemConfig) -> bool:
    """Whether an inference graph goes through the ``dynamo`` stage (chunk). Not together with a
    weight pass (``int8``, ``quantize``, ``lowrank``, ``prune``, ``precision``): those rewrite the
    Linears of the ATen graph, and a chunked loss or MLP would hide its head or its projections
    from them (their weights would stay fp32, silently). Chunking is then left out, with a
    warning when it would have rewritten something (``chunk=False`` silences it)."""
    weights = inference_weight_options(config)
    if not weights or not config.chunk.enabled:
        return config.chunk.enabled
    probe = Recorder()
    run_pipeline(gm, "dynamo", config, probe)
    if any(r.status == "changed" for r in probe.records):
        warnings.warn(f"fxmem: chunk is not applied to this inference graph together with {weights}: those passes "
                      "rewrite the Linears that the chunked loss or MLP would hide from them. The graph is left "
                      "unchunked; chunk=False silences this.", UserWarning, stacklevel=4)
    return False


def keep_dynamo_metadata(dynamo_gm: fx.GraphModule, new: fx.GraphModule) -> None:
    """Carry what AOTAutograd reads from a Dynamo graph over to a rewritten copy of it.

    AOTAutograd tells the partitioner which inputs are parameters and buffers
    (``static_lifetime_input_indices``) only for a graph it recognises as Dynamo's: one with
    ``_param_name_to_source`` and a ``_dynamo_source`` on every placeholder (torch's
    ``_try_get_metadata_from_dynamo``). A copy keeps ``meta`` but not those attributes, so after
    the chunk pass rewrote a graph the partitioner saw no parameters at all: remat then counted
    them as activations (its budget measured against an inflated eager split) and did not
    recompute parameter-derived values from them. The placeholders are matched by name; a
    rewrite that changed the inputs keeps nothing (the partitioner then gets no static inputs,
    as before).
    """
    old = {n.name: n for n in dynamo_gm.graph.find_nodes(op="placeholder")}
    placeholders = list(new.graph.find_nodes(op="placeholder"))
    if [n.name for n in placeholders] != list(old):
        return
    for node in placeholders:
        if hasattr(old[node.name], "_dynamo_source"):
            node._dynamo_source = old[node.name]._dynamo_source
    if hasattr(dynamo_gm, "_param_name_to_source"):
        new._param_name_to_source = dynamo_gm._param_name_to_source


def partition(joint_gm: fx.GraphModule, joint_inputs, config: FxmemConfig, recorder: Recorder | None = None, *,
              num_fwd_outputs: int, static_lifetime_input_indices=None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """fxmem's partition function (AOTAutograd's ``partition_fn`` contract): ``(forward, backward)``.

    Marks the static-lifetime primals (parameters) with ``meta["fxmem_param"]``, runs the
    ``joint`` passes, then splits the graph by the ``remat`` option through the runner
    (:func:`fxmem.pipeline.run_partition`: a failing remat falls back to PyTorch's
    ``default_partition`` with a warning, or raises under ``strict``). The partition's
    description goes to ``recorder.partitions``, its report row to ``recorder.records``.
    """
    recorder = recorder if recorder is not None else Recorder()
    static = set(static_lifetime_input_indices or ())
    primals = [n for n in joint_gm.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    for i, node in enumerate(primals):
        if i in static:
            node.meta[PARAM_META_KEY] = True
    joint_gm = run_pipeline(joint_gm, "joint", config, recorder)
    return run_partition(joint_gm, joint_inputs, config, recorder, num_fwd_outputs=num_fwd_outputs,
                         static_lifetime_input_indices=static_lifetime_input_indices)


def backend(**options: Any) -> FxmemBackend:
    """``fxmem.backend(**options)``: a backend object with the options parsed now (errors early).

    It compiles as ``backend="fxmem"`` does, AOTAutograd's cache included: a restarted run loads
    its compiled step instead of partitioning again. A hit records nothing, so code that reads a
    backend's recorder (explain, fit, fxmem's tests) builds a :class:`FxmemBackend` with a
    recorder of its own (``fxmem.testing.recording_backend``), which partitions every time."""
    return FxmemBackend(parse_options(options), autograd_cache=True)


def fxmem_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None, mode: str | None = None) -> Callable:
    """The entry point registered as ``backend="fxmem"``."""
    if mode is not None:
        raise OptionError(f"fxmem takes no torch.compile mode (got mode={mode!r}); pass options={{...}} instead")
    # AOTAutograd's cache may serve it, as it serves fxmem.backend() (docs/architecture.md)
    return backend(**(options or {}))(gm, example_inputs)
