"""Benchmark one MoE-Retriever training step (forward + backward + AdamW step)
on mfeat: our batched model vs a per-pair loop in the style of the official
code, with the same weights, in the same run.

The peer follows the official training loop (moe-retriever ``main.py``): for
every target modality, for every sample missing it, ``random.sample`` a
supporting group from Python index lists keyed by modality combination,
re-encode the group's target features and the sample's observed modalities,
then one retriever call (pre-LN attention over the pair's tokens, the noisy
top-k gate restricted to the target's experts, the experts) per pair. It
computes the paper variant (the retrieved embedding is the SMoE output and the
gate loss is added), exactly what ``retriever_variant="paper"`` computes.

Before timing, both run one step on the same supporting groups and gate noise
(dropout is 0 so that nothing else is random) and their losses and gradients
must agree. Default: batch 128 of the train split under the uniform protocol,
the pool = the 1,200 training samples, ModelConfig defaults (D = 64, H = 128,
C = 8, C_s = 4, k = 4).

    python benchmarks/bench_moe_retriever.py
    python benchmarks/bench_moe_retriever.py --batch 64 --rounds 5
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mars_kernels as mk  # noqa: E402
from mars.data import MissingnessProtocol, load_data  # noqa: E402
from mars.config import ModelConfig  # noqa: E402
from mars.methods import build_model  # noqa: E402


class LoopRetriever:
    """The official code's per-pair retrieval loop around ``model``'s modules."""

    def __init__(self, model, pool):
        self.model = model
        self.pool_features = pool.features
        by_combination: dict[tuple, list[int]] = {}
        for j, row in enumerate(pool.available.tolist()):
            by_combination.setdefault(tuple(m for m, has in enumerate(row) if has), []).append(j)
        self.by_combination = by_combination

    def supporting_group(self, target: int, observed: list[int], sample: int) -> list[int]:
        need = set(observed) | {target}
        pool = [j for combo, rows in self.by_combination.items() if need <= set(combo) for j in rows if j != sample]
        return random.sample(pool, len(observed))

    def forward_loss(self, feats, observed, labels, sample_index, groups=None, noise=None):
        """groups: {(b, t): [pool rows]} and noise [T, A] (the batched model's
        token order) reproduce a batched step; otherwise both are drawn here."""
        model = self.model
        cfg, smoe, retr = model.config, model.retriever.smoe, model.retriever
        alpha, k = cfg.retriever_alpha, cfg.retriever_k
        h = model.encode(feats)
        filled = model.encode.with_missing(h, observed).clone()
        B, N, M, D = filled.shape
        offsets = {}
        if noise is not None:  # where each pair's tokens start in the batched order
            start = 0
            for b, t in zip(*(x.tolist() for x in model.missing_pairs(observed))):
                offsets[b, t] = start
                start += N * 2 * int(observed[b].sum())
        importance, load = {}, {}
        for t in range(M):
            for b in (~observed[:, t] & observed.any(1)).nonzero().flatten().tolist():
                obs = observed[b].nonzero().flatten().tolist()
                rows = groups[b, t] if groups is not None else self.supporting_group(t, obs, int(sample_index[b]))
                intra = model._encode_modality(t, self.pool_features[model.modalities[t]][rows])
                inter = torch.cat([model._encode_modality(m, feats[model.modalities[m]][b : b + 1]) for m in obs])
                seq = torch.cat([intra, inter]).transpose(0, 1)  # [N, S, D]
                normed = retr.norm(seq)
                z = seq + retr.attn(normed, normed, normed, need_weights=False)[0]
                tokens = z.reshape(-1, D)
                cols = smoe.allowed[t]
                pair_noise = None if noise is None else noise[offsets[b, t] : offsets[b, t] + tokens.shape[0]]
                w, local, imp, ld = mk.noisy_topk_gating(tokens, smoe.w_gate[:, cols], smoe.w_noise[:, cols], k,
                                                         training=True, noise=pair_noise, backend=cfg.backend)
                r = smoe.experts(tokens, w, cols[local]).reshape(N, -1, D)
                filled[b, :, t] = (1 - alpha) * r[:, : len(rows)].mean(1) + alpha * r[:, len(rows):].mean(1)
                importance[t] = importance.get(t, 0) + imp
                load[t] = load.get(t, 0) + ld
        balance = torch.stack([mk.noisy_balance_loss(importance[t], load[t]) for t in importance]).mean()
        logits = model.readout(model.fuse(filled))
        return F.cross_entropy(logits, labels) + cfg.lambda_gate * balance


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/bench_moe_retriever_cpu.json)")
    a = p.parse_args(argv)

    device = torch.device("cpu")
    train_set, _, _ = load_data("mfeat", seed=a.seed)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    cfg = ModelConfig(method="moe_retriever", dropout=0.0)
    model = build_model(train_set.modalities, train_set.feature_shapes, train_set.num_classes, train_set.task, cfg)
    model.prepare(train_set, seed=a.seed, log=lambda *x: None)
    model.train()
    peer = LoopRetriever(model, train_set)
    gen = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(train_set), generator=gen)[: a.batch]
    feats = {m: train_set.features[m][idx] for m in train_set.modalities}
    labels = train_set.labels[idx]
    observed = MissingnessProtocol.parse("uniform").sample(train_set.available[idx], gen)

    # Same supporting groups and gate noise: losses and gradients must agree.
    groups = model.draw_supporting(observed, "train", idx)
    b_all, t_all = model.missing_pairs(observed)
    by_pair = {(b, t): groups.index[q][groups.valid[q]].tolist()
               for q, (b, t) in enumerate(zip(b_all.tolist(), t_all.tolist()))}
    tokens = int(groups.valid.sum() + observed[b_all].sum())  # N = 1 on mfeat
    noise = torch.randn(tokens, cfg.retriever_candidates + cfg.retriever_shared, generator=gen)
    model.zero_grad(set_to_none=True)
    out = model(feats, observed, mode="train", sample_index=idx, supporting=groups, gate_noise=noise)
    ours, _ = model.loss(out, labels)
    ours.backward()
    ours_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    looped = peer.forward_loss(feats, observed, labels, idx, groups=by_pair, noise=noise)
    looped.backward()
    torch.testing.assert_close(ours.detach(), looped.detach(), atol=1e-5, rtol=1e-5)
    loop_grads = _grads(model)
    assert ours_grads.keys() == loop_grads.keys(), set(ours_grads) ^ set(loop_grads)
    for name, g in ours_grads.items():
        torch.testing.assert_close(g, loop_grads[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    print(f"check: loss {float(ours.detach()):.6f} (batched) vs {float(looped.detach()):.6f} (loop); "
          f"{len(ours_grads)} gradients agree")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    fns = {
        "batched": common.training_step(opt, lambda: model.loss(model(feats, observed, mode="train", sample_index=idx), labels)[0]),
        "loop": common.training_step(opt, lambda: peer.forward_loss(feats, observed, labels, idx)),
    }
    times = common.interleaved_medians(fns, device, a.rounds)
    env = common.environment(device)
    pairs = int(b_all.numel())
    print(f"# {env['device']} | torch {env['torch']} | MoE-Retriever (paper) training step on mfeat, batch {a.batch}, "
          f"{pairs} missing pairs, D={cfg.d_model}, H={cfg.d_hidden}, E={model.retriever.smoe.num_experts}, "
          f"k={cfg.retriever_k}")
    rows = []
    for name in fns:
        row = dict(op="moe_retriever_train_step", variant="paper", impl=name, batch=a.batch, pairs=pairs,
                   D=cfg.d_model, H=cfg.d_hidden, k=cfg.retriever_k, median_ms=times[name] * 1e3,
                   speedup_vs_loop=times["loop"] / times[name])
        rows.append(row)
        print(f"{name:>8}: {row['median_ms']:9.1f} ms  x{row['speedup_vs_loop']:.1f} vs loop")
    print(f"wrote {common.write_results('bench_moe_retriever', env, rows, a.out)}")


if __name__ == "__main__":
    main()
