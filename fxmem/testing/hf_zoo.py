"""HF transformers architectures built from small configs, each with the batch its training step takes.

Random weights, no downloads. One builder per architecture family that puts something different
in front of fxmem's passes:

* decoder-only causal LMs: rotary attention with grouped KV heads (Mistral with a sliding window,
  Qwen2, Phi-3, Gemma, Gemma 2 with soft-capping, Gemma 3 with q/k norms and mixed sliding and
  global layers), GPT-NeoX's partial rotary, OPT's learned
  positions, Falcon and BLOOM's ALiBi, Mixtral's mixture of experts (data-dependent routing);
* encoder-decoders: T5 (relative position bias) and BART;
* encoders: RoBERTa (masked LM), DistilBERT (sequence classification), ViT (images).

Every model is built with dropout 0 (a dropout mask would differ between two compiled runs) and
its loss inside (``labels=``), as HF's Trainer calls it. ``size="tiny"`` is for tests (d 64,
vocab 512, B 2 × T 32); ``size="small"`` for benchmarks (d 128, vocab 8192, B 4 × T 128: the
activations, not the weights, make a step's peak).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SIZES = {"tiny": dict(d=64, vocab=512, batch=2, seq=32), "small": dict(d=128, vocab=8192, batch=4, seq=128)}


@dataclass
class Case:
    """A model in train mode and the keyword arguments of one training step (``labels`` included)."""

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]


def _arch(config_cls: str, model_cls: str, kind: str, config: Callable[[dict], dict]) -> Callable[[dict], tuple]:
    """A builder: ``transformers.<model_cls>(<config_cls>(**config(size)))`` and the kind of its batch."""
    def build(s: dict) -> tuple:
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config(s))), kind

    return build


def _causal(config_cls: str, model_cls: str, **extra: Any) -> Callable[[dict], tuple]:
    """A decoder-only LM whose config takes the Llama-style names."""
    return _arch(config_cls, model_cls, "causal", lambda s: dict(
        vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=2 * s["d"], num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2 * s["seq"], **extra))


ARCHITECTURES: dict[str, Callable[[dict], tuple]] = {
    "mistral": _causal("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=16),
    "qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "phi3": _causal("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2),
    "gemma": _causal("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=16),
    "gemma2": _causal("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=16),
    # Gemma 3: q/k norms, one sliding-window and one global layer, no final soft-cap
    "gemma3": _causal("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention"]),
    "gpt_neox": _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_dropout=0.0, attention_dropout=0.0),
    "opt": _arch("OPTConfig", "OPTForCausalLM", "causal", lambda s: dict(
        vocab_size=s["vocab"], hidden_size=s["d"], ffn_dim=2 * s["d"], num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=2 * s["seq"], word_embed_proj_dim=s["d"], dropout=0.0, attention_dropout=0.0)),
    "falcon": _arch("FalconConfig", "FalconForCausalLM", "causal", lambda s: dict(
        vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=2, num_attention_heads=4, alibi=True,
        hidden_dropout=0.0, attention_dropout=0.0)),
    "bloom": _arch("BloomConfig", "BloomForCausalLM", "causal", lambda s: dict(
        vocab_size=s["vocab"], hidden_size=s["d"], n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)),
    "mixtral": _causal("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                       num_experts_per_tok=2),
    "t5": _arch("T5Config", "T5ForConditionalGeneration", "seq2seq", lambda s: dict(
        vocab_size=s["vocab"], d_model=s["d"], d_kv=s["d"] // 4, d_ff=2 * s["d"], num_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0)),
    "bart": _arch("BartConfig", "BartForConditionalGeneration", "seq2seq", lambda s: dict(
        vocab_size=s["vocab"], d_model=s["d"], encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2 * s["d"], decoder_ffn_dim=2 * s["d"],
        max_position_embeddings=2 * s["seq"], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)),
    "roberta": _arch("RobertaConfig", "RobertaForMaskedLM", "masked", lambda s: dict(
        vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * s["d"], max_position_embeddings=s["seq"] + 4, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)),
    "distilbert": _arch("DistilBertConfig", "DistilBertForSequenceClassification", "classify", lambda s: dict(
        vocab_size=s["vocab"], dim=s["d"], n_layers=2, n_heads=4, hidden_dim=2 * s["d"],
        max_position_embeddings=s["seq"], dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)),
    "vit": _arch("ViTConfig", "ViTForImageClassification", "image", lambda s: dict(
        hidden_size=s["d"], num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * s["d"],
        image_size=8 * int(s["seq"] ** 0.5), patch_size=8, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)),
}


def build(name: str, size: str = "tiny", seed: int = 0) -> Case:
    """The architecture ``name`` (a key of :data:`ARCHITECTURES`) at ``size`` (``"tiny"`` or
    ``"small"``), in train mode, with its step's inputs; the same weights and batch for a seed."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; accepted: {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; accepted: {', '.join(SIZES)}")
    s = SIZES[size]
    torch.manual_seed(seed)
    model, kind = ARCHITECTURES[name](s)
    gen = torch.Generator().manual_seed(seed)
    batch, seq, vocab = s["batch"], s["seq"], s["vocab"]
    ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    if kind == "causal" or kind == "masked":
        inputs = {"input_ids": ids, "labels": ids}
    elif kind == "seq2seq":  # a target half the source's length
        inputs = {"input_ids": ids, "labels": torch.randint(4, vocab, (batch, seq // 2), generator=gen)}
    elif kind == "classify":
        inputs = {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=gen)}
    else:  # image: as many patches as tokens
        side = model.config.image_size
        inputs = {"pixel_values": torch.randn(batch, 3, side, side, generator=gen),
                  "labels": torch.randint(0, 10, (batch,), generator=gen)}
    return Case(name, model.train(), inputs)
