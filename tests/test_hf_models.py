"""Real model code: HF transformers models built from small configs (random weights, no downloads)."""

import copy
import re
import warnings

import pytest
import torch

import fxmem
from fxmem.testing import assert_equivalent, recording_backend
from fxmem.testing.hf_zoo import ARCHITECTURES, build

transformers = pytest.importorskip("transformers")


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg), cfg.vocab_size


def llama_gqa():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg), cfg.vocab_size


def bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg), cfg.vocab_size


MODELS = {"gpt2": gpt2, "llama_gqa": llama_gqa, "bert": bert}


def _build(name):
    torch.manual_seed(0)
    model, vocab = MODELS[name]()
    ids = torch.randint(0, vocab, (2, 16))
    return model, ids


def _outputs(model):
    def run(ids):
        out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    return run


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_compiles_with_fxmem_and_matches_eager(name):
    model, ids = _build(name)
    model.train()
    compiled = torch.compile(model, backend="fxmem")
    eager_fn, compiled_fn = _outputs(model), _outputs(compiled)

    class Eager(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, i):
            return eager_fn(i)

    assert_equivalent(Eager(), compiled_fn, (ids,), atol=1e-5, rtol=1e-4)


def mistral():
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=32, sliding_window=8)
    return transformers.MistralForCausalLM(cfg), cfg.vocab_size


def qwen2():
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(cfg), cfg.vocab_size


CAUSAL_LMS = {"gpt2": gpt2, "llama_gqa": llama_gqa, "mistral": mistral, "qwen2": qwen2}


def _causal_lm(name):
    torch.manual_seed(0)
    model, vocab = CAUSAL_LMS[name]()
    return model.eval(), torch.randint(0, vocab, (2, 16))


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_causal_lm_called_as_hf_documents_it(name):
    """``fxmem.optimize(model, ids)`` with the model's default ``use_cache=True``: the KV cache
    is dropped (returned as None, said in a warning, the report and ``dropped_caches``), the
    logits equal eager's."""
    model, ids = _causal_lm(name)
    with torch.no_grad():
        ref = model(ids)
    assert ref.past_key_values is not None  # the model does return a cache: the case under test
    with pytest.warns(UserWarning, match="KV cache"):
        report = fxmem.explain(model, ids)
    assert any("KV cache" in n and "None" in n for n in report.notes) and "KV cache" in str(report)
    module = report.module
    assert module.dropped_caches and all(p.startswith("output[") for p in module.dropped_caches)
    with torch.no_grad():
        out = module(ids)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    # optimize with a lossy option: still no crash, still told
    with pytest.warns(UserWarning, match="KV cache"):
        small = fxmem.optimize(model, ids, int8="weight_only")
    with torch.no_grad():
        got = small(ids).logits
    assert (got - ref.logits).norm() / ref.logits.norm() < 0.05


def test_shard_plan_on_a_causal_lm_called_as_hf_documents_it():
    model, ids = _causal_lm("llama_gqa")
    plan = fxmem.shard.plan(model, ids, world_size=2)
    assert "model.layers.0.self_attn.q_proj" in plan.parallelize_plan()
    # the same plan as with the cache switched off: the cache outputs change nothing in it
    assert plan.table() == fxmem.shard.plan(model, ids, kwargs={"use_cache": False}, world_size=2).table()


def test_a_cache_input_is_a_clear_error():
    model, ids = _causal_lm("gpt2")
    with torch.no_grad():
        cache = model(ids).past_key_values
    with pytest.raises(Exception, match="KV cache .*DynamicCache.* input"):
        fxmem.explain(model, ids[:, :1], kwargs={"past_key_values": cache})


