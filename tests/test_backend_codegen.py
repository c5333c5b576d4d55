"""fxmem.codegen: both code generators train like eager, and the measured peak is what fxmem promises.

Peaks are measured from outside with :func:`fxmem.measure.peak_memory` (CPU allocator events).
Inductor compiles are slow on 2 cores: every compiled model is built once per module
(``compiled`` fixture) and shared by the tests that read it.

The samples run with :data:`BATCH` rows instead of their own 2: at 2 rows a step's peak is its
weight gradients (0.2 MiB against 0.03 of activations), where neither remat nor the order acts and
two compilers differ by a few hundred bytes of Inductor's buffer choices (torch 2.11: fxmem 241160
B, torch.compile 240904). At 16 the activations make the peak, as in a real step.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.fx as fx

import fxmem
from fxmem.analysis.timeline import RUNTIME_RELEASES_TANGENTS
from fxmem.codegen import releasing_call
from fxmem.config import OptionError, parse_options
from fxmem.measure import training_step_peak
from fxmem.testing import recording_backend, sample

SAMPLES = ("mlp", "gpt_block_manual", "gpt_block_sdpa")
BATCH = 16


def _loss(out):
    return out.float().pow(2).mean()


class _Compiled:
    """One sample model compiled one way: its step, gradients and measured peak."""

    def __init__(self, name: str, variant: str):
        s = sample(name)
        self.model = copy.deepcopy(s.model).train()
        x = s.args[0]
        self.args = (torch.randn(BATCH, *x.shape[1:], generator=torch.Generator().manual_seed(0)), *s.args[1:])
        self.backend = None
        if variant == "eager":
            self.fn = self.model
        elif variant == "torch.compile":
            self.fn = torch.compile(self.model)
        else:
            options = {k: dict(v) if isinstance(v, tuple) else v for k, v in variant}
            self.backend = recording_backend(**options)
            self.fn = torch.compile(self.model, backend=self.backend)
        self.step()
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}
        self.peak = training_step_peak(self.step).peak_bytes

    def step(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        _loss(self.fn(*self.args)).backward()

    @property
    def estimate(self) -> int:
        timeline = self.backend.recorder.timelines[-1]
        return timeline.peak_bytes - timeline.input_bytes  # the measurement leaves the inputs out


@pytest.fixture(scope="module")
def compiled():
    cache: dict = {}

    def get(name: str, variant) -> _Compiled:
        key = (name, variant)
        if key not in cache:
            torch._dynamo.reset()
            cache[key] = _Compiled(name, variant)
        return cache[key]

    return get


def _fx(**options):
    return tuple(sorted(options.items(), key=lambda kv: kv[0]))


INDUCTOR = _fx()
EAGER = _fx(codegen="eager")


# -- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("variant", [INDUCTOR, EAGER], ids=["inductor", "eager"])
def test_both_codegens_give_eager_gradients(compiled, name, variant):
    ref = compiled(name, "eager").grads
    got = compiled(name, variant).grads
    for key, g in ref.items():
        # codegen="eager" runs the same ATen ops as eager; Inductor fuses them (float rounding)
        tol = dict(atol=0, rtol=0) if variant == EAGER else dict(atol=1e-5, rtol=1e-4)
        if variant == EAGER and name == "gpt_block_sdpa":
            tol = dict(atol=1e-6, rtol=1e-5)  # the joint graph calls SDPA's CPU kernel directly
        torch.testing.assert_close(got[key], g, **tol, msg=lambda m: f"{name} {key}: {m}")


# -- measured peak ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_fxmem_peak_at_most_torch_compile(compiled, name):
    ours, theirs = compiled(name, INDUCTOR).peak, compiled(name, "torch.compile").peak
    assert ours <= theirs, f"{name}: fxmem peaks at {ours} B, torch.compile at {theirs} B"


@pytest.mark.parametrize("name", SAMPLES)
def test_eager_codegen_peak_below_eager(compiled, name):
    # the boxed call releases each saved tensor after its last use in the backward. On torch 2.11
    # AOTAutograd's runtime holds the incoming gradient (one output-sized tensor) until the
    # backward returns, which eager releases early: allowed there, and only there.
    c = compiled(name, EAGER)
    held = 0 if RUNTIME_RELEASES_TANGENTS else sum(
        o.numel() * o.element_size() for o in [c.fn(*c.args)] if isinstance(o, torch.Tensor))
    assert c.peak <= compiled(name, "eager").peak + held


@pytest.mark.parametrize("codegen", ["inductor", "eager"])
def test_budget_sweep_never_raises_the_peak(compiled, codegen):
    peaks = [compiled("gpt_block_manual", _fx(codegen=codegen, remat=_fx(budget=b))).peak for b in (1.0, 0.5, 0.0)]
    assert peaks[0] >= peaks[1] >= peaks[2], f"peak at budgets 1.0, 0.5, 0.0: {peaks}"
    assert peaks[2] < peaks[0], f"remat lowers a peak made of saved activations: {peaks}"


@pytest.mark.parametrize("name", SAMPLES)
def test_estimate_within_10_percent_of_measured_peak_eager_codegen(compiled, name):
    c = compiled(name, EAGER)
    assert abs(c.estimate - c.peak) <= 0.10 * c.peak, f"{name}: estimated {c.estimate} B, measured {c.peak} B"


@pytest.mark.parametrize("name", SAMPLES)
def test_estimate_within_10_percent_of_measured_peak_inductor(compiled, name):
    # the estimate models Inductor's fusion of pointwise chains (analysis.timeline, fused=True)
    c = compiled(name, INDUCTOR)
    assert abs(c.estimate - c.peak) <= 0.10 * c.peak, f"{name}: estimated {c.estimate} B, Inductor measured {c.peak} B"


# -- the boxed call --------------------------------------------------------------------------------


def test_releasing_call_frees_an_input_after_its_last_use():
    x_val = torch.randn(1000)
    ref = weakref.ref(x_val)
    seen = []

    def probe(t):
        seen.append(ref() is None)
        return t

    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    s = graph.call_function(torch.ops.aten.sum.default, (x,))
    graph.output((s, graph.call_function(probe, (y,))))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    args = [x_val, torch.randn(3)]
    del x_val
    out = releasing_call(gm)(args)
    assert args == [] and seen == [True]  # x was freed before probe ran, after its last use (sum)
    assert out[1].shape == (3,)


def test_inductor_compiles_fxmems_graphs_without_its_buffer_pool(monkeypatch):
    """fxmem turns Inductor's buffer pool off for its own compiles only (docs/architecture.md:
    the pool held a dead 24 MiB buffer on the measured peak of four GPT-2 blocks); in-place
    reuse stays on, and a plain torch.compile afterwards still gets Inductor's default."""
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    seen = []
    codegen = GraphLowering.codegen

    def recording(self, *args, **kwargs):
        seen.append((inductor_config.allow_buffer_reuse, inductor_config.inplace_buffers))
        return codegen(self, *args, **kwargs)

    monkeypatch.setattr(GraphLowering, "codegen", recording)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(4, 8)
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit skips codegen
        torch.compile(model, backend=fxmem.backend())(x).sum().backward()
    assert seen and all(s == (False, True) for s in seen), seen  # forward and backward
    assert inductor_config.allow_buffer_reuse is True  # nothing process-wide
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):  # a cache hit skips codegen
        seen.clear()
        torch._dynamo.reset()
        torch.compile(model.eval(), backend=fxmem.backend())(x)
    assert seen and all(s == (False, True) for s in seen), seen  # inference


