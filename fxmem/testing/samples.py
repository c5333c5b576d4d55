"""The sample models every pass runs over (docs/usage.md, "Test your own passes and models").

``SAMPLES`` maps a name to a factory ``() -> Sample``; each builds its model and example inputs
from a fixed seed, small enough for a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmem.models.gpt import GPT, Block, GPTConfig


@dataclass
class Sample:
    name: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    has_dropout: bool = False

    def training_module(self) -> nn.Module:
        """The model with a loss inside it (:class:`SquaredOutputLoss`): the module whose training
        step ``fxmem.fit`` estimates and ``torch.compile`` compiles whole."""
        return SquaredOutputLoss(self.model)


class SquaredOutputLoss(nn.Module):
    """``model(*args)``'s first output, squared and averaged in fp32: a training step's loss for a
    sample model that has none. Inside the module, so the compiled graph holds the loss's backward
    too; a loss computed eagerly on the output runs outside the graphs ``fxmem.fit`` estimates
    (its backward's temporaries were 11% of ``tied_embeddings``' measured step)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out.float().pow(2).mean()


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.gelu(self.fc1(x)))))


class TiedEmbeddings(nn.Module):
    """An embedding and an output projection that share one weight (GPT-2 style)."""

    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.norm(self.emb(idx)))


class SharedParameters(nn.Module):
    """One Linear applied twice (a recurrent-style reuse) and one parameter read by two ops."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        h = torch.tanh(self.shared(x)) * self.scale
        return self.shared(h) + self.scale


class ConvNorm(nn.Module):
    """Conv → BatchNorm → ReLU → Conv → GroupNorm → pooled linear head."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.gn = nn.GroupNorm(2, 2 * c)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.gn(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class DropoutMLP(nn.Module):
    def __init__(self, d: int = 32, p: float = 0.25):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


def _seeded(build: Callable[[], Sample]) -> Callable[[], Sample]:
    def factory() -> Sample:
        torch.manual_seed(0)
        return build()

    factory.__name__ = build.__name__
    return factory


_BLOCK = GPTConfig(d_model=64, n_head=4, block_size=16, n_layer=1, vocab_size=128)


@_seeded
def mlp() -> Sample:
    return Sample("mlp", MLP(), (torch.randn(8, 32),))


@_seeded
def gpt_block_manual() -> Sample:
    return Sample("gpt_block_manual", Block(_BLOCK), (torch.randn(2, 16, 64),))


@_seeded
def gpt_block_sdpa() -> Sample:
    cfg = GPTConfig(**{**_BLOCK.__dict__, "attention": "sdpa"})
    return Sample("gpt_block_sdpa", Block(cfg), (torch.randn(2, 16, 64),))


@_seeded
def gpt_gqa() -> Sample:
    cfg = GPTConfig(**{**_BLOCK.__dict__, "n_layer": 2, "n_kv_head": 2})
    model = GPT(cfg)
    return Sample("gpt_gqa", model, (torch.randint(0, cfg.vocab_size, (2, 16)),))


@_seeded
def tied_embeddings() -> Sample:
    return Sample("tied_embeddings", TiedEmbeddings(), (torch.randint(0, 64, (2, 12)),))


@_seeded
def shared_parameters() -> Sample:
    return Sample("shared_parameters", SharedParameters(), (torch.randn(4, 32),))


@_seeded
def conv_norm() -> Sample:
    return Sample("conv_norm", ConvNorm(), (torch.randn(2, 3, 16, 16),))


@_seeded
def dropout_mlp() -> Sample:
    return Sample("dropout_mlp", DropoutMLP(), (torch.randn(8, 32),), has_dropout=True)


SAMPLES: dict[str, Callable[[], Sample]] = {
    f.__name__: f
    for f in (mlp, gpt_block_manual, gpt_block_sdpa, gpt_gqa, tied_embeddings, shared_parameters, conv_norm, dropout_mlp)
}


def sample(name: str) -> Sample:
    """Build one sample model by name (a fresh model from a fixed seed)."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample model {name!r}; accepted: {sorted(SAMPLES)}")
    return SAMPLES[name]()
