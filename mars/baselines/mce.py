"""MCE (Zhao, Zhang, Zou, Pattern Recognition 2025): learning- and
representation-capability enhancement for imbalanced missing rates, batched.
The method note is shared/reference/mce.md; section numbers below refer to it.

Shapes: B samples, M modalities, N tokens per sample (1 for feature vectors,
H*W for feature maps), D = ``d_model``, K classes, C = 2^M - 1 non-empty
modality subsets (``mars.data.all_subsets`` order), P subset passes in a batch.

* Encoders (MARS's ``ModalityEncoders``) -> h [B, N, M, D]. An unobserved
  modality's tokens are zeroed; every token gets a learned position vector p_m
  (initialised to 0) -- the official code's zero tokens, no attention mask.
  (``ModalityEncoders.missing``, MARS's missing embedding, is unused here and frozen.)
* Completion Transformer: one pre-LN block across the M modality tokens at each
  token position -> completed features h~ [B, N, M, D] (section 2.2).
* Fused decoder g on the concatenation [M * D] -> K (classification: tokens
  averaged first; segmentation: per token -> [B, K, H, W]); per-modality heads
  g_m: D -> K.
* Frozen unimodal models T_m (same encoder + a linear classifier), trained in
  ``prepare`` on the training samples where m is observed under the training
  protocol's fixed masks; their per-sample correctness is cached.
* Training (section 4): the main prediction from O_b and, in ONE batched pass,
  the predictions from every non-empty proper subset S of every O_b. Losses:
  task CE + lambda_sep * mean_m w_m L_sep,m + lambda_com * sum_m w_m L_com,m
  + lambda_sub * L_sub, with w_m = a_m * b_m detached (a_m = 1 / (1 - r_m),
  b_m from Shapley credit of the coalition values, section 3).

Which features feed the subset passes: the *pre-Transformer* tokens (as the
nuScenes code does), i.e. h~^S = Inter(h * 1[S] + p). Then the subset pass is
exactly the computation the model performs at test time when only S is
observed, so L_sub trains the evaluated predictors and v(S) credits what the
model achieves from S alone. The IEMOCAP / AV-MNIST choice (masking the
already-completed h~) leaks the dropped modalities' information into the kept
tokens through the first attention pass, which makes both v(S) and the
completion target L_com partly trivial. With this choice the subset pass for
S = O_b equals the main pass, so the main prediction serves as v(O_b).

Modality order: the column order of ``observed`` (= ``modalities``) is used
for encoders, position vectors, heads, teachers, a_m and b_m alike. (The
official IEMOCAP code reads its mask columns as A, V, L in one place and as
A, L, V in others, partly swapping the L and V factors; there is no such swap
here.)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import (
    ModalityEncoders,
    ModalityHeads,
    ce_sum_count,
    cross_entropy,
    make_encoder,
    per_sample_ce,
    per_sample_score,
    total_and_parts,
)
from ..interface import MethodModel, Output

from .shapley import batch_factors, shapley_matrix
from .subsets import observed_columns, proper_subset_pairs, subset_table, subsets_per_sample

if TYPE_CHECKING:
    from ..config import ModelConfig

TEACHER_BATCH = 64
TEACHER_LR = 1e-3
MAX_MODALITIES = 10  # the subset pass enumerates up to 2^M - 2 subsets per sample
CACHE_CHUNK = 4096


class CompletionTransformer(nn.Module):
    """One pre-LN Transformer block across the modality axis at each token
    position (no attention mask, no qkv bias): x [..., M, D] -> [..., M, D].

    x <- x + Drop(MHSA(LN(x))); x <- x + FFN(LN(x)), FFN D -> d_hidden -> D (GELU).
    """

    def __init__(self, d: int, heads: int, d_hidden: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model={d} must be divisible by heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_hidden, d), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        lead, (M, D) = x.shape[:-2], x.shape[-2:]
        x = x.reshape(math.prod(lead), M, D)  # explicit sizes: T may be 0 (no subset passes)
        T = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).reshape(T, M, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [T, heads, M, D / heads]
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(T, M, D)))
        x = x + self.ffn(self.norm2(x))
        return x.reshape(*lead, M, D)


class UnimodalModel(nn.Module):
    """A frozen capability model T_m: MARS's encoder for one modality plus a
    linear classifier. x [B, d_m] -> [B, K]; x [B, C, H, W] -> [B, K]
    (classification, mean over positions) or [B, K, H, W] (segmentation)."""

    def __init__(self, shape: tuple[int, ...], d: int, num_classes: int, task: str, dropout: float):
        super().__init__()
        self.task = task
        self.encoder = make_encoder(tuple(shape), d, dropout)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = self.encoder(x)
        if z.dim() == 2:
            return self.head(z)
        if self.task == "segmentation":
            return self.head(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(z.mean(dim=(2, 3)))


class MCEModel(MethodModel):
    """MCE with MARS's encoders (``config.method == "mce"``).

    forward(features {m: [B, d_m] or [B, C_m, H, W]}, observed [B, M] bool,
    available=None (unused), mode="train" | "eval", sample_index [B] int64 =
    None) -> Output(logits [B, K] or [B, K, H, W], aux). ``mode="train"`` also
    runs the batched subset passes and puts in aux what ``loss`` needs; the
    frozen teachers' correctness comes from the cache built by ``prepare``
    (rows ``sample_index``) or, without ``sample_index``, from running the
    teachers (the same values). ``mode="oracle"`` raises ValueError.

    loss(out, labels, ignore_index) -> (total, parts): "task", "sub", "sep",
    "com" (each already multiplied by its lambda; they sum to the total) and
    "b/<modality>", the batch factors b_m (diagnostics, not loss terms).

    Parameters without gradient: the teachers and ``encode.missing`` (frozen);
    all others get one every training step (zero where w_m = 0).
    """

    takes_sample_index = True

    def __init__(self, modalities: list[str], shapes: dict[str, tuple[int, ...]], num_classes: int,
                 task: str, config: ModelConfig):
        super().__init__()
        M = len(modalities)
        if not 1 <= M <= MAX_MODALITIES:
            raise ValueError(f"MCE enumerates all 2^M - 1 modality subsets; modalities must number 1..{MAX_MODALITIES}, got {M}")
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
        self.config, self.task, self.num_classes = config, task, num_classes
        self.modalities = list(modalities)
        d = config.d_model
        self.encode = ModalityEncoders(modalities, shapes, d, config.dropout)
        self.encode.missing.requires_grad_(False)
        if task == "segmentation" and not self.encode.maps:
            raise ValueError("task='segmentation' needs [C, H, W] feature maps, got vector features")
        self.map_size = self.encode.map_size
        self.position = nn.Parameter(torch.zeros(M, d))
        self.complete = CompletionTransformer(d, config.fusion_heads, config.d_hidden, config.dropout)
        self.decoder = nn.Sequential(nn.Linear(M * d, config.d_hidden), nn.GELU(), nn.Dropout(config.dropout),
                                     nn.Linear(config.d_hidden, num_classes))
        self.modality_heads = ModalityHeads(M, d, num_classes)
        self.teachers = nn.ModuleList(
            UnimodalModel(shapes[m], d, num_classes, task, config.dropout) for m in modalities
        ).requires_grad_(False)
        masks, column_of_code = subset_table(M)
        self.register_buffer("subset_masks", masks, persistent=False)
        self.register_buffer("column_of_code", column_of_code, persistent=False)
        self.register_buffer("shapley_weights", shapley_matrix(M, config.mce.shapley).float(), persistent=False)
        self.register_buffer("dataset_factor", torch.ones(M))  # a_m, set by prepare
        self.register_buffer("teacher_correct", torch.zeros(0, M), persistent=False)  # [N_train, M], set by prepare

    def train(self, mode: bool = True):
        """The teachers stay in eval mode (frozen, no dropout)."""
        super().train(mode)
        self.teachers.eval()
        return self

    # ---------------------------------------------------------------- pieces
    def tokens(self, h: Tensor, keep: Tensor) -> Tensor:
        """Completion-Transformer input: h [B, N, M, D] with the tokens of
        modalities outside ``keep`` [B, M] zeroed, plus p_m -> [B, N, M, D]."""
        return h * keep[:, None, :, None].to(h.dtype) + self.position

    def readout(self, completed: Tensor) -> Tensor:
        """Fused decoder g: h~ [B, N, M, D] -> [B, K] or [B, K, H, W]."""
        if self.map_size is None:
            return self.decoder(completed.mean(dim=1).flatten(1))
        B, N = completed.shape[:2]
        return self.decoder(completed.flatten(2)).transpose(1, 2).reshape(B, self.num_classes, *self.map_size)

    def modality_readout(self, completed: Tensor) -> Tensor:
        """Heads g_m: h~ [B, N, M, D] -> [B, M, K] or [B, M, K, H, W]."""
        if self.map_size is None:
            return self.modality_heads(completed.mean(dim=1))
        B, N, M = completed.shape[:3]
        return self.modality_heads(completed).permute(0, 2, 3, 1).reshape(B, M, self.num_classes, *self.map_size)

    @torch.no_grad()
    def teacher_logits(self, features: dict[str, Tensor]) -> Tensor:
        """The frozen teachers on every modality: [B, M, K] or [B, M, K, H, W]."""
        return torch.stack([t(features[m]) for m, t in zip(self.modalities, self.teachers)], dim=1)

    def _check_inputs(self, features, observed: Tensor) -> Tensor:
        if not isinstance(features, dict) or any(m not in features for m in self.modalities):
            got = sorted(features) if isinstance(features, dict) else type(features).__name__
            raise ValueError(f"features must be a dict with one tensor per modality {self.modalities}, got {got}")
        B = features[self.modalities[0]].shape[0]
        if not isinstance(observed, Tensor) or observed.dtype != torch.bool or observed.shape != (B, len(self.modalities)):
            raise ValueError(f"observed must be a [B={B}, M={len(self.modalities)}] bool tensor, "
                             f"got {getattr(observed, 'dtype', type(observed))} {list(getattr(observed, 'shape', []))}")
        return observed.to(self.position.device)

    def _cached_correct(self, sample_index: Tensor, B: int) -> Tensor:
        if self.teacher_correct.shape[0] == 0:
            raise RuntimeError("MCE: the teacher-correctness cache is empty; call prepare(train_set, ...) first "
                               "or call forward without sample_index")
        if not isinstance(sample_index, Tensor) or sample_index.shape != (B,) or sample_index.dtype != torch.long:
            raise ValueError(f"sample_index must be a [B={B}] int64 tensor, got {getattr(sample_index, 'dtype', type(sample_index))} "
                             f"{list(getattr(sample_index, 'shape', []))}")
        return self.teacher_correct[sample_index.to(self.teacher_correct.device)]  # rows of prepare()'s train set

    # ---------------------------------------------------------------- forward
    def forward(self, features, observed, available=None, mode: str = "eval", sample_index=None) -> Output:
        if mode == "oracle":
            raise ValueError("mode='oracle' is not supported by mce (it has no complete-data pass)")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        observed = self._check_inputs(features, observed)
        h = self.encode(features)  # [B, N, M, D]
        completed = self.complete(self.tokens(h, observed))
        logits = self.readout(completed)
        if mode == "eval":
            return Output(logits, {})
        sample, column = proper_subset_pairs(observed, self.subset_masks)
        # index_select, not h[sample]: the backward of advanced indexing with repeated
        # indices accumulates with atomics on CPU threads (bitwise run-to-run noise)
        sub_completed = self.complete(self.tokens(h.index_select(0, sample), self.subset_masks[column]))  # [P, N, M, D]
        aux = {
            "observed": observed, "completed": completed, "sub_sample": sample, "sub_column": column,
            "sub_completed": sub_completed, "sub_logits": self.readout(sub_completed),
            "modality_logits": self.modality_readout(completed),
        }
        if sample_index is not None:
            aux["teacher_correct"] = self._cached_correct(sample_index, observed.shape[0])
        else:
            aux["teacher_logits"] = self.teacher_logits(features)
        return Output(logits, aux)

    # ---------------------------------------------------------------- loss
    def loss_terms(self, out: Output, labels: Tensor, ignore_index: int | None = None) -> dict[str, Tensor]:
        """The unweighted MCE terms of a training output (section 4) and the
        LCE factors (section 3): {"task", "sub": scalars; "sep", "com": [M]
        (L_sep,m, L_com,m); "a", "b", "u", "phi", "n": [M]; "v": [C]}."""
        aux = out.aux
        observed, sample, column = aux["observed"], aux["sub_sample"], aux["sub_column"]
        B, M = observed.shape
        labels = labels.to(out.logits.device)
        task = cross_entropy(out.logits, labels, ignore_index)

        # L_sub and L_com: each pair (b, S) weighs 1 / (K_b * #{b : O_b non-empty}).
        active = observed.any(dim=1).sum().clamp(min=1).to(out.logits.dtype)
        pair_weight = 1.0 / (subsets_per_sample(observed)[sample] * active)  # [P]
        sub = (pair_weight * per_sample_ce(aux["sub_logits"], labels[sample], ignore_index)).sum()
        dropped = observed[sample] & ~self.subset_masks[column]  # [P, M]: m in O_b \ S
        l1 = (aux["completed"][sample] - aux["sub_completed"]).abs().mean(dim=(1, 3))  # [P, M]
        com = (pair_weight[:, None] * dropped * l1).sum(dim=0)

        # L_sep,m: CE of g_m over the samples (valid pixels) with m observed.
        mod_logits = aux["modality_logits"]  # [B, M, K, ...]
        ce_sum, count = ce_sum_count(mod_logits.flatten(0, 1), labels.repeat_interleave(M, dim=0), ignore_index)
        E = observed.to(ce_sum.dtype)
        sep = (ce_sum.view(B, M) * E).sum(dim=0) / (count.view(B, M) * E).sum(dim=0).clamp(min=1)

        # Coalition scores: column c of row b is the prediction of b from subset c.
        correct = torch.zeros(B, self.subset_masks.shape[0], dtype=torch.float32, device=observed.device)
        main_column = observed_columns(observed, self.column_of_code)  # -1 where nothing is observed
        correct[torch.arange(B, device=observed.device), main_column.clamp(min=0)] = \
            per_sample_score(out.logits, labels, ignore_index) * (main_column >= 0)
        correct[sample, column] = per_sample_score(aux["sub_logits"], labels[sample], ignore_index)
        if "teacher_correct" in aux:
            teacher = aux["teacher_correct"].float()
        else:
            t_logits = aux["teacher_logits"]
            teacher = per_sample_score(t_logits.flatten(0, 1), labels.repeat_interleave(M, dim=0), ignore_index).view(B, M)
        lce = batch_factors(correct, observed, teacher, self.shapley_weights)
        if not self.config.mce.use_b:
            lce["b"] = torch.ones_like(lce["b"])
        return {"task": task, "sub": sub, "sep": sep, "com": com, "a": self.dataset_factor, **lce}

    def combine(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weighted parts of the total (section 4.5): task,
        lambda_sep * mean_m(w_m L_sep,m), lambda_com * sum_m w_m L_com,m,
        lambda_sub * L_sub with w_m = a_m * b_m (no gradient)."""
        cfg = self.config
        w = (terms["a"] * terms["b"]).detach().to(terms["sep"].dtype)
        return {"task": terms["task"], "sub": cfg.mce.lambda_sub * terms["sub"],
                "sep": cfg.mce.lambda_sep * (w * terms["sep"]).mean(), "com": cfg.mce.lambda_com * (w * terms["com"]).sum()}

    def loss(self, out: Output, labels: Tensor, ignore_index: int | None = None) -> tuple[Tensor, dict]:
        """Total loss and its parts (floats). Eval outputs give the task CE only."""
        if "sub_logits" not in out.aux:
            return total_and_parts({"task": cross_entropy(out.logits, labels, ignore_index)})
        terms = self.loss_terms(out, labels, ignore_index)
        total, logged = total_and_parts(self.combine(terms))
        logged.update({f"b/{m}": float(b) for m, b in zip(self.modalities, terms["b"].tolist())})
        return total, logged

    # ---------------------------------------------------------------- set-up
    def prepare(self, train_set, *, protocol, seed: int, resume: bool, log=print) -> None:
        """Set a_m from the protocol; on a fresh run (``resume=False``) train the
        frozen teachers; in both cases cache their per-sample correctness on
        ``train_set``. Draws nothing from the global torch RNG (teacher batches
        use a local generator, their dropout a forked RNG seeded by ``seed``)."""
        if list(train_set.modalities) != self.modalities:
            raise ValueError(f"train_set modalities {list(train_set.modalities)} differ from the model's {self.modalities}")
        M = len(self.modalities)
        if self.config.mce.use_a:
            rates = torch.tensor(protocol.expected_missing_rates(M), dtype=torch.float64)
            self.dataset_factor.copy_((1.0 / (1.0 - rates)).to(self.dataset_factor.dtype))
        else:
            self.dataset_factor.fill_(1.0)
        if not resume:
            available = train_set.available if train_set.available is not None else \
                torch.ones(len(train_set), M, dtype=torch.bool)
            self._train_teachers(train_set, protocol.fixed_masks(available, seed), seed, log)
        self.teacher_correct = self._teacher_scores(train_set)
        scores = ", ".join(f"{m} {s:.3f}" for m, s in zip(self.modalities, self.teacher_correct.mean(dim=0).tolist()))
        log(f"mce: a_m = {[round(a, 3) for a in self.dataset_factor.tolist()]}; teacher accuracy on the train set: {scores}")

    def _rng_devices(self) -> list[int]:
        device = self.position.device
        return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []

    def _train_teachers(self, train_set, masks: Tensor, seed: int, log) -> None:
        """CE training of each T_m on the training samples with m observed in ``masks`` [N, M]."""
        device = self.position.device
        gen = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(int(seed))
            for m, (name, teacher) in enumerate(zip(self.modalities, self.teachers)):
                rows = masks[:, m].nonzero().flatten()
                if rows.numel() == 0:
                    log(f"mce: no training sample observes {name}; its teacher stays untrained")
                    continue
                teacher.requires_grad_(True).train()
                opt = torch.optim.Adam(teacher.parameters(), lr=TEACHER_LR)
                for _ in range(self.config.mce.teacher_epochs):
                    perm = rows[torch.randperm(rows.numel(), generator=gen)]
                    for start in range(0, perm.numel(), TEACHER_BATCH):
                        idx = perm[start : start + TEACHER_BATCH]
                        x, y = train_set.features[name][idx].to(device), train_set.labels[idx].to(device)
                        total, count = ce_sum_count(teacher(x), y, train_set.ignore_index)
                        opt.zero_grad(set_to_none=True)
                        (total.sum() / count.sum().clamp(min=1)).backward()
                        opt.step()
                teacher.zero_grad(set_to_none=True)
                teacher.requires_grad_(False)
        self.teachers.eval()

    @torch.no_grad()
    def _teacher_scores(self, train_set) -> Tensor:
        """[N_train, M] float: each teacher's per-sample score on ``train_set``."""
        self.teachers.eval()
        device = self.position.device
        n = len(train_set)
        scores = torch.zeros(n, len(self.modalities), device=device)
        for start in range(0, n, CACHE_CHUNK):
            idx = torch.arange(start, min(start + CACHE_CHUNK, n))
            feats = {m: train_set.features[m][idx].to(device) for m in self.modalities}
            logits = self.teacher_logits(feats)
            labels = train_set.labels[idx].to(device)
            M = len(self.modalities)
            scores[idx] = per_sample_score(logits.flatten(0, 1), labels.repeat_interleave(M, dim=0),
                                           train_set.ignore_index).view(-1, M)
        return scores
