"""The ``lower`` pass: regions found and ranked, kernels equal eager, training, auto on CPU.

Triton reads ``TRITON_INTERPRET`` when it is first imported (Dynamo imports it), so it is set at
the very top of this module. When an earlier test module already imported Triton without it, the
tests that run kernels are skipped in-process and :func:`test_in_interpreter_subprocess` runs this
file again in a fresh interpreter with the variable set.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxmem  # noqa: E402
from fxmem.backend import FxmemBackend  # noqa: E402
from fxmem.config import LowerConfig, parse_options  # noqa: E402
from fxmem.kernels import codegen  # noqa: E402
from fxmem.passes import lower as lower_mod  # noqa: E402
from fxmem.testing import assert_equivalent  # noqa: E402
from fxmem.testing.interpreter import rerun_under_interpreter  # noqa: E402

INTERPRETER = codegen.interpreter_enabled()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="Triton was imported without TRITON_INTERPRET=1 "
                                       "in this process; test_in_interpreter_subprocess runs these")
ATOL = RTOL = 1e-5


def test_in_interpreter_subprocess():
    rerun_under_interpreter(__file__, interpreter_on=INTERPRETER, timeout=600)


class Fn(nn.Module):
    def __init__(self, fn, d: int = 0):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(d) if d else None

    def forward(self, *xs):
        return self.fn(self, *xs)


def _explain(model, *args, **options):
    with torch.no_grad():
        return fxmem.explain(model, *args, lower=options.pop("lower", True), strict=True, **options)


# Each case is a small chain around one ATen op the kernels implement; the chain is what makes
# fusion save bytes (a lone op is already one kernel in eager and is left alone).
CASES = {
    "relu": lambda m, x: torch.relu(x * 2.0) + 1.0,
    "gelu": lambda m, x: F.gelu(x) * 1.5 - 0.25,
    "gelu_tanh": lambda m, x: F.gelu(x, approximate="tanh") * 1.5,
    "silu_sigmoid_tanh": lambda m, x: F.silu(x) + torch.sigmoid(x) * torch.tanh(x),
    "exp_log_sqrt_rsqrt": lambda m, x: torch.exp(x) + torch.log(x.abs() + 1) + torch.sqrt(x.abs()) * torch.rsqrt(x.abs() + 1),
    "pow_reciprocal_neg": lambda m, x: (-(x.pow(2) + x.pow(3))) / (x.abs() + 1) + x.abs().pow(0.5),
    "clamp_min_max": lambda m, x: torch.clamp(x, -0.5, 0.5) + torch.maximum(x, -x) - torch.minimum(x, x * 0.5),
    "where_compare": lambda m, x: torch.where(x > 0, x, x * 0.1) + (x <= 0.2).float() + (x == x).float(),
    "masked_fill": lambda m, x: x.masked_fill(x < -0.5, float("-inf")).softmax(-1) * 2.0,
    "softmax_chain": lambda m, x: F.softmax(x * 0.5, dim=-1) + 1.0,
    "manual_softmax": lambda m, x: (lambda e: e / e.sum(-1, keepdim=True))((x - x.amax(-1, keepdim=True)).exp()),
    "log_softmax": lambda m, x: F.log_softmax(x + 1.0, dim=-1) * 2.0,
    "layer_norm_relu": lambda m, x: torch.relu(m.norm(x * 2.0)),
    "rms_norm": lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * 1.5,
    "softmax_layer_norm_relu": lambda m, x: torch.relu(m.norm(torch.softmax(x, -1))),
    "to_bf16_and_back": lambda m, x: (x * 3.0).to(torch.bfloat16).to(torch.float32) + 1.0,
}


@needs_interpreter
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_op_equals_eager(name):
    torch.manual_seed(0)
    model = Fn(CASES[name], 12)
    nn.init.normal_(model.norm.weight)
    nn.init.normal_(model.norm.bias)
    x = torch.randn(2, 3, 12)
    report = _explain(model, x)
    assert report.kernels, f"{name}: nothing lowered\n{report}"
    gm = report.module.graph_module
    assert any(n.target is torch.ops.fxmem.fused_kernel.default for n in gm.graph.nodes)
    tol = 1e-2 if "bf16" in name else ATOL
    torch.testing.assert_close(report.module(x), model(x), atol=tol, rtol=tol)


@needs_interpreter
def test_looped_reductions_through_the_pass():
    model = Fn(CASES["softmax_layer_norm_relu"], 12)
    x = torch.randn(2, 3, 12)
    report = _explain(model, x, lower={"persistent_max": 4})
    (kernel,) = report.kernels
    assert "# form: looped" in kernel.source
    torch.testing.assert_close(report.module(x), model(x), atol=ATOL, rtol=RTOL)


@needs_interpreter
def test_report_lists_kernels_ranked_with_bytes():
    model = Fn(lambda m, x, y: (torch.softmax(x * 2.0, -1) + 1.0, torch.relu(y * 3.0) - 1.0), 0)
    x, y = torch.randn(2, 4, 16), torch.randn(2, 4)
    report = _explain(model, x, y)
    assert len(report.kernels) == 2
    saved = [k.bytes_saved for k in report.kernels]
    assert saved == sorted(saved, reverse=True) and all(s > 0 for s in saved)
    k = report.kernels[0]
    assert k.nodes_replaced and k.source.startswith("#") and "@triton.jit" in k.source
    assert k.name in str(report)
    (row,) = [r for r in report.records if r.name == "lower"]
    assert row.stats["lowered"] == 2 and row.stats["traffic_bytes_saved"] == sum(saved)
    assert row.stats["intermediate_bytes"] > 0
    # max_kernels keeps the best one, min_bytes drops what saves less
    assert [k.name for k in _explain(model, x, y, lower={"max_kernels": 1}).kernels] == [k.name]
    assert len(_explain(model, x, y, lower={"min_bytes": saved[0]}).kernels) == 1
    assert not _explain(model, x, y, lower={"min_bytes": saved[0] + 1}).kernels


def test_lone_fused_ops_are_left_alone():
    # a lone softmax is already one kernel: fusion saves nothing, nothing is lowered
    model = Fn(lambda m, x: torch.softmax(x, -1), 0)
    report = _explain(model, torch.randn(2, 8), lower={"mode": "on"}) if INTERPRETER else None
    if report is not None:
        assert not report.kernels
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: torch.softmax(x, -1))(torch.randn(2, 8))
    plans = [lower_mod.plan_region(r, next(iter(reversed(gm.graph.nodes)))) for r in lower_mod.find_regions(gm)]
    assert len(plans) == 1 and plans[0].bytes_saved == 0


def test_regions_never_form_a_cycle():
    # b = exp(a); c = mm(b, b); d = b + c: d cannot join b's region (c depends on it)
    def f(x):
        b = torch.exp(x * 2.0)
        c = b @ b
        return b + c

    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(torch.randn(4, 4))
    regions = lower_mod.find_regions(gm)
    names = [[n.name for n in r.nodes] for r in regions]
    assert ["mul", "exp"] in names and all("add" not in r or "exp" not in r for r in names)


def _hostile_graph():
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: torch.relu(x * 2.0) + 1.0)(torch.randn(3, 5))
    hostile = 'evil"); import os; os.system("echo pwned") #\n'
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.name = hostile + node.name  # names come from the graph; treat them as hostile
    return gm, hostile


@needs_interpreter
def test_hostile_node_names_are_sanitized():
    gm, hostile = _hostile_graph()
    result = lower_mod.lower(gm, LowerConfig(mode="on"))
    (kernel,) = result.stats["kernels"]
    assert "os.system" not in kernel.source and '"echo' not in kernel.source
    compile(kernel.source, "k.py", "exec")
    assert kernel.name.isidentifier()
    x = torch.randn(3, 5)
    torch.testing.assert_close(result.gm(x)[0] if isinstance(result.gm(x), (tuple, list)) else result.gm(x),
                               torch.relu(x * 2.0) + 1.0)


def test_auto_is_a_cheap_no_op_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # if the pass tried to import Triton now, the import would fail
    monkeypatch.setitem(sys.modules, "triton", None)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: torch.relu(x * 2.0) + 1.0)(torch.randn(3, 5))
    before = gm.code
    start = time.perf_counter()
    result = lower_mod.lower(gm, LowerConfig())
    assert time.perf_counter() - start < 0.05
    assert result.changed is False and result.gm.code == before
    assert "TRITON_INTERPRET" in result.stats["reason"]
    # the default options mean auto
    assert parse_options({}).lower.mode == "auto"


def test_forced_on_cpu_without_the_interpreter_is_skipped_with_a_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(codegen, "interpreter_enabled", lambda: False)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: torch.relu(x * 2.0) + 1.0)(torch.randn(3, 5))
    with pytest.raises(lower_mod.UnsupportedGraph, match="TRITON_INTERPRET"):
        lower_mod.lower(gm, LowerConfig(mode="on"))


def test_options_are_parsed():
    assert parse_options({"lower": False}).lower.mode == "off"
    cfg = parse_options({"lower": {"max_kernels": 2, "min_bytes": 10, "persistent_max": 64}}).lower
    assert (cfg.mode, cfg.max_kernels, cfg.min_bytes, cfg.persistent_max) == ("on", 2, 10, 64)
    with pytest.raises(ValueError, match="lower"):
        parse_options({"lower": {"blocks": 3}})


def _train(model, args, **options):
    backend = FxmemBackend(parse_options({"lower": True, "codegen": "eager", "strict": True, **options}))
    compiled = torch.compile(model, backend=backend)
    assert_equivalent(model, compiled, args, grads=True, atol=ATOL, rtol=RTOL)
    return backend.recorder


@needs_interpreter
def test_training_gpt_block_forward_and_backward_lowered():
    # the sample block's shapes, halved: the interpreter runs one Python loop per program
    from fxmem.models.gpt import Block, GPTConfig

    block = Block(GPTConfig(d_model=32, n_head=2, block_size=8, n_layer=1, vocab_size=64))
    recorder = _train(block, (torch.randn(1, 8, 32),))
    graphs = {k.graph.split("#")[0] for k in recorder.kernels}
    assert graphs == {"forward", "backward"}, [(k.graph, k.nodes_replaced) for k in recorder.kernels]
    replaced = {n for k in recorder.kernels for n in k.nodes_replaced}
    assert {"_softmax", "_softmax_backward_data", "native_layer_norm_1"} <= replaced


@needs_interpreter
def test_training_backward_ops_equal_eager():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 12)
            self.norm = nn.LayerNorm(12, elementwise_affine=False)

        def forward(self, x):
            h = self.fc(x)
            a = F.gelu(h) * 0.5 + F.silu(h) * torch.sigmoid(h) + torch.tanh(h) + torch.relu(h) * 2.0
            b = F.log_softmax(a * 0.5, -1) * 0.1 + torch.softmax(a + 1.0, -1)
            return self.norm(b * 2.0) + b

    model = Net()
    # remat=False pins default_partition's backward, which holds every backward op listed below;
    # fxmem's remat recomputes the softmax in backward and the region there is formed differently
    recorder = _train(model, (torch.randn(2, 3, 12),), remat=False)
    ops = {n.split("_", 1)[0] for k in recorder.kernels if k.graph.startswith("backward") for n in k.nodes_replaced}
    assert recorder.kernels and ops
    bw_nodes = {n for k in recorder.kernels if k.graph.startswith("backward") for n in k.nodes_replaced}
    for op in ("gelu_backward", "silu_backward", "sigmoid_backward", "tanh_backward", "threshold_backward",
               "_softmax_backward_data", "_log_softmax_backward_data", "native_layer_norm_backward"):
        assert any(n.startswith(op) for n in bw_nodes), (op, sorted(bw_nodes))


@needs_interpreter
@pytest.mark.parametrize("name", ["mlp", "gpt_block_sdpa", "tied_embeddings", "shared_parameters", "conv_norm"])
def test_sample_models_inference(name):
    from fxmem.testing import sample

    s = sample(name)
    s.model.eval()
    with torch.no_grad():
        report = fxmem.explain(s.model, *s.args, lower=True, strict=True)
        torch.testing.assert_close(report.module(*s.args), s.model(*s.args), atol=ATOL, rtol=RTOL)


@needs_interpreter
def test_random_programs_equal_eager():
    from hypothesis import HealthCheck, given, settings

    from fxmem.testing.strategies import random_programs

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(random_programs(max_ops=8))
    def check(program):
        module, x = program
        with torch.no_grad():
            report = fxmem.explain(module, x, lower=True, strict=True)
            torch.testing.assert_close(report.module(x), module(x), atol=ATOL, rtol=RTOL)

    check()


@needs_interpreter
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_hf_models_inference(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
            attn_implementation="eager"))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    model.eval()
    kwargs = {"input_ids": torch.randint(0, 64, (1, 8)), "use_cache": False}
    with torch.no_grad():
        report = fxmem.explain(model, kwargs=kwargs, lower=True, strict=True)
        assert report.kernels
        torch.testing.assert_close(report.module(**kwargs)[0], model(**kwargs)[0], atol=ATOL, rtol=RTOL)


def test_softmax_layer_norm_relu_is_one_region():
    def f(x, w, b):
        return torch.relu(F.layer_norm(torch.softmax(x * 2.0, -1), (8,), w, b))

    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(torch.randn(2, 8), torch.randn(8), torch.randn(8))
    regions = lower_mod.find_regions(gm)
    assert len(regions) == 1
    assert [n.name for n in regions[0].nodes] == ["mul", "_softmax", "native_layer_norm", "getitem", "getitem_1",
                                                   "getitem_2", "relu"]
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: torch.softmax(torch.softmax(x, -1), -1) + 1)(torch.randn(2, 8))
    assert len(lower_mod.find_regions(gm)) == 1  # a softmax's output is one value per element


def test_auto_lowers_cuda_graphs():
    # a graph traced with fake CUDA tensors: "auto" lowers it (nothing is launched here)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, 8, device="cuda")
        gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: torch.relu(t * 2.0) + 1.0, tracing_mode="fake")(x)
    assert lower_mod.can_run(gm, LowerConfig()) == (True, "CUDA")
    result = lower_mod.lower(gm, LowerConfig())
    (kernel,) = result.stats["kernels"]
    calls = [n for n in result.gm.graph.nodes if n.target is torch.ops.fxmem.fused_kernel.default]
    assert result.changed and len(calls) == 1
    assert calls[0].meta["val"][0].device.type == "cuda"
    assert "# form: pointwise" in kernel.source


def test_can_lower():
    from fxmem.passes.lower_rules import can_lower

    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: torch.mm(torch.softmax(x, 0), x).sum(-1, keepdim=True))(
        torch.randn(4, 4))
    verdict = {n.name: can_lower(n) for n in gm.graph.nodes if n.op == "call_function"}
    # softmax over dim 0 is not a row reduction; mm never fuses; a last-dim keepdim sum does
    assert verdict == {"_softmax": False, "mm": False, "sum_1": True}


@needs_interpreter
def test_kernels_fall_back_to_aten_on_cpu_without_the_interpreter(monkeypatch):
    model = Fn(CASES["softmax_layer_norm_relu"], 12)
    x = torch.randn(2, 3, 12)
    report = _explain(model, x)
    assert report.kernels
    monkeypatch.setattr(codegen, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(codegen.GeneratedKernel, "launch", lambda self, inputs: pytest.fail("kernel launched"))
    torch.testing.assert_close(report.module(x), model(x), atol=ATOL, rtol=RTOL)


@needs_interpreter
def test_layer_norm_backward_with_frozen_affine():
    # weight and bias do not require grad: LN backward computes the input gradient only, yet
    # still receives them (the bias is unused by the rule but stays a kernel argument)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.norm.requires_grad_(False)

        def forward(self, x):
            return torch.relu(self.norm(self.fc(x) * 2.0)) * 3.0

    recorder = _train(Net(), (torch.randn(2, 3, 8),))
    bw = [n for k in recorder.kernels if k.graph.startswith("backward") for n in k.nodes_replaced]
    assert any(n.startswith("native_layer_norm_backward") for n in bw), bw
