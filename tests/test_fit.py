"""fxmem.fit: estimates against measured peaks, choices that fit, lossy options only when allowed,
and a clear error for an impossible limit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxmem
from fxmem.config import parse_options
from fxmem.fit import FitError, measure_inference, measure_options, parse_memory
from fxmem.models.gpt import GPT, GPTConfig, example_batch

TOLERANCE = 0.10  # the target: estimates within 10% of measured peaks


class LossOnly(nn.Module):
    """A training step's module: the loss alone (the logits are then no output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model(idx, targets)[1]


CFG = GPTConfig(n_layer=1, d_model=64, n_head=4, block_size=64, vocab_size=4096)


@pytest.fixture(scope="module")
def step():
    torch.manual_seed(0)
    model = LossOnly(GPT(CFG)).train()
    args = (example_batch(CFG, batch=4), example_batch(CFG, batch=4, seed=1))
    return model, args


@pytest.fixture(scope="module")
def fitted(step):
    """One fit (one trace) for the module; other limits are chosen by ``refit``."""
    model, args = step
    # remat off / free / budget 0 × chunk on / off
    return fxmem.fit(model, *args, memory="1GiB", budgets=(0.0,))


def test_parse_memory_units_and_errors():
    assert parse_memory("12GiB") == 12 * 2**30
    assert parse_memory("500 MB") == 500 * 10**6
    assert parse_memory(1.5e9) == 1_500_000_000
    for bad in ("lots", "-1GiB", 0, True, "3 parsecs"):
        with pytest.raises(FitError, match="accepted"):
            parse_memory(bad)


def test_every_candidate_is_options_the_backend_accepts(fitted):
    assert {c.label for c in fitted.candidates} == {"remat off", "remat free", "remat 0.0", "remat off, no chunk",
                                                    "remat free, no chunk", "remat 0.0, no chunk"}
    for cand in fitted.candidates:
        parse_options(cand.options)
        assert not cand.error, cand.error
    # the generous limit takes the cheapest candidate of all
    assert fitted.chosen.cost == min(c.cost for c in fitted.candidates)
    assert "est. peak" in str(fitted) and "*" in fitted.table


def test_tight_limit_chooses_less_memory_at_more_cost(fitted):
    smallest = min(fitted.candidates, key=lambda c: c.estimate)
    limit = int(smallest.estimate / (1 - fitted.headroom)) + 1
    tight = fitted.refit(limit)
    assert tight.estimate <= limit * (1 - tight.headroom)
    assert tight.chosen.cost >= fitted.chosen.cost
    assert tight.estimate < fitted.estimate


def _measure_choice_just_above(step, fitted, candidate):
    """Refit at a limit just above ``candidate``'s estimate (it must be the choice), then compile
    and measure that choice once."""
    model, args = step
    limit = int(candidate.estimate / (1 - fitted.headroom)) + 1
    choice = fitted.refit(limit)
    assert choice.chosen.label == candidate.label
    torch._dynamo.reset()
    return choice, limit, measure_options(model, *args, options=choice.options, steps=1)


@pytest.fixture(scope="module")
def measured_choice(step, fitted):
    """The choice for a limit just above the cheapest candidate's estimate, compiled and measured once."""
    return _measure_choice_just_above(step, fitted, min(fitted.candidates, key=lambda c: c.cost))


@pytest.fixture(scope="module")
def measured_tight(step, fitted):
    """The tightest limit fit can answer (just above its smallest estimate): the choice is the
    smallest candidate (here the chunked loss with remat), compiled and measured once."""
    return _measure_choice_just_above(step, fitted, min(fitted.candidates, key=lambda c: c.estimate))


@pytest.fixture(scope="module")
def measured_recompute(step, fitted):
    """``remat 0.0, no chunk``: the backward recomputes the ``[N, V]`` logits, and the tied head's
    weight gradient (one ``addmm`` with the embedding's, at the end) keeps their gradient alive
    through the whole backward — estimated at 0.74 of measured before the timeline modelled it."""
    return _measure_candidate(step, fitted, "remat 0.0, no chunk")


