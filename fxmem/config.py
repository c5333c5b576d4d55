"""Options → frozen configs.

Every option key (docs/usage.md, "Options") has one frozen dataclass here and one parser. The same keys are
accepted by ``torch.compile(..., options=...)``, ``fxmem.backend(**options)``, ``fxmem.explain``
and ``fxmem.optimize``. Parsing happens before any work: an unknown key or a bad value raises
:class:`OptionError` (a ``ValueError``) that names the key and lists what is accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


class OptionError(ValueError):
    """A bad fxmem option: names the key, the value given and what is accepted."""


def _fail(key: str, value: Any, accepted: str) -> OptionError:
    return OptionError(f"fxmem option {key!r}: got {value!r}; accepted: {accepted}")


def _check_keys(key: str, given: Mapping, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise OptionError(
            f"fxmem option {key!r}: unknown sub-key(s) {unknown}; accepted sub-keys: {list(allowed)}"
        )


def _fraction(key: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        accepted = "a float in [0, 1]" + (" or None" if allow_none else "")
        raise _fail(key, value, accepted)
    return float(value)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(key, value, " | ".join(repr(c) for c in choices))
    return value


def _positive_int(key: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "a non-negative int" + (" or None" if allow_none else ""))
    return value


def _str_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(key, value, "a string or a list of strings")


# --------------------------------------------------------------------------------------------
# One frozen dataclass per pass.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RematConfig:
    """``remat``: which forward activations are saved for backward (training graphs).

    ``budget`` is the fraction of eager's saved-activation bytes that may be kept; ``None`` means
    "recompute only what is free" (no extra matmul or attention FLOPs).
    """

    enabled: bool = True
    budget: float | None = None
    fused: bool = False
    """Set by the backend, not an option: estimate step peaks as Inductor's fused code has them
    (``codegen="inductor"``) rather than op by op."""

    @classmethod
    def parse(cls, value: Any) -> RematConfig:
        if isinstance(value, RematConfig):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, Mapping):
            _check_keys("remat", value, ("budget", "enabled"))
            enabled = value.get("enabled", True)
            if not isinstance(enabled, bool):
                raise _fail("remat.enabled", enabled, "True | False")
            return cls(enabled=enabled, budget=_fraction("remat.budget", value.get("budget"), allow_none=True))
        raise _fail("remat", value, "True | False | {'budget': float in [0, 1] or None}")


_LOW_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionConfig:
    """``precision``: low-precision compute (and, for inference, low-precision weight storage).

    ``keep_fp32`` names extra ATen ops (``"aten.softmax"`` or ``"softmax"``) kept in fp32 beyond
    autocast's CUDA fp32 lists; ``overflow_guard`` keeps ops whose values exceed the low dtype's
    range on the example inputs in fp32. ``weights`` (inference): ``"low"`` stores every fp32 weight
    with two or more dimensions in the low dtype (parameter bytes ~0.5x); ``"autocast"`` stores low
    only the weights that every use reaches through a matmul-class op, the ones autocast rounds
    anyway (error no worse than autocast's; embedding tables stay fp32).
    """

    dtype: torch.dtype = torch.bfloat16
    keep_fp32: tuple[str, ...] = ()
    overflow_guard: bool = True
    weights: str = "low"

    @classmethod
    def parse(cls, value: Any) -> PrecisionConfig | None:
        if value is None or isinstance(value, PrecisionConfig):
            return value
        accepted = "None | 'fp16' | 'bf16' | {'dtype': 'fp16'|'bf16', 'keep_fp32': [op names], 'overflow_guard': bool, 'weights': 'low'|'autocast'}"
        if isinstance(value, str):
            if value not in _LOW_DTYPES:
                raise _fail("precision", value, accepted)
            return cls(dtype=_LOW_DTYPES[value])
        if isinstance(value, torch.dtype):
            if value not in (torch.float16, torch.bfloat16):
                raise _fail("precision", value, accepted)
            return cls(dtype=value)
        if isinstance(value, Mapping):
            _check_keys("precision", value, ("dtype", "keep_fp32", "overflow_guard", "weights"))
            dtype = value.get("dtype", "bf16")
            parsed = cls.parse(dtype)
            if parsed is None:
                raise _fail("precision.dtype", dtype, "'fp16' | 'bf16'")
            guard = value.get("overflow_guard", True)
            if not isinstance(guard, bool):
                raise _fail("precision.overflow_guard", guard, "True | False")
            return cls(
                dtype=parsed.dtype,
                keep_fp32=_str_tuple("precision.keep_fp32", value.get("keep_fp32", ())),
                overflow_guard=guard,
                weights=_choice("precision.weights", value.get("weights", "low"), ("low", "autocast")),
            )
        raise _fail("precision", value, accepted)


@dataclass(frozen=True)
class Int8Config:
    """``int8``: rewrite linear/matmul with frozen weights to int8 weights and fp32 scales.

    ``granularity`` is ``"per_channel"`` (one scale per output row) or ``"per_group"`` (one scale
    per ``group_size`` input columns of each row). ``skip`` holds fnmatch patterns on module
    names (``"lm_head"``, ``"*.attn.*"``); weights with fewer than ``min_numel`` elements stay.
    """

    mode: str = "weight_only"
    granularity: str = "per_channel"
    group_size: int = 128
    skip: tuple[str, ...] = ()
    min_numel: int = 1024

    @classmethod
    def parse(cls, value: Any) -> Int8Config | None:
        if value is None or isinstance(value, Int8Config):
            return value
        modes = ("weight_only", "dynamic")
        if isinstance(value, str):
            return cls(mode=_choice("int8", value, modes))
        if isinstance(value, Mapping):
            _check_keys("int8", value, ("mode", "granularity", "group_size", "skip", "min_numel"))
            group_size = _positive_int("int8.group_size", value.get("group_size", 128))
            if group_size == 0:
                raise _fail("int8.group_size", group_size, "a positive int")
            mode = _choice("int8.mode", value.get("mode", "weight_only"), modes)
            granularity = _choice("int8.granularity", value.get("granularity", "per_channel"), ("per_channel", "per_group"))
            if mode == "dynamic" and granularity != "per_channel":
                # torch._int_mm accumulates whole rows in int32: one weight scale per output channel
                raise _fail("int8.granularity", granularity, "'per_channel' with mode='dynamic' (per_group needs mode='weight_only')")
            return cls(
                mode=mode,
                granularity=granularity,
                group_size=group_size,
                skip=_str_tuple("int8.skip", value.get("skip", ())),
                min_numel=_positive_int("int8.min_numel", value.get("min_numel", 1024)),
            )
        raise _fail("int8", value, "None | 'weight_only' | 'dynamic' | {'mode', 'granularity', 'group_size', 'skip', 'min_numel'}")


QUANT_SCHEMES = ("int", "nf4", "log")
QUANT_CALIBRATION = ("none", "awq", "gptq")


@dataclass(frozen=True)
class QuantizeConfig:
    """``quantize``: Linear (and, with ``embeddings``, embedding) weights below 16 bits (inference).

    ``bits`` 8 or 4; ``scheme`` ``"int"`` (8 bits: symmetric int8, the ``int8`` pass's format;
    4 bits: affine codes with a 16-bit scale and zero point per group), ``"nf4"`` (QLoRA's
    NormalFloat levels, 4 bits) or ``"log"`` (sign kept, magnitudes log-spaced); ``group_size``
    input columns per scale (``None``: one group per row); ``calibration`` ``"awq"``
    (activation-aware scale and clipping search on the example inputs) or ``"none"``
    (round-to-nearest); ``embeddings``: also quantize ``aten.embedding`` tables per row;
    ``skip``: fnmatch patterns on module paths; weights with fewer than ``min_numel`` elements
    stay. ``int8="weight_only"`` is the shorthand of ``{"bits": 8, "group_size": None}``.
    """

    bits: int = 4
    scheme: str = "int"
    group_size: int | None = 64
    calibration: str = "none"
    embeddings: bool = True
    skip: tuple[str, ...] = ()
    min_numel: int = 1024

    @classmethod
    def parse(cls, value: Any) -> QuantizeConfig | None:
        if value is None or isinstance(value, QuantizeConfig):
            return value
        keys = ("bits", "scheme", "group_size", "calibration", "embeddings", "skip", "min_numel")
        accepted = ("None | {'bits': 8 | 4, 'scheme': 'int' | 'nf4' | 'log', 'group_size': int or None, "
                    "'calibration': 'none' | 'awq' | 'gptq', 'embeddings': bool, 'skip': [patterns], 'min_numel': int}")
        if not isinstance(value, Mapping):
            raise _fail("quantize", value, accepted)
        _check_keys("quantize", value, keys)
        bits = value.get("bits", 4)
        if bits not in (4, 8) or isinstance(bits, bool):
            raise _fail("quantize.bits", bits, "8 | 4")
        scheme = _choice("quantize.scheme", value.get("scheme", "int"), QUANT_SCHEMES)
        if scheme == "nf4" and bits != 4:
            raise _fail("quantize.bits", bits, "4 with scheme='nf4' (NormalFloat4 has 16 levels)")
        group_size = _positive_int("quantize.group_size", value.get("group_size", 64), allow_none=True)
        if group_size is not None and (group_size < 2 or group_size % 2):
            raise _fail("quantize.group_size", group_size, "an even int >= 2, or None (one group per row)")
        embeddings = value.get("embeddings", True)
        if not isinstance(embeddings, bool):
            raise _fail("quantize.embeddings", embeddings, "True | False")
        return cls(
            bits=bits, scheme=scheme, group_size=group_size,
            calibration=_choice("quantize.calibration", value.get("calibration", "none"), QUANT_CALIBRATION),
            embeddings=embeddings, skip=_str_tuple("quantize.skip", value.get("skip", ())),
            min_numel=_positive_int("quantize.min_numel", value.get("min_numel", 1024)),
        )


LOWRANK_METHODS = ("whitened", "svd")


@dataclass(frozen=True)
class LowRankConfig:
    """``lowrank``: Linear weights ``W [N, K]`` replaced by two factors ``A [N, r] @ B [r, K]``.

    ``ratio`` is the fraction of each layer's parameters kept (``r = ratio·N·K / (N + K)``); a
    layer is factored only where that saves bytes. ``method`` ``"whitened"`` (truncated SVD of
    ``W·L`` with ``L`` the Cholesky factor of the example inputs' ``XᵀX``, SVD-LLM) or ``"svd"``
    (plain truncated SVD of ``W``); ``damping``: ridge added to ``XᵀX`` as a fraction of its mean
diagonal (shrinks the whitening toward plain SVD where the example inputs are few); ``skip``:
fnmatch patterns; ``min_numel``: smaller weights stay.
    """

    ratio: float = 0.8
    method: str = "whitened"
    damping: float = 0.01
    skip: tuple[str, ...] = ()
    min_numel: int = 1024

    @classmethod
    def parse(cls, value: Any) -> LowRankConfig | None:
        if value is None or isinstance(value, LowRankConfig):
            return value
        accepted = "None | {'ratio': float in (0, 1], 'method': 'whitened' | 'svd', 'damping': float >= 0, 'skip': [patterns], 'min_numel': int}"
        if not isinstance(value, Mapping):
            raise _fail("lowrank", value, accepted)
        _check_keys("lowrank", value, ("ratio", "method", "damping", "skip", "min_numel"))
        damping = value.get("damping", 0.01)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
            raise _fail("lowrank.damping", damping, "a float >= 0")
        ratio = _fraction("lowrank.ratio", value.get("ratio", 0.8))
        if ratio == 0.0:
            raise _fail("lowrank.ratio", ratio, "a float in (0, 1]")
        return cls(ratio=ratio, method=_choice("lowrank.method", value.get("method", "whitened"), LOWRANK_METHODS),
                   damping=float(damping),
                   skip=_str_tuple("lowrank.skip", value.get("skip", ())),
                   min_numel=_positive_int("lowrank.min_numel", value.get("min_numel", 1024)))


@dataclass(frozen=True)
class TieConfig:
    """``tie_weights``: one storage for identical parameters (exact), or near-identical (similar)."""

    enabled: bool = True
    mode: str = "exact"
    rtol: float = 1e-3

    @classmethod
    def parse(cls, value: Any) -> TieConfig:
        if isinstance(value, TieConfig):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, Mapping):
            _check_keys("tie_weights", value, ("mode", "rtol", "enabled"))
            rtol = value.get("rtol", 1e-3)
            if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or rtol < 0:
                raise _fail("tie_weights.rtol", rtol, "a non-negative float")
            enabled = value.get("enabled", True)
            if not isinstance(enabled, bool):
                raise _fail("tie_weights.enabled", enabled, "True | False")
            return cls(enabled=enabled, mode=_choice("tie_weights.mode", value.get("mode", "exact"), ("exact", "similar")), rtol=float(rtol))
        raise _fail("tie_weights", value, "True | False | {'mode': 'exact' | 'similar', 'rtol': float}")


PRUNE_TARGETS = ("mlp", "heads", "channels", "experts")
PRUNE_IMPORTANCE = ("l2", "l1", "taylor", "activation")
PRUNE_GQA = ("groups", "queries")


@dataclass(frozen=True)
class PruneConfig:
    """``prune``: structured pruning of MLP neurons, attention heads and conv channels."""

    ratio: float = 0.3
    targets: tuple[str, ...] = PRUNE_TARGETS
    importance: str = "l2"
    gqa: str = "groups"  # grouped-query heads: remove whole kv "groups", or "queries" within each group

    @classmethod
    def parse(cls, value: Any) -> PruneConfig | None:
        if value is None or isinstance(value, PruneConfig):
            return value
        if isinstance(value, Mapping):
            _check_keys("prune", value, ("ratio", "targets", "importance", "gqa"))
            ratio = _fraction("prune.ratio", value.get("ratio", 0.3))
            if ratio >= 1.0:
                raise _fail("prune.ratio", ratio, "a float in [0, 1)")
            targets = _str_tuple("prune.targets", value.get("targets", PRUNE_TARGETS))
            for t in targets:
                _choice("prune.targets", t, PRUNE_TARGETS)
            return cls(ratio=ratio, targets=targets, importance=_choice("prune.importance", value.get("importance", "l2"), PRUNE_IMPORTANCE),
                       gqa=_choice("prune.gqa", value.get("gqa", "groups"), PRUNE_GQA))
        raise _fail("prune", value, "None | {'ratio': float in [0, 1), 'targets': [...], "
                    "'importance': 'l2'|'l1'|'taylor'|'activation', 'gqa': 'groups'|'queries'}")


@dataclass(frozen=True)
class LowerConfig:
    """``lower``: lower memory hotspots to generated Triton kernels.

    ``mode``: ``"auto"`` (where Triton runs natively, i.e. CUDA, or under ``TRITON_INTERPRET=1``),
    ``"on"`` (forced, the interpreter on CPU) or ``"off"``. ``max_kernels``: lower at most this
    many regions (best first); ``min_bytes``: only regions whose fusion saves at least this many
    bytes of memory traffic; ``persistent_max``: a row reduction whose row has at most this many
    elements runs as one block per row (persistent), longer rows loop over blocks.
    """

    mode: str = "auto"
    max_kernels: int | None = None
    min_bytes: int = 0
    persistent_max: int = 1024

    @classmethod
    def parse(cls, value: Any) -> LowerConfig:
        if isinstance(value, LowerConfig):
            return value
        if value is True:
            return cls(mode="on")
        if value is False:
            return cls(mode="off")
        if value == "auto":
            return cls(mode="auto")
        if isinstance(value, Mapping):
            _check_keys("lower", value, ("mode", "max_kernels", "min_bytes", "persistent_max"))
            mode = value.get("mode", "on")
            mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
            return cls(
                mode=_choice("lower.mode", mode, ("auto", "on", "off")),
                max_kernels=_positive_int("lower.max_kernels", value.get("max_kernels"), allow_none=True),
                min_bytes=_positive_int("lower.min_bytes", value.get("min_bytes", 0)),
                persistent_max=_positive_int("lower.persistent_max", value.get("persistent_max", 1024)),
            )
        raise _fail("lower", value, "'auto' | True | False | {'mode', 'max_kernels', 'min_bytes', 'persistent_max'}")


@dataclass(frozen=True)
class ShardConfig:
    """The ``shard`` pass (placement and collective annotations on per-rank graphs): no options.

    The pass is metadata only and always on; it has its own (empty) config so that every pass
    takes its own config, never the whole :class:`FxmemConfig`.
    """


@dataclass(frozen=True)
class ChunkConfig:
    """``chunk``: training graphs compute the logits (and, opt-in, the MLP) a chunk of tokens at a time.

    ``loss``: a ``linear → (float cast) → cross_entropy`` (or ``log_softmax → nll_loss``) becomes
    one chunked op (:mod:`fxmem.kernels.linear_ce`), so the ``[tokens, vocab]`` logits never exist
    whole. ``mlp``: the position-wise MLP (up [+ gate] → activation → down) is chunked along the tokens,
    forward and backward (:mod:`fxmem.kernels.chunked_mlp`). ``chunk_tokens``: rows per chunk; ``None`` picks one so that a chunk's logits
    are about the size of the hidden states (Liger's rule).
    """

    enabled: bool = True
    loss: bool = True
    mlp: bool = False
    chunk_tokens: int | None = None

    @classmethod
    def parse(cls, value: Any) -> ChunkConfig:
        accepted = "True | False | {'loss': bool, 'mlp': bool, 'chunk_tokens': positive int or None}"
        if isinstance(value, ChunkConfig):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, Mapping):
            _check_keys("chunk", value, ("loss", "mlp", "chunk_tokens"))
            flags = {}
            for k, default in (("loss", True), ("mlp", False)):
                v = value.get(k, default)
                if not isinstance(v, bool):
                    raise _fail(f"chunk.{k}", v, "True | False")
                flags[k] = v
            tokens = value.get("chunk_tokens")
            if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
                raise _fail("chunk.chunk_tokens", tokens, "a positive int or None (automatic)")
            return cls(enabled=flags["loss"] or flags["mlp"], loss=flags["loss"], mlp=flags["mlp"], chunk_tokens=tokens)
        raise _fail("chunk", value, accepted)


@dataclass(frozen=True)
class VerifyConfig:
    """``verify``: run eager once beside the compiled graph and raise on mismatch."""

    atol: float | None = None
    rtol: float | None = None

    @classmethod
    def parse(cls, value: Any) -> VerifyConfig | None:
        if value is None or value is False:
            return None
        if isinstance(value, VerifyConfig):
            return value
        if value is True:
            return cls()
        if isinstance(value, Mapping):
            _check_keys("verify", value, ("atol", "rtol"))
            tols = {}
            for k in ("atol", "rtol"):
                v = value.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                    raise _fail(f"verify.{k}", v, "a non-negative float")
                tols[k] = None if v is None else float(v)
            return cls(**tols)
        raise _fail("verify", value, "True | False | {'atol': float, 'rtol': float}")


# --------------------------------------------------------------------------------------------
# The whole configuration.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FxmemConfig:
    """All options, parsed. Build it with :func:`parse_options`."""

    remat: RematConfig = field(default_factory=RematConfig)
    precision: PrecisionConfig | None = None
    int8: Int8Config | None = None
    quantize: QuantizeConfig | None = None
    lowrank: LowRankConfig | None = None
    tie_weights: TieConfig = field(default_factory=TieConfig)
    prune: PruneConfig | None = None
    lower: LowerConfig = field(default_factory=LowerConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    verify: VerifyConfig | None = None
    codegen: str = "inductor"
    strict: bool = False

    def lossy_options(self) -> list[str]:
        """The option keys set here that change weights (allowed on inference graphs only)."""
        lossy = []
        if self.int8 is not None:
            lossy.append("int8")
        if self.quantize is not None:
            lossy.append("quantize")
        if self.lowrank is not None:
            lossy.append("lowrank")
        if self.prune is not None:
            lossy.append("prune")
        if self.tie_weights.enabled and self.tie_weights.mode == "similar":
            lossy.append("tie_weights")
        return lossy


_PARSERS = {
    "remat": RematConfig.parse,
    "precision": PrecisionConfig.parse,
    "int8": Int8Config.parse,
    "quantize": QuantizeConfig.parse,
    "lowrank": LowRankConfig.parse,
    "tie_weights": TieConfig.parse,
    "prune": PruneConfig.parse,
    "lower": LowerConfig.parse,
    "chunk": ChunkConfig.parse,
    "verify": VerifyConfig.parse,
}

CODEGENS = ("inductor", "eager")
"""``codegen``: who generates the code for fxmem's graphs. ``"inductor"``: fxmem's passes and
partition run inside Inductor (fusion, buffer reuse, re-inplacing, peak-memory reordering);
``"eager"``: the ATen graphs run op by op (each input released after its last use), with fxmem's
own Triton lowering (``lower``) of hotspots."""

OPTION_KEYS = tuple(_PARSERS) + ("codegen", "strict")


def parse_options(options: Mapping[str, Any] | FxmemConfig | None = None, **more: Any) -> FxmemConfig:
    """Parse user options (a dict and/or keywords) into a :class:`FxmemConfig`.

    >>> parse_options({"remat": {"budget": 0.5}}, precision="bf16").precision.dtype
    torch.bfloat16
    """
    if isinstance(options, FxmemConfig):
        return dataclasses.replace(options, **{k: v for k, v in parse_options(None, **more).__dict__.items() if k in more}) if more else options
    if options is not None and not isinstance(options, Mapping):
        raise OptionError(f"fxmem options must be a dict; got {type(options).__name__}. Accepted keys: {list(OPTION_KEYS)}")
    merged = {**(options or {}), **more}
    unknown = sorted(k for k in merged if k not in OPTION_KEYS)
    if unknown:
        raise OptionError(f"unknown fxmem option(s) {unknown}; accepted keys: {list(OPTION_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in merged.items():
        if key == "strict":
            if not isinstance(value, bool):
                raise _fail("strict", value, "True | False")
            values[key] = value
        elif key == "codegen":
            values[key] = _choice("codegen", value, CODEGENS)
        else:
            values[key] = _PARSERS[key](value)
    if values.get("int8") is not None and values.get("quantize") is not None:
        # int8= is quantize's shorthand: two weight quantizations of one weight cannot both apply
        raise OptionError("fxmem options 'int8' and 'quantize' both given; accepted: one of them "
                          "(int8='weight_only' is the shorthand of quantize={'bits': 8, 'group_size': None})")
    return FxmemConfig(**values)