def test_codegen_option_errors_name_the_key_and_choices():
    assert parse_options().codegen == "inductor"
    assert parse_options(codegen="eager").codegen == "eager"
    with pytest.raises(OptionError, match="codegen.*'inductor' \\| 'eager'"):
        parse_options(codegen="tvm")
    with pytest.raises(OptionError, match="codegen='eager'"):
        fxmem.backend(lower=True)
    fxmem.backend(lower=True, codegen="eager")


def test_budget_zero_never_peaks_above_budget_quarter_on_the_built_in_gpt():
    """The built-in GPT at fit's quick shape (2 layers, d 128, vocab 4096, B 4 × T 128, the
    chunked loss): budget 0.0's guard took a λ-ladder cut measured at 8.26 MiB where budget 0.25's
    polished cut measured 7.85 (the ladder holds only the hull's cuts). The guard now compares the
    cuts of the budgets above (remat.PEAK_BUDGETS) and estimates with Inductor's buffer reuse."""
    from fxmem.models.gpt import GPT, GPTConfig, example_batch

    class GPTLoss(torch.nn.Module):  # the step returns the loss only (the logits are no output)
        def __init__(self, gpt):
            super().__init__()
            self.gpt = gpt

        def forward(self, idx, targets):
            return self.gpt(idx, targets)[1]

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, d_model=128, n_head=4, block_size=128, vocab_size=4096)
    base = GPTLoss(GPT(cfg))
    idx, targets = example_batch(cfg, batch=4), example_batch(cfg, batch=4, seed=1)
    peaks = {}
    for budget in (0.25, 0.0):
        torch._dynamo.reset()
        model = copy.deepcopy(base).train()
        fn = torch.compile(model, backend=fxmem.backend(remat={"budget": budget}))

        def step():
            for p in model.parameters():
                p.grad = None
            fn(idx, targets).backward()

        step()
        peaks[budget] = training_step_peak(step).peak_bytes
    assert peaks[0.0] <= peaks[0.25], f"budget 0.0 peaks at {peaks[0.0]} B, budget 0.25 at {peaks[0.25]} B"