def test_use_cache_false_still_needs_no_note():
    model, ids = _causal_lm("gpt2")
    report = fxmem.explain(model, kwargs={"input_ids": ids, "use_cache": False})
    assert report.notes == [] and report.module.dropped_caches == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_backend_and_optimize_match_eager(name):
    """... compiled by Inductor, not run op by op after a fallback (HF GPT-2's eager attention
    used to fail Inductor's retrace on a ``view``: fxmem.codegen._RetraceInterpreter)."""
    model, ids = _build(name)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxmem: Inductor could not compile")
        ref = _outputs(model)(ids)
        got = _outputs(torch.compile(model, backend="fxmem"))(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    kwargs = {"input_ids": ids} if name == "bert" else {"input_ids": ids, "use_cache": False}
    report = fxmem.explain(model, kwargs=kwargs)
    out = report.module(**kwargs)
    got = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert report.records[0].param_bytes > 0


def test_a_budget_never_peaks_above_the_default_on_hf_gpt2():
    """HF GPT-2 with its loss inside: by default remat saves 42 % of eager's activation bytes,
    fewer than budget 0.5's least-recompute cut (50 %). Budget 0.5 used to keep that cut and
    measured 2.1 MiB against the default's 1.9 (and 393.0 against 387.9 MiB at B 4 × T 512); the
    peak guard now compares the default's cut at every budget."""
    from fxmem.measure import training_step_peak

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1024, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    base.loss_type = "ForCausalLM"  # no graph break between the head and the loss
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    peaks, grads = {}, {}
    for budget in (None, 0.5):
        torch._dynamo.reset()
        model = copy.deepcopy(base).train()
        options = {"codegen": "eager"} | ({} if budget is None else {"remat": {"budget": budget}})
        fn = torch.compile(model, backend=fxmem.backend(**options))

        def step():
            for p in model.parameters():
                p.grad = None
            fn(input_ids=ids, labels=ids).loss.backward()

        peaks[budget] = training_step_peak(step).peak_bytes
        grads[budget] = [p.grad.clone() for p in model.parameters()]
    assert peaks[0.5] <= peaks[None], f"budget 0.5 peaks at {peaks[0.5]} B, the default at {peaks[None]} B"
    for a, b in zip(grads[None], grads[0.5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _hf_causal_lm_with_its_loss(name: str):
    """A causal LM whose head dominates, as in real ones (vocab ≫ width): the chunked loss's own
    workspace is a sixth of the step's peak here."""
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=4096, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                       max_position_embeddings=128, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(cfg)
    model.loss_type = "ForCausalLM"  # no graph break between the head and the loss
    return model, cfg.vocab_size


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_estimate_is_within_10_percent_of_the_measured_peak_on_hf_causal_lms(name):
    """explain()'s and the peak guard's timeline against the allocator, on the code Inductor
    generates, with the loss inside (HF Trainer's step: the output dropped before the backward is
    what the benchmark measures; here it is held, as the timeline assumes). The chunked loss's
    workspace used to be missing: 0.85 of the measured peak on HF GPT-2 at B 4 × T 512."""
    from fxmem.measure import training_step_peak

    torch.manual_seed(0)
    model, vocab = _hf_causal_lm_with_its_loss(name)
    model.train()
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    backend = recording_backend()
    fn = torch.compile(model, backend=backend)

    def step():
        for p in model.parameters():
            p.grad = None
        out = fn(input_ids=ids, labels=ids)
        out.loss.backward()

    step()
    measured = training_step_peak(step).peak_bytes
    timeline = backend.recorder.timelines[-1]
    estimate = timeline.peak_bytes - timeline.input_bytes  # the measurement leaves the inputs out
    assert abs(estimate - measured) <= 0.10 * measured, f"{name}: estimated {estimate} B, measured {measured} B"
    if name == "gpt2":  # its peak is in the loss op (0.89 of the measured peak without it): explain names it
        assert [t.name for t in timeline.live_at_peak if t.kind == "workspace"] == ["logits_cross_entropy (workspace)"]


@pytest.mark.parametrize("name", ["distilbert", "vit"])
def test_the_estimate_is_within_10_percent_on_the_zoo_models_it_once_missed(name):
    """Two of the three zoo architectures whose estimate under Inductor once missed (at the
    benchmark's shapes: DistilBERT 0.81, ViT 0.89 of the measured peak; here, at tiny shapes,
    ViT was 0.83): Inductor's fusion into scatters, where it realizes values, and its
    channels-last copies of a convolution's inputs (docs/architecture.md). The third, Gemma 2
    (1.30: fusion through views, its soft-capped logits read as ``[N, V]`` by the log-softmax),
    left this test when the chunk pass took over its loss: at the defaults the unchunked
    log-softmax is gone, so the case no longer tested the fusion (the timeline unit test
    ``test_reuse_fuses_pointwise_ops_through_views_into_their_readers`` does), at 45 s of the
    suite; its chunked estimate is checked by ``benchmarks/hf_architectures.py`` (1.00)."""
    from fxmem.measure import training_step_peak

    case = build(name)
    torch._dynamo.reset()
    backend = recording_backend()
    fn = torch.compile(case.model, backend=backend)

    def step():
        for p in case.model.parameters():
            p.grad = None
        out = fn(**case.inputs)
        out.loss.backward()

    step()
    measured = training_step_peak(step).peak_bytes
    timeline = backend.recorder.timelines[-1]
    estimate = timeline.peak_bytes - timeline.input_bytes
    assert abs(estimate - measured) <= 0.10 * measured, f"{name}: estimated {estimate} B, measured {measured} B"


# -- the architecture zoo (fxmem.testing.hf_zoo) -------------------------------------------------------

# the losses the chunk pass leaves, and why: a classifier's few labels (chunking saves nothing).
# Gemma 2's soft-capped logits are chunked, the cap folded into the op (docs/passes/chunk.md)
NOT_CHUNKED = {"distilbert": None, "vit": None}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_zoo_architecture_trains_like_eager(name):
    """Sixteen HF architectures, each a different shape of graph for fxmem's passes (sliding
    windows, soft-capping, ALiBi, experts, relative position bias, encoder-decoders, images): one
    training step with the loss inside through ``torch.compile(backend=fxmem.backend(...))``
    gives eager's loss and gradients; every loss over a vocabulary is chunked, or a warning says
    why not. ``codegen="eager"``: the passes and the partition are what is tested here; Inductor
    compiles the same graphs in ``benchmarks/hf_architectures.py`` (and above, for three models)."""
    import warnings

    case = build(name)
    reference = copy.deepcopy(case.model)
    ref_loss = reference(**case.inputs).loss
    ref_loss.backward()
    backend = recording_backend(codegen="eager")
    torch._dynamo.reset()
    expected_warning = NOT_CHUNKED.get(name)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loss = torch.compile(case.model, backend=backend)(**case.inputs).loss
        loss.backward()
    ours = [str(w.message) for w in seen if "fxmem" in str(w.message)]
    if expected_warning is None:
        assert not ours, ours
    else:
        assert len(ours) == 1 and re.search(expected_warning, ours[0]), ours
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (pname, want), got in zip(reference.named_parameters(), case.model.parameters()):
        if want.grad is None:
            assert got.grad is None, pname
            continue
        torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name} {pname}: {m}")
    chunked = [r for r in backend.recorder.records if r.name == "chunk" and r.stats.get("regions")]
    assert bool(chunked) == (name not in NOT_CHUNKED), [(r.name, r.stats) for r in backend.recorder.records]
