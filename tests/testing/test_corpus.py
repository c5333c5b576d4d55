"""The stdlib-docstring corpus and the GPT trained on it: a real split, a model that learns, a cache
that never serves weights for another corpus or config, and quantized perplexity near fp32's."""

import math

import pytest
import torch

import fxmem
from fxmem.models.gpt import GPT
from fxmem.testing import corpus

TINY = dict(n_layer=1, n_head=2, d_model=32, block_size=32)


@pytest.fixture(scope="module")
def small():
    return corpus.build(held_out_every=4, max_modules=12)  # a few stdlib modules: real text, ~seconds


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fxmem_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FXMEM_CACHE", str(cache))
    try:
        cfg = corpus.default_config(**TINY)
        model = corpus.trained_gpt(small, cfg, steps=60, batch=8, lr=1e-2)
        yield model, cfg, cache
    finally:
        mp.undo()


def test_build_is_deterministic_and_splits_by_module(small):
    again = corpus.build(held_out_every=4, max_modules=12)
    assert torch.equal(small.train, again.train) and torch.equal(small.held_out, again.held_out)
    assert small.digest() == again.digest()
    assert small.train.dtype == torch.uint8 and small.held_out.numel() > 1000
    assert not set(small.train_modules) & set(small.held_out_modules)  # held-out modules are never trained on
    text = bytes(small.held_out[:2000].tolist()).decode("utf-8", errors="replace")
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8  # English prose, not code


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="held_out_every"):
        corpus.build(held_out_every=1)
    with pytest.raises(ValueError, match="too few modules"):
        corpus.build(directory=tmp_path)  # no *.py files there


def test_trained_model_beats_untrained_on_held_out_text(small, trained):
    model, cfg, _ = trained
    torch.manual_seed(0)
    untrained = GPT(cfg).eval()
    ppl_untrained = corpus.perplexity(untrained, small.held_out, batch=4, seq=32, max_batches=8)
    ppl = corpus.perplexity(model, small.held_out, batch=4, seq=32, max_batches=8)
    assert ppl_untrained > 200  # ~uniform over 256 bytes
    assert ppl < 0.2 * ppl_untrained  # it learned English bytes, judged on modules it never saw


def test_cache_hit_and_key(small, trained):
    model, cfg, cache = trained
    files = list(cache.glob("gpt_stdlib_docstrings_*.pt"))
    assert len(files) == 1
    again = corpus.trained_gpt(small, cfg, steps=60, batch=8, lr=1e-2)  # loaded, not retrained
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = corpus.build(held_out_every=3, max_modules=12)  # another corpus: another key, never these weights
    corpus.trained_gpt(other, cfg, steps=2, batch=2, lr=1e-2)
    assert len(list(cache.glob("gpt_stdlib_docstrings_*.pt"))) == 2


def test_int8_quantized_perplexity_close_to_fp32(small, trained):
    model, _, _ = trained
    windows = corpus.windows(small.held_out, 4, 32)
    ref = corpus.perplexity(model, small.held_out, batch=4, seq=32, max_batches=8)
    q = fxmem.optimize(model, windows[0][:, :-1], quantize={"bits": 8, "group_size": None})
    ppl = corpus.perplexity(q, small.held_out, batch=4, seq=32, max_batches=8)
    assert math.isfinite(ppl) and abs(ppl / ref - 1) < 0.02