def _measure_candidate(step, fitted, label):
    """The candidate named ``label``, and its options compiled and measured once."""
    model, args = step
    cand = next(c for c in fitted.candidates if c.label == label)
    torch._dynamo.reset()
    return cand, measure_options(model, *args, options=cand.options, steps=1)


def test_recomputed_logits_estimate_within_tolerance(measured_recompute):
    cand, measured = measured_recompute
    assert abs(cand.estimate / measured["peak_bytes"] - 1) <= TOLERANCE, (cand.estimate, measured)


@pytest.fixture(scope="module")
def measured_bf16_unchunked(step):
    """``precision="bf16"`` with the loss unchunked: the backward's fp32 logits gradient and its two
    bf16 casts are one Inductor kernel (three ``[N, V]`` outputs beside the recomputed logits);
    estimated at 0.69–0.92 of measured before the timeline modelled casts as Inductor does."""
    model, args = step
    fitted = fxmem.fit(model, *args, memory="1GiB", allow=["precision"], budgets=())
    return _measure_candidate(step, fitted, "remat off, bf16, no chunk")


def test_bf16_unchunked_estimate_within_tolerance(measured_bf16_unchunked):
    cand, measured = measured_bf16_unchunked
    assert abs(cand.estimate / measured["peak_bytes"] - 1) <= TOLERANCE, (cand.estimate, measured)


@pytest.mark.parametrize("which", ["measured_choice", "measured_tight"])
def test_choice_fits_when_measured(which, request):
    choice, limit, measured = request.getfixturevalue(which)
    assert measured["peak_bytes"] <= limit, (choice.options, measured, limit)


@pytest.mark.parametrize("which", ["measured_choice", "measured_tight"])
def test_estimate_within_tolerance_of_measured(which, request):
    """The issue's target: the whole step's estimate (parameters, batch, activations, gradients,
    the backward's transients, the chunked loss's workspace) within 10% of the measured peak —
    unchunked (the logits and their gradient) and chunked (the loss op's chunks)."""
    choice, _, measured = request.getfixturevalue(which)
    assert abs(choice.estimate / measured["peak_bytes"] - 1) <= TOLERANCE, (choice.chosen.label, choice.estimate,
                                                                           measured)


