"""MoE-Retriever (Yun et al., "Sparse MoE as a New Retriever: Addressing
Missing Modality Problem in Incomplete Multimodal Data"), batched, on the
encoders, fusion and head of MARS. Method note: shared/reference/moe_retriever.md.

Shapes: B samples, M modalities, N tokens per sample (1 for vectors, H*W for
maps), D width, Q (sample, missing modality) pairs, G = max |O_n| supporting
slots, S = G + M sequence slots, E = C*M + C_s experts, A = C + C_s experts
allowed per target, k experts per token.

For every pair (n, t) with t not observed and O_n non-empty:

1. supporting group G_n^t: |O_n| pool (train split) samples that have t and
   all of O_n, drawn uniformly (:mod:`.supporting`, with its fallbacks);
2. intra tokens f_t(x_j^t), j in G; inter tokens f_m(x_n^m), m in O_n;
3. ``retriever_variant="paper"``: at each token position separately, the
   sequence of the |G| + |O_n| intra/inter tokens of that position goes
   through Z = X + MHA(LN(X)) (padding masked); every token of Z is routed by
   a noisy top-k gate restricted to target t's C own experts plus the C_s
   shared ones, r(z) = sum_e g_e(z) E_e(z); the retrieved embedding is
   h^_n^t = (1 - alpha) mean_j r(Z_intra_j) + alpha mean_m r(Z_inter_m).
   Loss = CE + lambda_gate * mean over targets of CV^2(importance) +
   CV^2(load), both over the allowed experts only.
   ``retriever_variant="code"``: h^ = (1 - alpha) mean_j f_t(x_j^t) + alpha
   mean_m f_m(x_n^m), the official code's output (it computes the attention
   and SMoE and then discards them; we do not build them), no gate loss.
4. retrieved embeddings fill the missing slots (pairs without a group keep the
   learned missing embedding), then the MARS fusion and head.

Training encodes the supporting samples with gradient (as the official code);
``mode="eval"`` encodes the pool once, caches it (rebuilt when the model
switches train/eval mode or an encoder parameter changes) and draws groups
from a generator re-seeded at every call, so evaluation is reproducible. The
official code puts validation and test samples into their own pool; ours is
only ever the train split attached by ``prepare``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import mars_kernels as mk

from ..components import (
    ModalityAttentionFusion,
    ModalityEncoders,
    as_dtype,
    call_in_dtype,
    cross_entropy,
    token_readout,
    total_and_parts,
)
from ..interface import MethodModel, Output
from .supporting import NONE, SupportingGroups, sample_supporting

if TYPE_CHECKING:
    from ..config import ModelConfig

EVAL_TOKEN_BUDGET = 1 << 18  # sequence tokens per retriever chunk in eval (bounds memory on maps)
POOL_ENCODE_CHUNK = 1024


def allowed_experts(num_modalities: int, candidates: int, shared: int) -> Tensor:
    """[M, C + C_s] int64: target t may use experts [t*C, (t+1)*C) and the
    shared block [C*M, C*M + C_s)."""
    own = torch.arange(num_modalities)[:, None] * candidates + torch.arange(candidates)[None]
    common = candidates * num_modalities + torch.arange(shared)
    return torch.cat([own, common.expand(num_modalities, shared)], dim=1)


class RestrictedSMoE(nn.Module):
    """Noisy top-k SMoE whose router, for a token retrieving target t, only
    sees the A allowed experts of t.

    forward(x [T, D], target [T] int64, training, noise [T, A] | None) ->
    (y [T, D], weights [T, k], indices [T, k] global expert ids, balance []).
    W_g and W_n start at zero, as FastMoE's NoisyGate: routing is driven by
    the noise at first and every allowed expert gets tokens early on.
    """

    def __init__(self, d: int, d_hidden: int, num_modalities: int, candidates: int, shared: int, k: int,
                 activation: str = "gelu", backend: str | None = None):
        super().__init__()
        self.num_experts = candidates * num_modalities + shared
        self.k, self.backend = k, backend
        self.register_buffer("allowed", allowed_experts(num_modalities, candidates, shared), persistent=False)
        self.w_gate = nn.Parameter(torch.zeros(d, self.num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d, self.num_experts))
        self.experts = mk.Experts(d, d_hidden, self.num_experts, activation=activation, backend=backend)

    def route(self, x: Tensor, target: Tensor, training: bool, noise: Tensor | None = None):
        """-> weights [T, k], indices [T, k] (global ids), balance [] (mean over
        the targets present of CV^2(importance) + CV^2(load) on their A experts)."""
        T, k = x.shape[0], self.k
        A = self.allowed.shape[1]
        if noise is not None and tuple(noise.shape) != (T, A):
            raise ValueError(f"noise must have shape [T, A] = [{T}, {A}], got {list(noise.shape)}")
        weights = x.new_zeros(T, k)
        indices = torch.zeros(T, k, dtype=torch.long, device=x.device)
        balances = []
        for t in torch.unique(target).tolist():  # one gate per target modality (M at most)
            rows = (target == t).nonzero().squeeze(1)
            cols = self.allowed[t]
            w, local, importance, load = mk.noisy_topk_gating(
                x[rows], as_dtype(self.w_gate[:, cols], x.dtype), as_dtype(self.w_noise[:, cols], x.dtype), k,
                training=training,
                noise=None if noise is None else noise[rows], backend=self.backend)
            weights = weights.index_copy(0, rows, w.to(x.dtype))
            indices = indices.index_copy(0, rows, cols[local])
            balances.append(mk.noisy_balance_loss(importance, load))
        balance = torch.stack(balances).mean() if balances else x.new_zeros(())
        return weights, indices, balance

    def forward(self, x: Tensor, target: Tensor, training: bool, noise: Tensor | None = None):
        weights, indices, balance = self.route(x, target, training, noise)
        return call_in_dtype(self.experts, x.dtype, x, weights, indices), weights, indices, balance


class ContextRetriever(nn.Module):
    """Pre-LN multi-head attention over a pair's intra and inter tokens (per
    token position), then the restricted SMoE, then the alpha-weighted means.

    forward(intra [Q, G, N, D], intra_valid [Q, G], inter [Q, M, N, D],
    inter_valid [Q, M], target [Q], alpha, training, noise [T, A] | None) ->
    (h^ [Q, N, D], balance [], indices [T, k]). T counts the valid
    (pair, position, slot) tokens in that row-major order.
    """

    def __init__(self, config: ModelConfig, num_modalities: int):
        super().__init__()
        d = config.d_model
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, config.fusion_heads, dropout=config.dropout, batch_first=True)
        self.smoe = RestrictedSMoE(d, config.d_hidden, num_modalities, config.retriever.candidates,
                                   config.retriever.shared, config.retriever.k, config.activation, config.backend)

    def forward(self, intra, intra_valid, inter, inter_valid, target, alpha: float, training: bool,
                noise: Tensor | None = None):
        Q, G, N, D = intra.shape
        x = torch.cat([intra, inter], dim=1).transpose(1, 2)  # [Q, N, S, D]
        valid = torch.cat([intra_valid, inter_valid], dim=1)  # [Q, S]
        S = valid.shape[1]
        seq = x.reshape(Q * N, S, D)
        pad = (~valid)[:, None].expand(Q, N, S).reshape(Q * N, S)
        normed = self.norm(seq)
        z = seq + self.attn(normed, normed, normed, key_padding_mask=pad, need_weights=False)[0]
        keep = (~pad).reshape(-1).nonzero().squeeze(1)  # the T real tokens
        token_target = target[:, None].expand(Q, N * S).reshape(-1)[keep]
        y, _, indices, balance = self.smoe(z.reshape(-1, D)[keep], token_target, training, noise)
        r = y.new_zeros(Q * N * S, D).index_copy(0, keep, y).reshape(Q, N, S, D)
        intra_mean = r[:, :, :G].sum(2) / intra_valid.sum(1).clamp(min=1)[:, None, None]
        inter_mean = r[:, :, G:].sum(2) / inter_valid.sum(1).clamp(min=1)[:, None, None]
        return (1 - alpha) * intra_mean + alpha * inter_mean, balance, indices


class MoERetrieverModel(MethodModel):
    """MoE-Retriever (``config.method == "moe_retriever"``).

    forward(features, observed [B, M] bool, available=None (unused: retrieval
    only sees ``observed``), mode="train" | "eval", sample_index [B] | None,
    supporting=None, gate_noise=None) -> Output(logits [B, K] or [B, K, H, W],
    aux). ``sample_index`` (train-set rows of the batch, given by the training
    loop) keeps a sample out of its own supporting groups. ``supporting``
    (a :class:`SupportingGroups` for the pairs of :meth:`missing_pairs`) and
    ``gate_noise`` ([T, A] standard normals, tokens in the retriever's order)
    replace the model's own draws, for tests and benchmarks. aux: "balance"
    (paper variant, training), "expert_load" [E] (share of routed
    assignments), "supporting_source" [3] (pairs per ELIGIBLE, TARGET_ONLY, NONE).
    """

    takes_sample_index = True
    may_skip_parameters = True  # the missing embedding and, in warm-up, the retriever get no gradient in some steps

    def __init__(self, modalities: list[str], shapes: dict[str, tuple[int, ...]], num_classes: int,
                 task: str, config: ModelConfig):
        super().__init__()
        self.config, self.task, self.num_classes = config, task, num_classes
        self.modalities = list(modalities)
        d = config.d_model
        self.encode = ModalityEncoders(modalities, shapes, d, config.dropout)
        self.fuse = ModalityAttentionFusion(d, config.fusion_heads, config.dropout, config.backend)
        self.retriever = ContextRetriever(config, len(modalities)) if config.retriever.variant == "paper" else None
        self.head = nn.Linear(d, num_classes)
        self.map_size = self.encode.map_size
        self.shapes = {m: tuple(shapes[m]) for m in modalities}
        # The last epoch given to set_epoch (-1: none, retrieval on); saved so a
        # restored checkpoint knows whether it was trained past the warm-up.
        self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))
        self.pool_features: dict[str, Tensor] | None = None
        self.pool_available: Tensor | None = None
        self.eval_seed = 0
        self._pool_cache: tuple[tuple, Tensor] | None = None

    # ------------------------------------------------------------- hooks
    def prepare(self, train_set, *, protocol=None, seed: int = 0, resume: bool = False, log=print) -> None:
        """Attach ``train_set`` as the supporting pool and seed evaluation
        draws with ``seed``. Draws nothing from the global RNG."""
        self.attach_pool(train_set)
        self.eval_seed = int(seed)
        if not resume:
            log(f"moe_retriever: supporting pool = the {len(train_set)} training samples")

    def set_epoch(self, epoch: int) -> None:
        """Retrieval is off while ``epoch < retriever_warmup`` (0-based)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch.fill_(epoch)

    def attach_pool(self, data) -> None:
        """Use ``data`` (a MultimodalDataset with this model's modalities and
        feature shapes; never the evaluation data) as the supporting pool. The
        pool moves with the model's device but is not part of the state_dict."""
        if list(data.modalities) != self.modalities:
            raise ValueError(f"pool modalities must be {self.modalities} (in this order), got {list(data.modalities)}")
        for m in self.modalities:
            if tuple(data.features[m].shape[1:]) != self.shapes[m]:
                raise ValueError(f"pool features of {m!r} must have shape [P, {', '.join(map(str, self.shapes[m]))}], "
                                 f"got {list(data.features[m].shape)}")
        device = self.head.weight.device
        self.pool_features = {m: data.features[m].to(device) for m in self.modalities}
        self.pool_available = data.available.to(device)
        self._pool_cache = None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.pool_features is not None:  # keep the pool on the parameters' device
            self.pool_features = {m: fn(x) for m, x in self.pool_features.items()}
            self.pool_available = fn(self.pool_available)
        self._pool_cache = None
        return self

    def train(self, mode: bool = True):
        self._pool_cache = None  # dropout on/off changes the encodings
        return super().train(mode)

    @property
    def retrieving(self) -> bool:
        epoch = int(self.epoch)
        return epoch < 0 or epoch >= self.config.retriever.warmup

    # ------------------------------------------------------------- pieces
    def _encode_modality(self, m: int, x: Tensor) -> Tensor:
        """Features of modality m [n, ...] -> tokens [n, N, D], as ModalityEncoders."""
        return self.encode.encode_modality(m, x)

    def _pool_tokens(self) -> Tensor:
        """The whole pool encoded without gradient, [M, P, N, D], cached."""
        key = tuple(p._version for p in self.encode.parameters()) + (self.training,)
        if self._pool_cache is not None and self._pool_cache[0] == key:
            return self._pool_cache[1]
        with torch.no_grad():
            tokens = torch.stack([
                torch.cat([self._encode_modality(i, x[s : s + POOL_ENCODE_CHUNK])
                           for s in range(0, x.shape[0], POOL_ENCODE_CHUNK)])
                for i, x in enumerate(self.pool_features[m] for m in self.modalities)
            ])
        self._pool_cache = (key, tokens)
        return tokens

    def _support_tokens(self, groups: SupportingGroups, target: Tensor, mode: str, like: Tensor) -> Tensor:
        """The intra tokens [Q, G, N, D] (zeros in invalid slots)."""
        Q, G = groups.index.shape
        if mode == "eval":
            tokens = self._pool_tokens()[target[:, None].expand(Q, G), groups.index]
            return tokens * groups.valid[:, :, None, None]
        slot_target = target[:, None].expand(Q, G)
        flat = like.new_zeros(Q * G, like.shape[1], like.shape[3])
        for m in torch.unique(slot_target[groups.valid]).tolist():  # one encoder call per modality
            slots = (groups.valid & (slot_target == m)).reshape(-1).nonzero().squeeze(1)
            rows, inverse = torch.unique(groups.index.reshape(-1)[slots], return_inverse=True)
            encoded = self._encode_modality(m, self.pool_features[self.modalities[m]][rows])
            flat = flat.index_copy(0, slots, encoded[inverse])
        return flat.reshape(Q, G, like.shape[1], like.shape[3])

    def readout(self, y: Tensor) -> Tensor:
        """The task head on the fused tokens, as MARS: y [B, N, D] -> [B, K] or [B, K, H, W]."""
        return token_readout(self.head, y, self.map_size)

    @staticmethod
    def missing_pairs(observed: Tensor) -> tuple[Tensor, Tensor]:
        """(sample [Q], target [Q]) of every missing slot of a sample that
        observes something, sample-major: the pair order of ``supporting``."""
        pairs = (~observed & observed.any(1, keepdim=True)).nonzero()
        return pairs[:, 0], pairs[:, 1]

    def draw_supporting(self, observed: Tensor, mode: str, sample_index: Tensor | None = None,
                        pairs: tuple[Tensor, Tensor] | None = None) -> SupportingGroups:
        """Supporting groups for :meth:`missing_pairs` of ``observed``: the
        global torch RNG in training (saved in checkpoints), a generator
        seeded with ``eval_seed`` at every eval call (so an eval batch always
        gets the same groups; they depend on the batch's composition)."""
        if self.pool_available is None:
            raise ValueError("moe_retriever has no supporting pool: call prepare(train_set, ...) or attach_pool(data) first")
        b, t = pairs if pairs is not None else self.missing_pairs(observed)
        generator = None
        if mode == "eval":
            generator = torch.Generator(device=observed.device).manual_seed(self.eval_seed)
        exclude = None if sample_index is None else sample_index.to(observed.device)[b]
        return sample_supporting(self.pool_available, observed[b], t, generator=generator, exclude=exclude)

    def complete_tokens(self, features, observed: Tensor, mode: str = "eval", sample_index: Tensor | None = None,
                        supporting: SupportingGroups | None = None, gate_noise: Tensor | None = None):
        """-> (h [B, N, M, D] with every unobserved slot retrieved or, without
        a group, the learned missing embedding; aux dict)."""
        h = self.encode(features)
        filled = self.encode.with_missing(h, observed)
        aux: dict[str, Tensor] = {}
        if not self.retrieving:
            return filled, aux
        b, t = self.missing_pairs(observed)
        groups = supporting if supporting is not None else self.draw_supporting(observed, mode, sample_index, (b, t))
        if groups.index.shape[0] != b.numel():
            raise ValueError(f"supporting must hold one group per missing pair ({b.numel()}), got {groups.index.shape[0]}")
        aux["supporting_source"] = torch.bincount(groups.source, minlength=3)
        use = (groups.source != NONE).nonzero().squeeze(1)
        b, t = b[use], t[use]
        groups = SupportingGroups(*(x[use] for x in groups))
        if b.numel() == 0:
            if mode == "train" and self.retriever is not None:
                aux["balance"] = h.new_zeros(())
            return filled, aux
        intra = self._support_tokens(groups, t, mode, h)  # [Q, G, N, D]
        inter = h[b].transpose(1, 2)  # [Q, M, N, D]
        inter_valid = observed[b]
        cfg = self.config
        if self.retriever is None:
            intra_mean = intra.sum(1) / groups.valid.sum(1).clamp(min=1)[:, None, None]
            inter_mean = (inter * inter_valid[:, :, None, None]).sum(1) / inter_valid.sum(1)[:, None, None]
            retrieved = (1 - cfg.retriever.alpha) * intra_mean + cfg.retriever.alpha * inter_mean
        else:
            retrieved, balance, indices = self._run_retriever(intra, groups.valid, inter, inter_valid, t, mode, gate_noise)
            if mode == "train":
                aux["balance"] = balance
            aux["expert_load"] = mk.expert_counts(indices, self.retriever.smoe.num_experts) / max(indices.numel(), 1)
        B, N, M, D = filled.shape
        flat = filled.transpose(1, 2).reshape(B * M, N, D).index_copy(0, b * M + t, retrieved.to(filled.dtype))
        return flat.reshape(B, M, N, D).transpose(1, 2), aux

    def _run_retriever(self, intra, intra_valid, inter, inter_valid, target, mode, gate_noise):
        alpha, training = self.config.retriever.alpha, mode == "train"
        if training:
            return self.retriever(intra, intra_valid, inter, inter_valid, target, alpha, True, gate_noise)
        if gate_noise is not None:
            raise ValueError("gate_noise only applies in mode='train' (evaluation routes without noise)")
        Q, G, N, _ = intra.shape
        step = max(1, EVAL_TOKEN_BUDGET // (N * (G + inter.shape[1])))
        parts = [self.retriever(intra[s : s + step], intra_valid[s : s + step], inter[s : s + step],
                                inter_valid[s : s + step], target[s : s + step], alpha, False)
                 for s in range(0, Q, step)]  # chunks bound eval memory on feature maps
        return torch.cat([p[0] for p in parts]), None, torch.cat([p[2] for p in parts])

    # ------------------------------------------------------------- forward
    def forward(self, features, observed: Tensor, available: Tensor | None = None, mode: str = "eval",
                sample_index: Tensor | None = None, supporting: SupportingGroups | None = None,
                gate_noise: Tensor | None = None) -> Output:
        if mode == "oracle":
            raise ValueError("mode='oracle' is not supported by moe_retriever")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        M = len(self.modalities)
        if not isinstance(observed, Tensor) or observed.dtype != torch.bool or observed.dim() != 2 or observed.shape[1] != M:
            raise TypeError(f"observed must be a [B, M={M}] bool tensor, got "
                            f"{getattr(observed, 'dtype', type(observed).__name__)} {list(getattr(observed, 'shape', []))}")
        filled, aux = self.complete_tokens(features, observed, mode, sample_index, supporting, gate_noise)
        return Output(self.readout(self.fuse(filled)), aux)

    def loss(self, out: Output, labels: Tensor, ignore_index: int | None = None) -> tuple[Tensor, dict]:
        """CE + lambda_gate * balance (paper variant) and its parts as floats."""
        parts = {"task": cross_entropy(out.logits, labels, ignore_index)}
        if "balance" in out.aux:
            parts["balance"] = self.config.retriever.lambda_gate * out.aux["balance"]
        return total_and_parts(parts)
