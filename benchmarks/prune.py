"""How much does fxmem's structured pruning remove, at what error, next to Torch-Pruning?

For HF Llama (GQA), GPT-2 and BERT built from small configs, and a small ResNet-style conv net,
at ratios 0.1–0.5 with L2 group magnitude importance: parameters, MACs (fxmem.analysis.graph_cost
on the captured ATen graph, for both tools), relative output error ‖y − y₀‖/‖y₀‖, and the CPU
latency ratio pruned/unpruned (fxmem; both as fxmem.optimize modules, 1 thread). Torch-Pruning
(if installed) prunes the same groups — MLP neurons, attention heads (whole kv groups with GQA),
conv channels — at the same ratio, with `GroupMagnitudeImportance(p=2)`; the benchmark counts the
manual attribute fixes each model needed after `pruner.step()` before its forward ran.

Then the recovery question: the built-in GPT trained briefly on a deterministic synthetic
grammar corpus, 30% of its MLP neurons pruned, then `fxmem.distill` — how much of the loss gap
does it close (and fine-tuning on hard labels alone for the same steps, for comparison)?

    PYTHONPATH=. python benchmarks/prune.py          # --quick (default): 3 ratios, short runs
    PYTHONPATH=. python benchmarks/prune.py --full   # 5 ratios, longer training

Writes benchmarks/results/prune.json and prune.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxmem  # noqa: E402
from fxmem.analysis import graph_cost  # noqa: E402
from fxmem.backend import DECOMPOSITIONS  # noqa: E402
from fxmem.capture import capture_inference  # noqa: E402
from fxmem.distill import distill_loss  # noqa: E402
from fxmem.models.gpt import GPT, GPTConfig  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # the side-by-side columns are left out
    tp = None

warnings.filterwarnings("ignore")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """ResNet-18's structure (stem, residual stages with downsample convs, pooled head), small."""

    def __init__(self, widths=(16, 32, 64), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _randomize_norms(model):
    """Random-init models have all-ones norm weights and zero running stats: make BN realistic."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def build(name):
    import transformers as tfm
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 32))
    mask = {"attention_mask": torch.ones_like(ids)}
    if name == "llama_gqa":
        cfg = tfm.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                              attn_implementation="eager", use_cache=False)
        return tfm.LlamaForCausalLM(cfg).eval(), (ids,), mask
    if name == "gpt2":
        cfg = tfm.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=8, n_positions=64,
                             attn_implementation="eager", use_cache=False)
        return tfm.GPT2LMHeadModel(cfg).eval(), (ids,), mask
    if name == "bert":
        cfg = tfm.BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                             intermediate_size=512, max_position_embeddings=64, attn_implementation="sdpa")
        return tfm.BertModel(cfg).eval(), (ids,), {}
    model = SmallResNet().eval()
    _randomize_norms(model)
    return model, (torch.randn(2, 3, 32, 32),), {}


def main_output(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    return out[0]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def macs(model, args, kwargs):
    gm = capture_inference(model, args, kwargs, DECOMPOSITIONS).gm
    return graph_cost(gm).flops // 2


def rel_error(y, y0):
    return float((y.float() - y0.float()).norm() / y0.float().norm())


def latency_ratio(base, pruned, reps):
    """min time of ``pruned`` / min time of ``base``, measured alternately (the machine is shared:
    alternating and taking the minimum keeps other load out of the ratio)."""
    times = ([], [])
    with torch.no_grad():
        base(), pruned()
        for _ in range(reps):
            for fn, acc in ((base, times[0]), (pruned, times[1])):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
    return min(times[1]) / min(times[0])


# --------------------------------------------------------------------------- Torch-Pruning
def tp_prune(name, model, args, kwargs, ratio):
    """Torch-Pruning on the same groups; returns (model, manual fixes applied, error or None)."""
    model = copy.deepcopy(model)
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    ignored, num_heads = [], {}
    if name == "llama_gqa":
        ignored = [model.lm_head] + [l.self_attn.o_proj for l in model.model.layers] + [l.mlp.down_proj for l in model.model.layers]
        for layer in model.model.layers:
            a = layer.self_attn
            num_heads[a.q_proj] = model.config.num_attention_heads
            num_heads[a.k_proj] = num_heads[a.v_proj] = model.config.num_key_value_heads
    elif name == "gpt2":
        ignored = [model.lm_head] + [b.attn.c_proj for b in model.transformer.h] + [b.mlp.c_proj for b in model.transformer.h]
        for b in model.transformer.h:
            num_heads[b.attn.c_attn] = model.config.n_head * 3
    elif name == "bert":
        ignored = [l.attention.output.dense for l in model.encoder.layer] + [l.output.dense for l in model.encoder.layer] + [model.pooler.dense]
        for l in model.encoder.layer:
            s = l.attention.self
            num_heads[s.query] = num_heads[s.key] = num_heads[s.value] = model.config.num_attention_heads
    else:
        ignored = [model.fc]
    try:
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=args[0] if not kwargs else {"input_ids": args[0], **kwargs}, importance=imp,
            pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=bool(num_heads),
            prune_head_dims=False, head_pruning_ratio=ratio, global_pruning=False)
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - report why Torch-Pruning could not prune it
        return None, 0, f"{type(exc).__name__}: {str(exc)[:160]}"
    fixes = 0
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - apply the attribute fixes of Torch-Pruning's own examples
        fixes = _tp_fixes(name, model, pruner)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return None, fixes, f"forward after pruning: {type(exc).__name__}: {str(exc)[:160]}"
    return model, fixes, None


def _tp_fixes(name, model, pruner):
    """Torch-Pruning's examples (prune_llm.py, prune_hf_bert.py) fix these attributes by hand."""
    n = 0
    if name == "llama_gqa":
        for layer in model.model.layers:
            a = layer.self_attn
            heads = a.q_proj.out_features // a.head_dim
            kv = a.k_proj.out_features // a.head_dim
            a.num_key_value_groups = heads // kv
            model.config.num_attention_heads, model.config.num_key_value_heads = heads, kv
            n += 3
    elif name == "gpt2":
        for b in model.transformer.h:
            b.attn.split_size = b.attn.c_attn.weight.shape[1] // 3
            b.attn.num_heads = pruner.num_heads[b.attn.c_attn] // 3
            b.attn.embed_dim = b.attn.split_size
            n += 3
    elif name == "bert":
        for l in model.encoder.layer:
            s = l.attention.self
            s.num_attention_heads = pruner.num_heads[s.query]
            s.attention_head_size = s.query.out_features // s.num_attention_heads
            s.all_head_size = s.query.out_features
            n += 3
    return n


# --------------------------------------------------------------------------- pruning table
def _tp_child(queue, name, model, args, kwargs, ratio, y0):
    torch.set_num_threads(1)
    tp_model, fixes, err = tp_prune(name, model, args, kwargs, ratio)
    out = {"tp_manual_fixes": fixes, "tp_error_message": err}
    if tp_model is not None:
        with torch.no_grad():
            yt = main_output(tp_model(*args, **kwargs))
        out.update(tp_params=n_params(tp_model), tp_error=rel_error(yt, y0))
        try:
            out["tp_macs"] = macs(tp_model, args, kwargs)
        except Exception as exc:  # noqa: BLE001
            out["tp_macs_error"] = str(exc)[:160]
    queue.put(out)


def tp_measure(name, model, args, kwargs, ratio, y0, timeout):
    """Torch-Pruning in a child process with a time limit (its dependency search can hang)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_tp_child, args=(queue, name, model, args, kwargs, ratio, y0))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"tp_error_message": f"timed out: MetaPruner did not finish in {timeout} s"}
    return queue.get() if not queue.empty() else {"tp_error_message": f"child exited with {proc.exitcode}"}


def prune_table(ratios, reps, tp_timeout=120):
    rows = []
    tp_timed_out: set[str] = set()
    for name in ("llama_gqa", "gpt2", "bert", "resnet"):
        model, args, kwargs = build(name)
        with torch.no_grad():
            y0 = main_output(model(*args, **kwargs))
        base = fxmem.optimize(model, *args, kwargs=kwargs)
        base_params, base_macs = n_params(model), macs(model, args, kwargs)
        for r in ratios:
            t = time.perf_counter()
            report = fxmem.explain(model, *args, kwargs=kwargs, prune={"ratio": r, "importance": "l2"}, strict=True)
            prune_s = time.perf_counter() - t
            stats = next(x for x in report.records if x.name == "prune").stats
            pruned = report.module
            with torch.no_grad():
                y = main_output(pruned(*args, **kwargs))
            row = {
                "model": name, "ratio": r,
                "params": base_params, "macs": base_macs,
                "fxmem_params": n_params(pruned), "fxmem_macs": stats.get("flops_after", 0) // 2,
                "fxmem_error": rel_error(y, y0), "fxmem_manual_fixes": 0, "fxmem_pass_s": prune_s,
                "fxmem_groups": [(g["layer"], g["kind"], g["dimension"]) for g in stats.get("groups", [])],
                "fxmem_latency_ratio": latency_ratio(lambda: base(*args, **kwargs), lambda: pruned(*args, **kwargs), reps),
            }
            if tp is not None and name not in tp_timed_out:
                row.update(tp_measure(name, model, args, kwargs, r, y0, tp_timeout))
                if (row.get("tp_error_message") or "").startswith("timed out"):
                    tp_timed_out.add(name)
            elif tp is not None:
                row["tp_error_message"] = "timed out at a lower ratio; not retried"
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "fxmem_groups"}), flush=True)
    return rows


# --------------------------------------------------------------------------- distillation demo
ANIMALS = ["cat", "dog", "bird", "fox", "owl", "horse", "mouse", "frog"]
ADJ = ["small", "big", "red", "quick", "lazy", "old", "young", "happy"]
VERBS = ["see", "chase", "like", "follow", "find", "hear"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _sentence(rng: random.Random) -> list[str]:
    """A small grammar: agreement (the cats see / the cat sees), counting, copying."""
    kind = rng.random()
    if kind < 0.5:
        plural = rng.random() < 0.5
        subj = rng.choice(ANIMALS) + ("s" if plural else "")
        verb = rng.choice(VERBS) + ("" if plural else "s")
        adj = [rng.choice(ADJ)] if rng.random() < 0.5 else []
        obj = rng.choice(ANIMALS) + ("s" if rng.random() < 0.5 else "")
        return ["the", *adj, subj, verb, "the", obj, "."]
    if kind < 0.8:
        start = rng.randrange(6)
        return ["count", *NUMBERS[start:start + rng.randrange(3, 5)], "."]
    word = [rng.choice(ANIMALS), rng.choice(NUMBERS)]
    return ["repeat", *word, "is", *word, "."]


def corpus(n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """A deterministic word-level token stream from the grammar, and its vocabulary."""
    vocab = sorted({".", "the", "count", "repeat", "is", *ADJ, *NUMBERS, *ANIMALS, *(a + "s" for a in ANIMALS),
                    *VERBS, *(v + "s" for v in VERBS)})
    index = {w: i for i, w in enumerate(vocab)}
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += [index[w] for w in _sentence(rng)]
    return torch.tensor(ids[:n_tokens]), vocab


def batches(stream, batch, block, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(stream) - block - 1, (batch,), generator=g)
        seq = torch.stack([stream[s:s + block + 1] for s in starts.tolist()])
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def eval_loss(model, data):
    with torch.no_grad():
        return sum(float(F.cross_entropy(main_output(model(x)).reshape(-1, main_output(model(x)).shape[-1]), y.reshape(-1)))
                   for x, y in data) / len(data)


def distill_demo(train_steps, distill_steps):
    torch.manual_seed(0)
    stream, vocab = corpus(80_000)
    split = int(0.9 * len(stream))
    train, held = stream[:split], stream[split:]
    cfg = GPTConfig(vocab_size=len(vocab), block_size=32, n_layer=2, n_head=4, d_model=64, mlp_ratio=4)
    teacher = GPT(cfg)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / train_steps)
    t = time.perf_counter()
    for x, y in batches(train, 16, cfg.block_size, train_steps, seed=1):
        _, loss = teacher(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t
    teacher.eval()
    held_batches = batches(held, 16, cfg.block_size, 8, seed=2)
    x0 = held_batches[0][0]
    teacher_loss = eval_loss(teacher, held_batches)
    data = batches(train, 16, cfg.block_size, distill_steps, seed=3)
    settings = {}
    for setting, prune_opts in (("mlp_30", {"ratio": 0.3, "targets": ["mlp"]}),
                                ("mlp_heads_50", {"ratio": 0.5, "targets": ["mlp", "heads"]})):
        pruned = fxmem.optimize(teacher, x0, prune=prune_opts)
        pruned_loss = eval_loss(pruned, held_batches)
        runs = {}
        for label, alpha in (("distill_a0.5", 0.5), ("distill_kl_only", 0.0), ("finetune_ce_only", 1.0)):
            student = fxmem.optimize(teacher, x0, prune=prune_opts)
            t = time.perf_counter()
            fxmem.distill(student, teacher, data, steps=distill_steps, alpha=alpha, temperature=2.0, lr=1e-3, progress=False)
            loss = eval_loss(student, held_batches)
            with torch.no_grad():
                kl = sum(float(distill_loss(student(x), teacher(x), None, temperature=1.0)[1]) for x, _ in held_batches) / len(held_batches)
            runs[label] = {"alpha": alpha, "held_out_loss": loss, "kl_to_teacher": kl,
                           "gap_closed": (pruned_loss - loss) / (pruned_loss - teacher_loss), "time_s": time.perf_counter() - t}
        settings[setting] = {"prune": prune_opts, "params": n_params(pruned), "pruned_loss": pruned_loss,
                             "teacher_check": eval_loss(teacher, held_batches), "recovery": runs}
    out = {
        "corpus": "synthetic grammar (agreement, counting, copying), word level, 80k tokens (90/10 split)",
        "vocab": len(vocab), "model": cfg.__dict__, "train_steps": train_steps, "train_s": train_s,
        "teacher_params": n_params(teacher), "uniform_loss": float(torch.log(torch.tensor(float(len(vocab))))),
        "teacher_loss": teacher_loss, "distill_steps": distill_steps, "temperature": 2.0, "lr": 1e-3,
        "settings": settings,
    }
    print(json.dumps(out, indent=1), flush=True)
    return out


# --------------------------------------------------------------------------- plot
def plot(rows, demo, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(4 * (len(names) + 1), 7))
    for j, name in enumerate(names):
        rs = [r for r in rows if r["model"] == name]
        ratios = [r["ratio"] for r in rs]
        ax = axes[0, j]
        ax.plot(ratios, [r["fxmem_params"] / r["params"] for r in rs], "o-", label="fxmem params")
        ax.plot(ratios, [r["fxmem_macs"] / r["macs"] for r in rs], "s--", label="fxmem MACs")
        if any("tp_params" in r for r in rs):
            tp = [r for r in rs if "tp_params" in r]
            ax.plot([r["ratio"] for r in tp], [r["tp_params"] / r["params"] for r in tp], "x:", label="Torch-Pruning params")
        ax.plot(ratios, [r["fxmem_latency_ratio"] for r in rs], "^-", label="fxmem CPU latency")
        ax.set_title(name)
        ax.set_xlabel("ratio")
        ax.set_ylabel("pruned / original")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        ax.plot(ratios, [r["fxmem_error"] for r in rs], "o-", label="fxmem")
        if any("tp_error" in r for r in rs):
            ax.plot([r["ratio"] for r in rs if "tp_error" in r], [r["tp_error"] for r in rs if "tp_error" in r], "x:", label="Torch-Pruning")
        ax.set_xlabel("ratio")
        ax.set_ylabel("relative output error")
        ax.legend(fontsize=7)
    for row, (setting, res) in enumerate(demo["settings"].items()):
        ax = axes[row, -1]
        labels = ["teacher", "pruned"] + list(res["recovery"])
        values = [demo["teacher_loss"], res["pruned_loss"]] + [v["held_out_loss"] for v in res["recovery"].values()]
        ax.bar(range(len(values)), values, color=["C2", "C3"] + ["C0"] * len(res["recovery"]))
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(min(values) * 0.95, max(values) * 1.02)
        ax.set_title(f"GPT, grammar corpus, {setting}:\nheld-out loss after {demo['distill_steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="5 ratios and longer training (default: --quick)")
    parser.add_argument("--quick", action="store_true", help="3 ratios, short training (the default)")
    a = parser.parse_args()
    torch.set_num_threads(1)
    ratios = [0.1, 0.2, 0.3, 0.4, 0.5] if a.full else [0.1, 0.3, 0.5]
    reps = 30 if a.full else 15
    t = time.perf_counter()
    rows = prune_table(ratios, reps)
    demo = distill_demo(train_steps=1500 if a.full else 800, distill_steps=300 if a.full else 150)
    os.makedirs(RESULTS, exist_ok=True)
    out = {
        "question": "structured pruning: params, MACs, output error vs Torch-Pruning; distillation recovery",
        "mode": "full" if a.full else "quick", "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", None), "threads": 1, "total_s": time.perf_counter() - t,
        "prune": rows, "distill": demo,
    }
    with open(os.path.join(RESULTS, "prune.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(rows, demo, os.path.join(RESULTS, "prune.png"))
    print(f"wrote {RESULTS}/prune.json and prune.png in {out['total_s']:.0f} s")


if __name__ == "__main__":
    main()
