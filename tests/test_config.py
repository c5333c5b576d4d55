import dataclasses

import pytest
import torch

import fxmem
from fxmem.config import (
    ChunkConfig,
    FxmemConfig,
    Int8Config,
    LowerConfig,
    OptionError,
    PrecisionConfig,
    PruneConfig,
    RematConfig,
    TieConfig,
    VerifyConfig,
    parse_options,
)


def test_defaults_match_the_design_table():
    cfg = parse_options()
    assert cfg == FxmemConfig()
    assert cfg.remat == RematConfig(enabled=True, budget=None)
    assert cfg.precision is None and cfg.int8 is None and cfg.prune is None and cfg.verify is None
    assert cfg.tie_weights == TieConfig(enabled=True, mode="exact")
    assert cfg.lower == LowerConfig(mode="auto")
    assert cfg.chunk == ChunkConfig(enabled=True, loss=True, mlp=False, chunk_tokens=None)
    assert cfg.strict is False


def test_chunk_option_forms():
    assert parse_options(chunk=False).chunk.enabled is False
    assert parse_options(chunk=True).chunk == ChunkConfig()
    cfg = parse_options(chunk={"chunk_tokens": 128}).chunk
    assert cfg.loss and cfg.chunk_tokens == 128 and not cfg.mlp
    assert parse_options(chunk={"loss": False}).chunk.enabled is False


def test_every_key_parses_to_its_frozen_dataclass():
    cfg = parse_options(
        {"remat": {"budget": 0.5}, "precision": "fp16", "int8": {"mode": "dynamic", "skip": "lm_head"},
         "tie_weights": {"mode": "similar", "rtol": 0.01}, "prune": {"ratio": 0.3, "targets": ["mlp"]},
         "lower": True, "verify": {"atol": 1e-4}, "strict": True}
    )
    assert cfg.remat.budget == 0.5
    assert cfg.precision == PrecisionConfig(dtype=torch.float16)
    assert cfg.int8 == Int8Config(mode="dynamic", skip=("lm_head",))
    assert cfg.tie_weights.mode == "similar" and cfg.tie_weights.rtol == 0.01
    assert cfg.prune == PruneConfig(ratio=0.3, targets=("mlp",))
    assert cfg.lower.mode == "on"
    assert cfg.verify == VerifyConfig(atol=1e-4)
    assert cfg.strict is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.remat.budget = 0.1  # type: ignore[misc]
    assert cfg.lossy_options() == ["int8", "prune", "tie_weights"]


def test_keywords_and_dict_merge():
    cfg = parse_options({"remat": False}, precision="bf16")
    assert cfg.remat.enabled is False and cfg.precision.dtype == torch.bfloat16
    assert parse_options(remat={"budget": None}).remat.budget is None


@pytest.mark.parametrize(
    "options, key, accepted",
    [
        ({"bogus": 1}, "bogus", "accepted keys"),
        ({"remat": {"budget": 1.5}}, "remat.budget", "[0, 1]"),
        ({"remat": {"budgt": 0.5}}, "budgt", "accepted sub-keys"),
        ({"remat": "yes"}, "remat", "True | False"),
        ({"precision": "fp8"}, "precision", "'fp16' | 'bf16'"),
        ({"precision": torch.float32}, "precision", "'fp16'"),
        ({"int8": "int4"}, "int8", "'weight_only' | 'dynamic'"),
        ({"int8": {"granularity": "per_tensor"}}, "int8.granularity", "per_channel"),
        ({"int8": {"group_size": 0}}, "int8.group_size", "positive"),
        ({"tie_weights": {"mode": "fuzzy"}}, "tie_weights.mode", "'exact' | 'similar'"),
        ({"prune": {"ratio": 1.0}}, "prune.ratio", "[0, 1)"),
        ({"prune": {"ratio": 0.2, "targets": ["layers"]}}, "prune.targets", "'mlp'"),
        ({"prune": 0.3}, "prune", "ratio"),
        ({"lower": "maybe"}, "lower", "'auto' | True | False"),
        ({"verify": {"atol": -1}}, "verify.atol", "non-negative"),
        ({"strict": "yes"}, "strict", "True | False"),
        ({"chunk": "loss"}, "chunk", "'chunk_tokens'"),
        ({"chunk": {"chunk_tokens": 0}}, "chunk.chunk_tokens", "positive int"),
        ({"chunk": {"loss": 1}}, "chunk.loss", "True | False"),
        ({"chunk": {"tokens": 8}}, "tokens", "accepted sub-keys"),
        ({"chunk": {"mlp": "yes"}}, "chunk.mlp", "True | False"),
    ],
)
def test_bad_options_name_the_key_and_what_is_accepted(options, key, accepted):
    with pytest.raises(OptionError) as err:
        parse_options(options)
    assert key in str(err.value) and accepted in str(err.value)
    assert isinstance(err.value, ValueError)


def test_backend_object_validates_before_any_work():
    with pytest.raises(OptionError, match="unknown fxmem option"):
        fxmem.backend(bogus=1)


def test_torch_compile_options_reach_the_backend_and_are_validated():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="fxmem", options={"remat": {"budget": 2}})
    with pytest.raises(Exception, match=r"remat.budget.*\[0, 1\]"):
        compiled(torch.randn(2, 4))


def test_torch_compile_mode_is_refused_with_a_pointer_to_options():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="fxmem", mode="max-autotune")
    with pytest.raises(Exception, match="fxmem takes no torch.compile mode"):
        compiled(torch.randn(2, 4))