# -- Inductor's FX-graph cache ------------------------------------------------------------------------


def test_a_second_compile_is_served_by_inductors_cache_and_still_partitions():
    """A restarted run compiles the same model again: Inductor's on-disk cache serves fxmem's
    forward and backward, while fxmem's partition runs (explain records it) and a new budget,
    which recomputes, is compiled afresh."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor import utils as inductor_utils

    fresh_cache = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    s = sample("mlp")  # the cheapest compile: what is tested is the cache, not the model
    x = torch.randn(BATCH, *s.args[0].shape[1:], generator=torch.Generator().manual_seed(0))
    runs = []
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True):
        for options in ({}, {}, {"remat": {"budget": 0.0}}):
            torch._dynamo.reset()
            before = dict(counters["inductor"])
            model = copy.deepcopy(s.model).train()
            backend = recording_backend(**options)
            _loss(torch.compile(model, backend=backend)(x)).backward()
            cache = {k: counters["inductor"][k] - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
            runs.append((cache, backend.recorder, [p.grad for p in model.parameters()]))
    (first, rec1, grads1), (second, rec2, grads2), (zero, rec0, grads0) = runs
    assert first == {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 2}, first
    assert second == {"fxgraph_cache_hit": 2, "fxgraph_cache_miss": 0}, second
    assert rec2.partitions and rec2.timelines  # the partition ran again, with the same cut
    assert [p["saved"] for p in rec2.partitions] == [p["saved"] for p in rec1.partitions]
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert rec0.partitions[-1]["saved_bytes"] < rec1.partitions[-1]["saved_bytes"]  # budget 0 recomputes ...
    assert zero["fxgraph_cache_miss"] >= 1, zero  # ... and that split is compiled, not taken from the cache
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_backend_fxmem_is_loaded_from_autograds_cache_and_keyed_by_the_options():
    """``torch.compile(model, backend="fxmem")`` compiled again (a restarted run) loads the whole
    step from AOTAutograd's cache, as torch.compile does: no joint trace, no partition, no
    Inductor. So does a backend object with the same options (``fxmem.backend()``, the form the
    usage docs show first). Other options (a budget) are another entry, not the old split. A
    recording backend, whose recorder explain and tests read, still partitions every time."""
    import sys
    from unittest import mock

    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor import utils as inductor_utils

    backend_module = sys.modules["fxmem.backend"]
    fresh_cache = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    s = sample("mlp")  # the cheapest compile: what is tested is the cache, not the model
    x = torch.randn(BATCH, *s.args[0].shape[1:], generator=torch.Generator().manual_seed(0))
    runs = []
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        compiles = (("fxmem", {}), ("fxmem", {}), ("fxmem", {"remat": {"budget": 0.0}}),
                    (fxmem.backend(), None), (recording := recording_backend(), None))
        for backend, options in compiles:
            torch._dynamo.reset()
            before = dict(counters["aot_autograd"])
            model = copy.deepcopy(s.model).train()
            with mock.patch.object(backend_module, "partition", wraps=backend_module.partition) as partitions:
                _loss(torch.compile(model, backend=backend, options=options)(x)).backward()
            cache = {k: counters["aot_autograd"][k] - before.get(k, 0) for k in ("autograd_cache_hit", "autograd_cache_miss")}
            runs.append((cache, partitions.call_count, [p.grad for p in model.parameters()]))
    (first, parts1, grads1), (second, parts2, grads2), (zero, parts0, grads0), *objects = runs
    assert (first, parts1) == ({"autograd_cache_hit": 0, "autograd_cache_miss": 1}, 1), (first, parts1)
    assert (second, parts2) == ({"autograd_cache_hit": 1, "autograd_cache_miss": 0}, 0), (second, parts2)
    (obj, parts_obj, grads_obj), (rec, parts_rec, grads_rec) = objects
    assert (obj, parts_obj) == ({"autograd_cache_hit": 1, "autograd_cache_miss": 0}, 0), (obj, parts_obj)
    assert (rec["autograd_cache_hit"], parts_rec, len(recording.recorder.partitions)) == (0, 1, 1), (rec, parts_rec)
    for a, b, c, d in zip(grads1, grads2, grads_obj, grads_rec):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=0, rtol=0)
        torch.testing.assert_close(a, d, atol=0, rtol=0)
    assert (zero, parts0) == ({"autograd_cache_hit": 0, "autograd_cache_miss": 1}, 1), (zero, parts0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_step_whose_partition_warned_is_not_cached_so_the_warning_comes_again():
    """fxmem's promise: a graph it leaves unchanged is left with a warning that names the op —
    on every compile, a restarted run's too. A step whose partition warned is not put in
    AOTAutograd's cache (Inductor's FX-graph cache still serves its graphs)."""
    import sys
    import warnings
    from unittest import mock

    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor import utils as inductor_utils

    backend_module = sys.modules["fxmem.backend"]
    real_partition = backend_module.partition

    def warning_partition(*args, **kwargs):
        warnings.warn("fxmem: remat left op 'frobnicate' (node x_7) unchanged", UserWarning, stacklevel=1)
        return real_partition(*args, **kwargs)

    fresh_cache = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    s = sample("mlp")
    x = torch.randn(BATCH, *s.args[0].shape[1:], generator=torch.Generator().manual_seed(0))
    runs = []
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True), \
            mock.patch.object(backend_module, "partition", warning_partition):
        for _ in range(2):
            torch._dynamo.reset()
            before = dict(counters["aot_autograd"])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _loss(torch.compile(copy.deepcopy(s.model).train(), backend="fxmem")(x)).backward()
            cache = {k: counters["aot_autograd"][k] - before.get(k, 0) for k in ("autograd_cache_hit", "autograd_cache_saved")}
            runs.append((cache, [str(w.message) for w in caught if "frobnicate" in str(w.message)]))
    for cache, said in runs:
        assert cache == {"autograd_cache_hit": 0, "autograd_cache_saved": 0}, runs
        assert said == ["fxmem: remat left op 'frobnicate' (node x_7) unchanged"], runs


def test_the_cache_identity_names_the_options_and_the_sources():
    """What AOTAutograd's key gets from fxmem before the partition runs: the options and the
    thread count (the identity), fxmem's sources (the partitioner's key hashes them); the
    partitioner pickles as its key, the same in every process."""
    import pickle

    from fxmem.codegen import fxmem_identity, make_partitioner

    default, budget = fxmem_identity(parse_options({})), fxmem_identity(parse_options({"remat": {"budget": 0.5}}))
    assert default == fxmem_identity(parse_options({})) and default != budget
    assert f"threads={torch.get_num_threads()}" in default
    assert pickle.loads(pickle.dumps(make_partitioner(lambda *a, **k: (), default))) != \
        pickle.loads(pickle.dumps(make_partitioner(lambda *a, **k: (), budget)))


def test_the_cache_key_names_the_recomputed_nodes():
    """Two partitions with the same code but different nodes recomputed (the tag the fusion guard
    reads) are two cache entries; the partitioner pickles as its key, the same in every process."""
    import pickle

    from fxmem.codegen import make_partitioner, partition_cache_key
    from fxmem.passes.base import RECOMPUTED_KEY

    def graph() -> fx.GraphModule:
        return fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()))

    plain, tagged = graph(), graph()
    next(n for n in tagged.graph.nodes if n.op == "call_module" and n.target == "1").meta[RECOMPUTED_KEY] = True
    assert plain.code == tagged.code
    assert partition_cache_key([plain]) == partition_cache_key([graph()])
    assert partition_cache_key([plain]) != partition_cache_key([tagged])
    partitioner = make_partitioner(lambda gm, inputs, **kwargs: (plain, tagged))
    partitioner(graph(), [], compiler="inductor")
    assert pickle.loads(pickle.dumps(partitioner)) == partitioner.uuid() == partition_cache_key([plain, tagged])


def test_an_inference_compile_is_cached_and_keyed_by_fxmems_sources(monkeypatch):
    """An inference compile has no partitioner to carry fxmem's sources into Inductor's FX-graph
    cache key: a cache written by another fxmem (another fusion guard, other fake outputs) must
    not serve it. The same sources hit; changed sources miss; a user's own keyed post-grad pass
    still runs and stays in the key."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor import utils as inductor_utils
    from torch._inductor.custom_graph_pass import CustomGraphPass

    import fxmem.codegen as codegen

    class UsersPass(CustomGraphPass):
        calls = 0

        def __call__(self, graph: fx.Graph) -> None:
            UsersPass.calls += 1

        def uuid(self) -> str:
            return "users-pass-1"

    fresh_cache = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(4, 16)
    runs = []
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True), torch.no_grad():
        for sources, users in (("a", None), ("a", None), ("b", None), ("b", UsersPass())):
            monkeypatch.setattr(codegen, "_package_sources_digest", lambda s=sources: s)
            torch._dynamo.reset()
            before = dict(counters["inductor"])
            with inductor_config.patch(post_grad_custom_post_pass=users):
                torch.testing.assert_close(torch.compile(model, backend="fxmem")(x), model(x))
            runs.append({k: counters["inductor"][k] - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")})
    assert runs == [{"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 1}, {"fxgraph_cache_hit": 1, "fxgraph_cache_miss": 0},
                    {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 1}, {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 1}], runs
    assert UsersPass.calls == 1
    assert inductor_config.post_grad_custom_post_pass is None  # nothing left behind
