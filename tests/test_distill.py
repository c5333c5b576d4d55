"""fxmem.distill: the loss formula, optional labels, and recovery of a pruned GPT."""

import pytest
import torch
import torch.nn.functional as F

import fxmem
from fxmem.distill import distill_loss, logits_of
from fxmem.models.gpt import GPT, GPTConfig


def test_loss_is_alpha_ce_plus_t2_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    T, a = 3.0, 0.25
    loss, kl, ce = distill_loss(s, t, labels, alpha=a, temperature=T)
    p_t = F.softmax(t.reshape(-1, 11) / T, -1)
    log_p_s = F.log_softmax(s.reshape(-1, 11) / T, -1)
    kl_ref = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    ce_ref = F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1))
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(loss, a * ce_ref + (1 - a) * T * T * kl_ref)
    soft, kl2, none = distill_loss(s, t, None, temperature=T)
    assert none is None
    torch.testing.assert_close(soft, T * T * kl_ref)
    assert float(distill_loss(t, t, None)[1]) == pytest.approx(0.0, abs=1e-6)


def test_logits_of_accepts_tensor_tuple_and_attribute():
    x = torch.ones(2)
    assert logits_of(x) is x
    assert logits_of((x, torch.zeros(()))) is x

    class Out:
        logits = x

    assert logits_of(Out()) is x
    with pytest.raises(TypeError):
        logits_of("nope")


def test_bad_arguments_raise():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="alpha"):
        fxmem.distill(m, m, [torch.ones(1, 2)], 1, alpha=2.0)
    with pytest.raises(ValueError, match="temperature"):
        fxmem.distill(m, m, [torch.ones(1, 2)], 1, temperature=0.0)


def _patterned(cfg, n, seed):
    """Sequences that count upward mod vocab from a random start: easy to learn, easy to test."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, cfg.vocab_size, (n, 1), generator=g)
    return ((start + torch.arange(cfg.block_size + 1)) % cfg.vocab_size).contiguous()


def test_distill_recovers_pruned_gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=16, mlp_ratio=4)
    teacher = GPT(cfg)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2, foreach=True)
    for step in range(25):
        seq = _patterned(cfg, 8, step)
        _, loss = teacher(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    seqs = [_patterned(cfg, 8, 1000 + i) for i in range(4)]
    data = [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seqs]
    x0 = data[0][0]
    student = fxmem.optimize(teacher, x0, prune={"ratio": 0.6, "targets": ["mlp"]})
    assert student.graph_module.blocks._0.mlp.up_proj.weight.shape[0] == int(64 * 0.4)

    def kl_to_teacher():
        with torch.no_grad():
            return sum(float(distill_loss(student(x), teacher(x), None)[1]) for x, _ in data) / len(data)

    before = kl_to_teacher()
    wte = teacher.wte.weight.detach().clone()
    result = fxmem.distill(student, teacher, data, steps=12, lr=1e-2, alpha=0.0, progress=False)
    assert len(result.loss) == 12 and len(result.ce) == 12
    assert kl_to_teacher() < 0.7 * before
    # the teacher is untouched (the student got its own copies of shared weights) and in its mode
    assert not teacher.training and teacher.blocks[0].mlp.up_proj.weight.shape == (64, 16)
    torch.testing.assert_close(teacher.wte.weight, wte)
    assert all(p is not q for p in student.parameters() for q in teacher.parameters())
