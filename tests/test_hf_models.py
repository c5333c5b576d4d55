"""Real model code: HF transformers models built from small configs (random weights, no downloads)."""

import pytest
import torch

import fxmem
from fxmem.testing import assert_equivalent

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


def test_a_cache_object_output_is_a_clear_error():
    model, ids = _build("gpt2")
    model.eval()
    with pytest.raises(Exception, match="use_cache=False"):
        fxmem.explain(model, kwargs={"input_ids": ids, "use_cache": True})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_backend_and_optimize_match_eager(name):
    model, ids = _build(name)
    model.eval()
    with torch.no_grad():
        ref = _outputs(model)(ids)
        got = _outputs(torch.compile(model, backend="fxmem"))(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    kwargs = {"input_ids": ids} if name == "bert" else {"input_ids": ids, "use_cache": False}
    report = fxmem.explain(model, kwargs=kwargs)
    out = report.module(**kwargs)
    got = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert report.records[0].param_bytes > 0
