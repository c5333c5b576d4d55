"""A real English text corpus built from files already on the machine, and the built-in GPT trained on it.

The corpus is the **docstrings of the CPython standard library** that runs this code: every
top-level module ``<stdlib>/*.py`` whose name does not start with ``_``, in sorted order, parsed
with :mod:`ast` (never imported), each module's, class's and function's docstring cleaned by
:func:`inspect.cleandoc` and joined by blank lines. That is about 0.8 MB of technical English
prose on CPython 3.11 — no download, nothing shipped, the same bytes on every machine with the
same Python. Tokens are **bytes** (vocabulary 256), so no tokenizer is needed.

Held-out text is whole modules the model never saw: every ``held_out_every``-th module in sorted
order (8 by default: ``base64``, ``chunk``, ``contextlib``, …
on CPython 3.11) goes to the held-out split, the rest to training.

::

    from fxmem.testing import corpus
    data = corpus.build()                                   # Corpus(train=uint8 tensor, held_out=...)
    model = corpus.trained_gpt(data)                        # the built-in GPT, trained (cached)
    ppl = corpus.perplexity(model, data.held_out, batch=8, seq=128)

:func:`trained_gpt` trains deterministically (seeded batches, one thread recommended) and caches
the state dict under ``$FXMEM_CACHE`` (default ``~/.cache/fxmem``), keyed by a hash of the
corpus bytes, the model config and the training settings, so the benchmark trains once per
machine and a changed corpus or config never loads stale weights. Tests use the same functions
on a tiny corpus (``build(max_modules=…)``) and a tiny model.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fxmem.models.gpt import GPT, GPTConfig

VOCAB = 256  # byte-level tokens


@dataclass(frozen=True)
class Corpus:
    """Byte tokens (``uint8`` 1-D tensors) of the training and held-out splits, and where they came from."""

    train: torch.Tensor
    held_out: torch.Tensor
    train_modules: tuple[str, ...]
    held_out_modules: tuple[str, ...]
    source: str

    def digest(self) -> str:
        """SHA-256 of both splits: the cache key's view of the text."""
        h = hashlib.sha256()
        h.update(self.train.numpy().tobytes())
        h.update(b"\0held-out\0")
        h.update(self.held_out.numpy().tobytes())
        return h.hexdigest()


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_docstrings(path: Path) -> str:
    """The docstrings of one module file (module, classes, functions; in source order), cleaned and
    separated by blank lines; ``""`` when the file does not parse (a file for another Python)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):  # breadth-first, deterministic
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and doc.strip():
                docs.append(inspect.cleandoc(doc))
    return "\n\n".join(docs)


def build(held_out_every: int = 8, max_modules: int | None = None, directory: Path | None = None) -> Corpus:
    """The stdlib-docstring corpus, split by module (see the module docstring).

    ``max_modules`` keeps the first modules only (tests: a small corpus, still a real one);
    ``directory`` reads another directory of ``*.py`` files instead of the stdlib."""
    if held_out_every < 2:
        raise ValueError(f"corpus.build: held_out_every={held_out_every}; accepted: an int >= 2")
    root = directory or stdlib_dir()
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    train_parts, held_parts, train_names, held_names = [], [], [], []
    for i, path in enumerate(files[:max_modules]):
        text = module_docstrings(path)
        if not text:
            continue
        if i % held_out_every == held_out_every - 1:
            held_parts.append(text)
            held_names.append(path.stem)
        else:
            train_parts.append(text)
            train_names.append(path.stem)
    if not train_parts or not held_parts:
        raise ValueError(f"corpus.build: too few modules with docstrings under {root} "
                         f"({len(train_parts)} train, {len(held_parts)} held out); raise max_modules")
    return Corpus(_bytes("\n\n".join(train_parts)), _bytes("\n\n".join(held_parts)),
                  tuple(train_names), tuple(held_names), f"docstrings of {root}/*.py")


def _bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def default_config(**overrides) -> GPTConfig:
    """The benchmark's model: the built-in GPT's defaults (4 layers, d_model 128, block 128, tied
    head) with a byte vocabulary."""
    return GPTConfig(**{"vocab_size": VOCAB, **overrides})


def train_gpt(data: torch.Tensor, cfg: GPTConfig, steps: int, batch: int = 16, lr: float = 3e-3,
              seed: int = 0, log: Callable[[int, float], None] | None = None) -> GPT:
    """Train ``GPT(cfg)`` on random windows of ``data`` (next-byte prediction), AdamW with a linear
    warm-up and cosine decay. Deterministic for a given seed and thread count."""
    if data.numel() <= cfg.block_size + 1:
        raise ValueError(f"train_gpt: {data.numel()} tokens is too few for windows of {cfg.block_size + 1}")
    torch.manual_seed(seed)
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    data = data.long()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - cfg.block_size - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + cfg.block_size + 1] for s in starts.tolist()])
        _, loss = model(window[:, :-1], window[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(step, float(loss.detach()))
    return model.eval()


def cache_dir() -> Path:
    """``$FXMEM_CACHE`` or ``~/.cache/fxmem`` (outside the repository: nothing to ignore in git)."""
    return Path(os.environ.get("FXMEM_CACHE", Path.home() / ".cache" / "fxmem"))


def trained_gpt(corpus: Corpus, cfg: GPTConfig | None = None, steps: int = 400, batch: int = 16, lr: float = 3e-3,
                seed: int = 0, cache: bool = True, log: Callable[[int, float], None] | None = None) -> GPT:
    """The built-in GPT trained on ``corpus.train`` (:func:`train_gpt`), from the cache when a
    state dict with the same key exists (eval mode either way)."""
    cfg = cfg or default_config()
    settings = {"config": asdict(cfg), "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                "corpus": corpus.digest(), "torch": torch.__version__.split("+")[0].rsplit(".", 1)[0]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"gpt_stdlib_docstrings_{key}.pt"
    if cache and path.exists():
        model = GPT(cfg)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_gpt(corpus.train, cfg, steps, batch, lr, seed, log)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic: a concurrent reader sees the whole file or none
    return model


def windows(data: torch.Tensor, batch: int, seq: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping ``[batch, seq + 1]`` windows of ``data`` (a fixed shape, as an
    optimized module is specialized to its example batch; the remainder is dropped)."""
    per = seq + 1
    n = data.numel() // (per * batch)
    if n == 0:
        raise ValueError(f"windows: {data.numel()} tokens is fewer than one batch of {batch} x {per}")
    flat = data[: n * batch * per].long().view(n, batch, per)
    return list(flat)


@torch.no_grad()
def perplexity(model: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, batch: int = 8, seq: int = 128,
               max_batches: int | None = None) -> float:
    """``exp`` of the mean next-byte cross-entropy of ``model`` (``idx [B, T] → logits [B, T, V]``)
    over consecutive windows of ``data``, each window's first byte predicted from nothing (as
    trained)."""
    total, count = 0.0, 0
    for w in windows(data, batch, seq)[:max_batches]:
        logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(total / count)