def test_impossible_limit_names_the_smallest_estimate_and_what_it_takes(fitted):
    smallest = min(c.estimate for c in fitted.candidates)
    with pytest.raises(FitError) as err:
        fitted.refit(smallest // 2)
    message = str(err.value)
    assert "smallest estimate" in message and "It would take" in message
    assert "a limit of at least" in message and "options=" in message
    assert "allow=['precision']" in message  # training: what was not tried because it was not allowed


def test_bad_arguments_raise_naming_what_is_accepted(step):
    model, args = step
    with pytest.raises(FitError, match="accepted"):
        fxmem.fit(model, *args, memory="1GiB", mode="serving")
    with pytest.raises(FitError, match="inference graphs only"):
        fxmem.fit(model, *args, memory="1GiB", allow=["int8"])
    with pytest.raises(FitError, match="accepted"):
        fxmem.fit(model, *args, memory="1GiB", allow=["magic"])
    with pytest.raises(FitError, match="mesh"):
        fxmem.fit(model, *args, memory="1GiB", mesh={"pp": 2})
    with pytest.raises(FitError, match="hold_outputs.*accepted"):
        fxmem.fit(model, *args, memory="1GiB", hold_outputs="loss")


@pytest.fixture(scope="module")
def logits_step():
    """The built-in GPT as a user calls it, unwrapped: it returns its logits beside the loss."""
    torch.manual_seed(0)
    model = GPT(CFG).train()
    args = (example_batch(CFG, batch=4), example_batch(CFG, batch=4, seed=1))
    held = fxmem.fit(model, *args, memory="1GiB", budgets=())
    dropped = fxmem.fit(model, *args, memory="1GiB", budgets=(), hold_outputs=False)
    return model, args, held, dropped


def test_a_model_returning_its_logits_is_estimated_as_the_backend_runs_it(logits_step):
    """The backend detaches logits returned beside a chunked loss (fxmem.detached_logits); fit's
    joint graph did not, and counted a tangent for them — a [B, T, V] gradient the real step
    never allocates (the estimate was 1.47 of the measured peak)."""
    model, args, held, _ = logits_step
    torch._dynamo.reset()
    measured = measure_options(model, *args, options=held.options, steps=1)["peak_bytes"]
    assert abs(held.estimate / measured - 1) <= TOLERANCE, (held.estimate, measured)


def test_hold_outputs_false_estimates_a_loop_that_keeps_only_the_loss(logits_step):
    """``hold_outputs=False`` (HF's Trainer: ``loss = model(**batch).loss``): the logits die before
    the backward. Without the chunked loss the step's peak is in the backward, so holding them or
    not moves it by their size, measured and estimated alike."""
    model, args, held, dropped = logits_step
    assert held.hold_outputs and not dropped.hold_outputs and not dropped.refit("1GiB").hold_outputs
    label = "remat off, no chunk"
    options = next(c for c in held.candidates if c.label == label).options
    estimates = {hold: next(c for c in fitted.candidates if c.label == label).estimate
                 for hold, fitted in ((True, held), (False, dropped))}
    torch._dynamo.reset()
    measured = {hold: measure_options(model, *args, options=options, steps=1, hold_outputs=hold)["peak_bytes"]
                for hold in (False, True)}
    logits = 4 * CFG.block_size * CFG.vocab_size * 4
    assert measured[True] - measured[False] >= logits // 2, measured
    for hold in (True, False):
        assert abs(estimates[hold] / measured[hold] - 1) <= TOLERANCE, (hold, estimates, measured)


def test_an_hf_causal_lm_fits_as_built_with_its_kv_cache_on():
    """``*ForCausalLM`` built from a config has ``use_cache=True``; Dynamo cannot trace the cache's
    creation on fit's meta twin, so fit leaves it off (``without_kv_cache``) — it once failed with
    a TorchRuntimeError from inside Dynamo. An explicit ``use_cache=True`` is a clear FitError."""
    from fxmem.testing.hf_zoo import build

    case = build("qwen2")
    assert case.model.config.use_cache
    fitted = fxmem.fit(case.model.eval(), kwargs={"input_ids": case.inputs["input_ids"]}, memory="1GiB",
                       mode="inference")
    assert fitted.estimate > 0
    with pytest.raises(FitError, match="use_cache=False"):
        fxmem.fit(case.model, kwargs={**case.inputs, "use_cache": True}, memory="1GiB", budgets=())


class Wide(nn.Module):
    """Inference: weights dominate (4 MiB fp32), activations are tiny."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(512, 1024)
        self.down = nn.Linear(1024, 512)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_lossy_options_are_chosen_only_when_allowed():
    model, x = Wide().eval(), torch.randn(2, 512)
    lossless = fxmem.fit(model, x, memory="64MiB", mode="inference", allow=["int8", "quantize", "prune"])
    assert lossless.options == {}  # room enough: nothing lossy, whatever is allowed
    fp32_weights = sum(p.numel() * 4 for p in model.parameters())
    # below the fp32 weights: int8's codes (1 MiB) fit, with the CPU path's fp32 dequantized
    # weight (2 MiB, the larger layer's) beside them while its matmul runs
    limit = fp32_weights * 0.95
    with pytest.raises(FitError, match="allow="):
        fxmem.fit(model, x, memory=limit, mode="inference")
    small = fxmem.fit(model, x, memory=limit, mode="inference", allow=["int8"])
    assert set(small.options) == {"int8"} and small.estimate <= limit
    # nothing lossy but int8 was tried (chunking the MLP is lossless, and tried too)
    assert all(set(c.options) - {"chunk"} <= {"int8"} for c in small.candidates)
    assert any(c.options == {"chunk": {"mlp": True}} for c in small.candidates)


INFERENCE_TOLERANCE = 0.05  # measured: 0.99–1.01 on the benchmark's models (docs/fit.md, "Calibration")


def test_inference_choice_fits_when_measured_and_estimate_is_close():
    """Inference: the choice under a limit that only int8 meets measures within it (the weights
    the int8 pass leaves, counted from its tensors, plus the batch and a compiled no-grad
    forward's peak), and the estimate is within tolerance of that measurement."""
    torch.manual_seed(0)
    model, x = Wide().eval(), torch.randn(2, 512)
    fp32_weights = sum(p.numel() * 4 for p in model.parameters())
    limit = int(fp32_weights * 0.95)
    choice = fxmem.fit(model, x, memory=limit, mode="inference", allow=["int8"])
    assert set(choice.options) == {"int8"}
    torch._dynamo.reset()
    measured = measure_inference(model, x, options=choice.options, steps=1)
    assert measured["peak_bytes"] <= limit, (measured, limit)
    assert measured["weights_bytes"] < fp32_weights / 3  # int8 codes and scales, really
    assert abs(choice.estimate / measured["peak_bytes"] - 1) <= INFERENCE_TOLERANCE, (choice.estimate, measured)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_cpu_convolutions_estimate_inductors_layout_copies_and_onednn_workspace(mode):
    """A conv net on the CPU: Inductor lays it out channels-last, copying the weights and the
    input (freed after each convolution in inference, saved for the backward in training), and
    oneDNN reorders each 3×3 weight and takes a scratchpad inside the op. Counted, the estimate
    is the allocator's peak to within 1% (it was 0.78 of it in inference without them)."""
    from fxmem.testing.samples import conv_norm

    sample = conv_norm()
    model = sample.model.eval() if mode == "inference" else sample.training_module()
    fitted = fxmem.fit(model, *sample.args, memory="1GiB", mode=mode, budgets=())
    torch._dynamo.reset()
    measure = measure_inference if mode == "inference" else measure_options
    measured = measure(model, *sample.args, options=fitted.options, steps=1)["peak_bytes"]
    assert abs(fitted.estimate / measured - 1) <= 0.01, (fitted.estimate, measured, fitted.chosen.parts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_estimates_within_tolerance_of_max_memory_allocated():
    """On CUDA (benchmarks/gpu/run_all.sh's gpu_tests part): the built-in GPT step's estimates against
    ``max_memory_allocated`` for fit's choice and the extremes of remat (off, budget 0). Not yet
    run on a GPU when written (docs/fit.md, "Not done": Inductor's Triton kernels fuse
    differently from its CPU code, and the chunked loss takes its Triton kernel there)."""
    torch.manual_seed(0)
    model = LossOnly(GPT(CFG)).cuda().train()
    args = (example_batch(CFG, batch=4).cuda(), example_batch(CFG, batch=4, seed=1).cuda())
    fitted = fxmem.fit(model, *args, memory="64GiB", budgets=(0.0,))
    wanted = [fitted.options, {"remat": False}, {"remat": {"budget": 0.0}}]
    ratios = {}
    for options in wanted:
        (cand,) = [c for c in fitted.candidates if c.options == options]
        torch._dynamo.reset()
        measured = measure_options(model, *args, options=options, steps=1, device="cuda")["peak_bytes"]
        ratios[str(options)] = cand.estimate / measured
    assert all(abs(r - 1) <= TOLERANCE for r in ratios.values()), ratios


def test_world_size_divides_state_per_rank():
    model, x = Wide().eval(), torch.randn(2, 512)
    one = fxmem.fit(model, x, memory="64MiB", mode="inference")
    sharded = fxmem.fit(model, x, memory="64MiB", mode="inference", world_size=4)
    assert sharded.chosen.parts["parameters"] == one.chosen.parts["parameters"] // 4
    assert sharded.chosen.parts["activations"] == one.chosen.parts["activations"]  # not divided: an upper bound
    assert sharded.world_size == 4 and "per rank" in str(sharded)


def test_cli_fit_prints_the_choice_and_fails_clearly(capsys):
    from fxmem.cli import main

    # MLP 32 → 64 → 64 → 16: 28.6 KiB of fp32 weights (29.8 KiB estimated in all), 8.1 KiB in int8
    # (25.4 KiB in all: the CPU path dequantizes a 16 KiB weight to fp32 for its matmul); a
    # 30 KiB limit (27 KiB after the 10% headroom) needs int8
    args = ["fit", "fxmem.testing.samples:MLP", "--mode", "inference", "--shape", "2,32"]
    assert main([*args, "--memory", "30KiB", "--allow", "int8"]) == 0
    out = capsys.readouterr().out
    assert "options={'int8': 'weight_only'}" in out and "backend='fxmem'" in out
    assert main([*args, "--memory", "30KiB"]) == 1
    assert "smallest estimate" in capsys.readouterr().err


def test_mesh_with_tp_takes_per_rank_state_from_the_shard_plan():
    # issue 15: with tp > 1 fit's per-rank parameters are fxmem.shard.plan's split (replicated
    # layers whole, the vocabulary split or not, FSDP2 padding), not an even ÷ dp·tp, and the
    # result says so; tensor parallelism alone gathers no FSDP unit
    from fxmem.testing import scale
    model, vocab = scale.build("gpt_untied", layers=2)
    x, _ = scale.batch(vocab, 2)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    for mesh in ({"tp": 2}, {"dp": 2, "tp": 2}):
        plan = fxmem.shard.plan(model, x, mesh=mesh)
        r = fxmem.fit(model, x, memory="1GiB", mode="inference", mesh=mesh)
        assert r.chosen.parts["parameters"] == plan.per_rank.params + buffers
        assert "fxmem.shard.plan" in r.per_rank_source and "fxmem.shard.plan" in str(r)
        assert ("fsdp gathered" in r.chosen.parts) == ("dp" in mesh)
        t = fxmem.fit(model, x, memory="1GiB", mode="training", mesh=mesh, budgets=())
        assert t.chosen.parts["parameters"] == plan.per_rank.params + buffers


def test_mesh_inference_counts_one_ranks_activations_against_a_hand_count():
    # issue 15: inference with a mesh sizes the activations per rank, as training does. The
    # Megatron MLP (fxmem.testing.tp.TwoLayerMLP, d 16, hidden 64) on x [8, 16], tp 2: fc_in's
    # column-parallel [8, 64] output is half on a rank (1024 B; the GELU writes into it, Inductor's
    # in-place reuse), fc_out's row-parallel [8, 16] product is all-reduced, whole (512 B), made
    # while the GELU output is alive: 1536 B at the peak. Counted whole (before): 2048 + 512.
    from fxmem.testing.tp import TwoLayerMLP

    torch.manual_seed(0)
    model, x = TwoLayerMLP(), torch.randn(8, 16)
    r = fxmem.fit(model, x, memory="1GiB", mode="inference", mesh={"tp": 2})
    assert r.chosen.options == {} and r.chosen.parts["activations"] == 1024 + 512
    assert "activations: " in r.per_rank_source


def test_mesh_replicated_layers_count_whole_and_plan_failure_keeps_the_even_split(monkeypatch):
    # a layer tensor parallelism cannot split (a Conv1d) is replicated: every rank holds all of it,
    # where the old even ÷ tp figure said half
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3))
    x = torch.randn(2, 4, 16)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    r = fxmem.fit(model, x, memory="1GiB", mode="inference", mesh={"tp": 2})
    assert r.chosen.parts["parameters"] == state and "fxmem.shard.plan" in r.per_rank_source
    # when the plan fails, fit keeps state ÷ dp·tp and names why in the result

    def broken(*a, **k):
        raise ValueError("no plan for this model")
    monkeypatch.setattr(fxmem.shard, "plan", broken)
    r = fxmem.fit(model, x, memory="1GiB", mode="inference", mesh={"tp": 2})
    assert r.chosen.parts["parameters"] == state // 2
    assert "failed" in r.per_rank_source and "no plan for this model" in str(r)


def test_inference_chunks_the_mlp_of_minilm_when_only_that_fits(minilm):
    """all-MiniLM-L6-v2 (trained weights) embedding 32 sequences of 128 tokens: the MLP's
    [N, 1536] intermediate is the largest activation. fit tries ``chunk={"mlp": True}`` in
    inference; under a limit that only it meets, it is chosen, the compiled model measures within
    the limit, and the estimate is within tolerance of that measurement."""
    from fxmem.testing.minilm import SENTENCES

    model, tokenizer, _, _ = minilm
    batch = tokenizer(list(SENTENCES) * 4, padding="max_length", max_length=128, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    wide = fxmem.fit(model, ids, mask, memory="64GiB", mode="inference")
    by_label = {c.label: c for c in wide.candidates}
    mlp, default = by_label["chunk mlp"], by_label["defaults (tie_weights)"]
    # the MLP's peak (24 MiB of [N, I]) drops below the attention's, which then sets it (~4 MiB lower)
    assert mlp.estimate < default.estimate - 2**20
    limit = (mlp.estimate + default.estimate) / 2 / (1 - wide.headroom)  # only chunk mlp fits
    choice = wide.refit(limit)
    assert choice.options == {"chunk": {"mlp": True}}
    torch._dynamo.reset()
    measured = measure_inference(model, ids, mask, options=choice.options, steps=1)
    assert measured["peak_bytes"] <= limit, (measured, limit)
    assert abs(choice.estimate / measured["peak_bytes"] - 1) <= INFERENCE_TOLERANCE, (choice.estimate, measured)


def test_bf16_inference_estimate_counts_the_cpu_matmuls_fp32_accumulator():
    """On a CPU without native bf16, ATen's bf16 matmul accumulates into an fp32 [M, N] buffer
    beside its bf16 output: an activation-heavy MLP's bf16 inference peak is not half the fp32 one
    (MiniLM's bf16 estimate was 0.60 of measured, and fit chose it under a limit it then
    exceeded). On a CPU with AVX-512 BF16 it is: there the estimate once counted the buffer anyway
    (1.92 of measured), then the hidden activation as alive when the graph returns (1.26)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256)).eval()
    x = torch.randn(4096, 256)
    fitted = fxmem.fit(model, x, memory="1GiB", mode="inference", allow=["precision"])
    bf16 = next(c for c in fitted.candidates if c.options == {"precision": "bf16"})
    torch._dynamo.reset()
    measured = measure_inference(model, x, options=bf16.options, steps=1)
    assert abs(bf16.estimate / measured["peak_bytes"] - 1) <= TOLERANCE, (bf16.estimate, measured)


def _mlp_and_batch():
    """An activation-heavy MLP: its [4096, 1024] hidden activation is most of the inference peak."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256)).eval(), torch.randn(4096, 256)


def test_prune_estimate_is_the_pruned_graphs_weights_and_activations():
    """fit estimates a prune candidate on the graph the prune pass leaves (its shapes, from the
    pass's own analysis and rewrite): the weights *and* the activations shrink. It once counted
    ``ratio`` off some Linears' weights only: MiniLM's prune 0.5 was 1.28 of measured."""
    model, x = _mlp_and_batch()
    fitted = fxmem.fit(model, x, memory="1GiB", mode="inference", allow=["prune"])
    half = next(c for c in fitted.candidates if c.options == {"prune": {"ratio": 0.5}})
    default = next(c for c in fitted.candidates if c.options == {})
    # half the hidden neurons: half the [4096, 1024] activation (8 MiB less) and of both weights
    assert half.parts["activations"] <= default.parts["activations"] - 4096 * 512 * 4
    assert half.parts["parameters"] < 0.6 * default.parts["parameters"]
    torch._dynamo.reset()
    measured = measure_inference(model, x, options=half.options, steps=1)
    assert abs(half.estimate / measured["peak_bytes"] - 1) <= INFERENCE_TOLERANCE, (half.estimate, measured)


def test_prune_is_never_estimated_where_the_pass_would_be_skipped(monkeypatch):
    """Where the prune pass fails (the backend then skips it with a warning and keeps the
    weights), fit shows the candidate with the reason and never chooses it."""
    import fxmem.passes.prune as prune_module
    from fxmem.passes.base import UnsupportedGraph

    def refuse(gm, config):
        raise UnsupportedGraph("aten.linalg_vector_norm.default", "the analysis predicted another shape")

    monkeypatch.setattr(prune_module, "prune_shapes", refuse)
    model, x = _mlp_and_batch()
    fitted = fxmem.fit(model, x, memory="1GiB", mode="inference", allow=["prune"])
    pruned = [c for c in fitted.candidates if "prune" in c.options]
    assert pruned and all("prune does not apply" in c.error and "linalg_vector_norm" in c.error for c in pruned)
    assert not any(c.fits for c in pruned)
    assert "prune does not apply" in fitted.table
    weights = sum(p.numel() * 4 for p in model.parameters())
    with pytest.raises(FitError):  # below the weights only pruning would fit: nothing does
        fitted.refit(weights * 0.8)


@pytest.fixture(scope="module")
def gpt_plans():
    """The 2-layer tiny GPT of fxmem.testing.scale, its batch, and its dp 2 × tp 2 plans with and
    without the vocabulary split."""
    from fxmem.testing import scale

    model, vocab = scale.build("gpt_untied", layers=2)
    x, _ = scale.batch(vocab, 2)
    mesh = {"dp": 2, "tp": 2}
    return model, x, fxmem.shard.plan(model, x, mesh=mesh), fxmem.shard.plan(model, x, mesh=mesh, vocab=False)


def test_fit_takes_the_users_plan_and_its_mesh(gpt_plans):
    # plan= is the plan the user will fxmem.shard.apply: with vocab=False (the plan that compiles
    # with dp > 1 on torch 2.13) the embedding and head are whole over tp, so a rank holds more
    # parameters than fit's own plan (the vocabulary split) says — fit must say what will run
    model, x, split, whole = gpt_plans
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    own = fxmem.fit(model, x, memory="1GiB", mode="inference", mesh={"dp": 2, "tp": 2})
    given = fxmem.fit(model, x, memory="1GiB", mode="inference", plan=whole)
    assert own.chosen.parts["parameters"] == split.per_rank.params + buffers
    assert given.chosen.parts["parameters"] == whole.per_rank.params + buffers
    assert whole.per_rank.params > split.per_rank.params
    assert (given.dp, given.tp, given.world_size) == (2, 2, 4)
    assert "plan given" in given.per_rank_source and "vocabulary split: no" in given.per_rank_source
    assert "vocabulary split: yes" in own.per_rank_source
    # mesh= equal to the plan's is accepted (the same figures)
    same = fxmem.fit(model, x, memory="1GiB", mode="inference", plan=whole, mesh={"dp": 2, "tp": 2})
    assert same.chosen.parts == given.chosen.parts


def test_fit_plan_errors_name_what_is_accepted(gpt_plans):
    model, x, split, _ = gpt_plans
    with pytest.raises(FitError, match=r"plan= was made for mesh=\{'dp': 2, 'tp': 2\}.*accepted"):
        fxmem.fit(model, x, memory="1GiB", mode="inference", plan=split, mesh={"tp": 4})
    with pytest.raises(FitError, match="plan= is a ShardPlan; accepted: the MeshPlan"):
        fxmem.fit(model, x, memory="1GiB", mode="inference", plan=fxmem.shard.plan(model, x, world_size=2))
    with pytest.raises(FitError, match="plan= is a dict"):
        fxmem.fit(model, x, memory="1GiB", mode="inference", plan={"dp": 2, "tp": 2})
    with pytest.raises(FitError, match="world_size=, not both"):
        fxmem.fit(model, x, memory="1GiB", mode="inference", plan=split, world_size=4)
    bf16 = fxmem.shard.plan(model, x, mesh={"dp": 2, "tp": 2}, precision="bf16")
    with pytest.raises(FitError, match="precision='bf16'.*not model"):
        fxmem.fit(model, x, memory="1GiB", mode="inference", plan=bf16)
    with pytest.raises(FitError, match="made for a model of"):  # another model's plan
        fxmem.fit(Wide().eval(), torch.randn(2, 512), memory="1GiB", mode="inference", plan=split)


def test_weight_options_are_never_estimated_on_a_tensor_parallel_model():
    """A tp rank's parameters are DTensors, which the backend does not freeze into the inference
    graph: the prune (and int8, quantize) pass finds no weights there and leaves the model whole,
    and says so in a warning that names the options (checked here on one rank of a fake process
    group; it was silent before). fit must not estimate
    pruned or quantized weights with tp > 1 — it lists those candidates with the reason, never
    chooses them — and keeps estimating them without tp."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from fxmem.testing import recording_backend
    from fxmem.testing.scale import fake_rank
    from fxmem.testing.tp import TwoLayerMLP

    torch.manual_seed(0)
    model, x = TwoLayerMLP().eval(), torch.randn(8, 16)
    plan = fxmem.shard.plan(copy.deepcopy(model), x, mesh={"tp": 2})
    with fake_rank(2):
        sharded = fxmem.shard.apply(copy.deepcopy(model), plan, init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp")))
        for options, name, found in (({"prune": {"ratio": 0.5}}, "prune", "groups_found"),
                                     ({"int8": "weight_only"}, "int8", "layers")):
            torch._dynamo.reset()
            backend = recording_backend(**options)
            with torch.no_grad(), pytest.warns(UserWarning, match=rf"\['{name}'\] not applied to this inference "
                                                                  r"graph: its weights are tensor subclasses \(DTensor"):
                torch.compile(sharded.eval(), backend=backend)(x)
            (record,) = [r for r in backend.recorder.records if r.name == name]
            assert record.status == "unchanged" and not record.stats[found], record  # nothing to rewrite
    fitted = fxmem.fit(model, x, memory="1GiB", mode="inference", mesh={"tp": 2}, allow=["prune", "int8", "quantize"])
    weights = [c for c in fitted.candidates if {"prune", "int8", "quantize"} & set(c.options)]
    assert len(weights) == 8 and all("not apply with tp 2" in c.error and not c.fits for c in weights)
    assert "prune does not apply with tp 2" in fitted.table and fitted.options == {}
    alone = fxmem.fit(model, x, memory="1GiB", mode="inference", allow=["prune"])  # no tp: estimated
    assert all(not c.error for c in alone.candidates)


def test_dp_tp_estimate_within_tolerance_of_one_ranks_measured_peak(gpt_plans):
    """dp 2 × tp 2 training (the vocab=False plan, given to fit and applied): fit's per-rank estimate
    against one rank's measured step on PyTorch's fake process group, which allocates what a rank
    allocates (gloo's ranks measure the same but for gloo's own all-gather copies, docs/fit.md
    "Distributed"). FSDP2 holds the root unit gathered all step and, at a unit's all-gather in the
    backward, three units' bytes (its copied-out parameters, the flat all-gather buffer, the
    previous unit's reduce-scatter input), and each unit's gradients are reduce-scattered right
    after its backward, so the rank's peak is at the start of the backward, where the activations
    are: counted as one unit twice beside the single process's gradient peak, fit was 0.72 of
    measured."""
    from fxmem.testing import scale

    model, x, _, whole = gpt_plans
    args, kw = scale.fit_case("gpt_untied")[1:]
    fitted = fxmem.fit(model, *args, kwargs=kw, memory="1GiB", plan=whole, budgets=())
    with scale.fake_rank(4):
        measured = scale.mesh_step_peak(0, 4, "gpt_untied", 2, 2, fitted.options, plan=whole)
    assert abs(fitted.estimate / measured - 1) <= TOLERANCE, (fitted.estimate, measured, fitted.chosen.parts)
    # the loss chunk never runs under FSDP2 (the model's own frame runs eagerly, only the blocks
    # compile): fit lists the chunked candidates with the reason, never estimates them
    chunked = [c for c in fitted.candidates if "chunk" not in c.options]
    assert chunked and all("chunk does not apply with dp 2" in c.error for c in chunked)
