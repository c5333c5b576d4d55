import pytest
import torch

from fxmem.models import GPT, GPTConfig, example_batch


def test_logits_loss_and_tied_head():
    cfg = GPTConfig(n_layer=1, d_model=32, n_head=4, block_size=8, vocab_size=50)
    model = GPT(cfg)
    idx = example_batch(cfg, 3)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, 50) and loss.ndim == 0
    assert model.lm_head.weight is model.wte.weight
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near-uniform at init


def test_manual_and_sdpa_attention_agree():
    torch.manual_seed(0)
    a = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, block_size=8, vocab_size=50, attention="manual"))
    b = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, block_size=8, vocab_size=50, attention="sdpa"))
    b.load_state_dict(a.state_dict())
    idx = example_batch(a.cfg, 2)
    torch.testing.assert_close(a(idx), b(idx), atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_has_fewer_kv_parameters():
    cfg = GPTConfig(n_layer=1, d_model=32, n_head=4, n_kv_head=2, block_size=8, vocab_size=50)
    model = GPT(cfg)
    attn = model.blocks[0].attn
    assert attn.k_proj.weight.shape == (16, 32) and attn.q_proj.weight.shape == (32, 32)
    assert model(example_batch(cfg, 2)).shape == (2, 8, 50)


@pytest.mark.parametrize("kwargs, match", [({"attention": "flash"}, "attention"), ({"d_model": 30}, "divisible"),
                                           ({"n_kv_head": 3}, "n_kv_head")])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)
