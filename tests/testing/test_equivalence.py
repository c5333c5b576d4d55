import pytest
import torch

from fxmem.testing import SAMPLES, assert_equivalent, sample


def test_identical_models_pass():
    s = sample("mlp")
    assert_equivalent(s.model, s.model, s.args)


def test_wrong_outputs_fail():
    s = sample("mlp")
    with pytest.raises(AssertionError, match="output 0"):
        assert_equivalent(s.model, lambda x: s.model(x) * 1.001, s.args)


def test_wrong_gradients_fail_even_when_outputs_match():
    s = sample("mlp")

    def detached_first_layer(x):  # same forward values, but no gradient reaches fc1
        h = torch.nn.functional.gelu(s.model.fc1(x)).detach()
        return s.model.fc3(torch.relu(s.model.fc2(h)))

    with pytest.raises(AssertionError, match="grad of fc1"):
        assert_equivalent(s.model, detached_first_layer, s.args)


def test_dropout_runs_from_the_same_seed():
    s = sample("dropout_mlp")
    assert_equivalent(s.model, s.model, s.args)


def test_registry_has_the_design_samples():
    assert {"mlp", "gpt_block_manual", "gpt_block_sdpa", "tied_embeddings", "shared_parameters", "conv_norm",
            "dropout_mlp"} <= set(SAMPLES)
    with pytest.raises(KeyError, match="accepted"):
        sample("resnet")
    s = sample("tied_embeddings")
    assert s.model.head.weight is s.model.emb.weight
