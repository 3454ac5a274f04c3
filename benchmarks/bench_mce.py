"""Benchmark one MCE training step (forward + loss + backward + AdamW step) on
the mfeat data under the uniform protocol: our batched ``MCEModel`` against a
per-sample loop in the style of the official code (one forward call per
(sample, subset), coalition values in a Python dict keyed by subset tuples with
a host sync per prediction, Shapley values by Python loops, the frozen
teachers run every step), with the same weights. The peer's loss is checked
against ours (dropout off) before timing.

    python benchmarks/bench_mce.py
    python benchmarks/bench_mce.py --batch 64 --rounds 5 --threads 2
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mars.data import MissingnessProtocol, load_mfeat  # noqa: E402
from mars.config import ModelConfig  # noqa: E402
from mars.methods import build_model  # noqa: E402


def _shapley_loop(v: dict, M: int, variant: str) -> list[float]:
    """phi_m from coalition values v {sorted modality tuple: value}, by the formula."""
    val = lambda S: v.get(tuple(sorted(S)), 0.0)  # noqa: E731
    phi = []
    for m in range(M):
        total = 0.0 if variant == "exact" else val((m,)) / M
        for r in range(M + 1):
            for S in itertools.combinations(range(M), r):
                if variant == "exact" and m not in S:
                    w = math.factorial(r) * math.factorial(M - r - 1) / math.factorial(M)
                    total += w * (val(S + (m,)) - val(S))
                elif variant == "code" and m in S and r >= 2:
                    w = math.factorial(r - 1) * math.factorial(M - r) / math.factorial(M)
                    total += w * (val(S) - val((m,)))
        phi.append(total)
    return phi


def looped_loss(model, feats: dict, observed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The MCE training loss (classification) computed sample by sample and
    subset by subset, as the official code does."""
    cfg = model.config
    B, M = observed.shape
    h = model.encode(feats)
    completed = model.complete(model.tokens(h, observed))
    logits = model.readout(completed)
    task = F.cross_entropy(logits, labels)
    with torch.no_grad():
        u = [0.0] * M
        for m, (name, teacher) in enumerate(zip(model.modalities, model.teachers)):
            u[m] = float(((teacher(feats[name]).argmax(dim=1) == labels) & observed[:, m]).sum().item())
    v: dict[tuple, float] = {}
    pred = logits.argmax(dim=1)
    for b in range(B):
        key = tuple(observed[b].nonzero().flatten().tolist())
        v[key] = v.get(key, 0.0) + float((pred[b] == labels[b]).item())
    sub = 0.0
    com = [0.0] * M
    for b in range(B):
        present = observed[b].nonzero().flatten().tolist()
        K_b = 2 ** len(present) - 1
        for r in range(1, len(present)):
            for S in itertools.combinations(present, r):
                keep = torch.zeros(1, M, dtype=torch.bool)
                keep[0, list(S)] = True
                hs = model.complete(model.tokens(h[b : b + 1], keep))
                ls = model.readout(hs)
                sub = sub + F.cross_entropy(ls, labels[b : b + 1]) / K_b
                for m in present:
                    if m not in S:
                        com[m] = com[m] + (completed[b, :, m] - hs[0, :, m]).abs().mean() / K_b
                v[S] = v.get(S, 0.0) + float((ls.argmax(dim=1) == labels[b]).item())
    active = int(observed.any(dim=1).sum().item())
    sub = sub / active
    mod_logits = model.modality_readout(completed)  # [B, M, K]
    sep = []
    for m in range(M):
        rows = observed[:, m]
        sep.append(F.cross_entropy(mod_logits[rows, m], labels[rows]) if rows.any() else mod_logits.sum() * 0)
    phi = _shapley_loop(v, M, cfg.mce_shapley)
    n = observed.sum(dim=0).tolist()
    a = model.dataset_factor.tolist()
    w = []
    for m in range(M):
        b_m = (max(u[m] - phi[m], 0.0) / n[m] if n[m] else 0.0) if cfg.mce_use_b else 1.0
        w.append(a[m] * b_m)
    sep_term = sum(w[m] * sep[m] for m in range(M)) / M
    com_term = sum(w[m] * com[m] / active for m in range(M))
    return task + cfg.lambda_sep * sep_term + cfg.lambda_com * com_term + cfg.lambda_sub * sub


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, multi-threaded tiny ops in the loop peer "
                        "mostly measure thread contention, which would flatter the batched model)")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/bench_mce_cpu.json)")
    a = p.parse_args(argv)

    device = torch.device("cpu")
    torch.set_num_threads(a.threads)
    train_set = load_mfeat(seed=0)[0]
    shapes = {m: tuple(train_set.features[m].shape[1:]) for m in train_set.modalities}
    torch.manual_seed(0)
    cfg = ModelConfig(method="mce", d_model=a.d_model, d_hidden=a.d_hidden, fusion_heads=a.heads,
                      mce={"teacher_epochs": 2})
    model = build_model(train_set.modalities, shapes, train_set.num_classes, train_set.task, cfg)
    protocol = MissingnessProtocol.parse("uniform")
    model.prepare(train_set, protocol=protocol, seed=0, resume=False, log=lambda *args: None)
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[: a.batch]
    feats = {m: train_set.features[m][idx] for m in train_set.modalities}
    labels = train_set.labels[idx]
    observed = protocol.sample(torch.ones(a.batch, len(shapes), dtype=torch.bool), torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def ours_loss():
        return model.loss(model(feats, observed, mode="train", sample_index=idx), labels)[0]

    model.eval()  # dropout off: both losses are deterministic
    with torch.no_grad():
        ours, peer = ours_loss(), looped_loss(model, feats, observed, labels)
    torch.testing.assert_close(ours, peer, atol=1e-5, rtol=1e-5)
    passes = int(model(feats, observed, mode="train", sample_index=idx).aux["sub_sample"].numel())
    model.train()

    times = common.interleaved_medians(
        {"batched": common.training_step(opt, ours_loss),
         "per_sample_loop": common.training_step(opt, lambda: looped_loss(model, feats, observed, labels))},
        device, a.rounds)
    env = common.environment(device)
    speedup = times["per_sample_loop"] / times["batched"]
    print(f"# {env['device']} | torch {env['torch']} | MCE training step on mfeat, batch {a.batch}, "
          f"{passes} subset passes, D={a.d_model}, d_hidden={a.d_hidden}; losses agree ({float(ours):.6f})")
    print(f"        batched: {times['batched'] * 1e3:9.1f} ms")
    print(f"per_sample_loop: {times['per_sample_loop'] * 1e3:9.1f} ms")
    print(f"speed-up: x{speedup:.1f}")
    row = dict(op="mce_train_step", data="mfeat", protocol="uniform", batch=a.batch, subset_passes=passes,
               D=a.d_model, d_hidden=a.d_hidden, batched_ms=times["batched"] * 1e3,
               per_sample_loop_ms=times["per_sample_loop"] * 1e3, speedup=speedup)
    print(f"wrote {common.write_results('bench_mce', env, [row], a.out)}")


if __name__ == "__main__":
    main()
