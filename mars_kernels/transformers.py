"""HF transformers integration: ``experts_implementation="mars_kernels"``.

::

    import mars_kernels.transformers  # registers "mars_kernels" (idempotent)
    model = AutoModelForCausalLM.from_pretrained(..., experts_implementation="mars_kernels")
    # or: model.set_experts_implementation("mars_kernels")

Since v5, every MoE family of transformers decorates its experts class with
``@use_experts_implementation`` (flags ``is_concatenated``, ``is_transposed``,
``has_bias``, ``has_gate``, ``has_post_expert_norm``) and looks its forward up
in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``. This module adds
:func:`experts_forward` there: the experts of each layer run on
:func:`mars_kernels.moe_align` + :func:`mars_kernels.moe_mlp` (the fused CPU
kernels, the Triton kernels on a GPU), forward and backward, deterministic,
with the weights used in HF's layout as strided views (no per-call copy) and
their gradients written back in that layout.

What runs natively, read from each experts module (:func:`plan`):

* gate and up projections concatenated ``[gate | up]`` or interleaved (GPT-OSS),
  weights ``[E, 2I, H]`` applied as ``x @ W^T`` or transposed ``[E, H, 2I]``,
  with or without biases, or no gate (``up_proj`` + activation);
* the activation from ``act_fn``: SiLU, GELU (erf), GELU tanh-form
  (``gelu_pytorch_tanh``, ``gelu_new``), ReLU, and ReLU² without a gate;
* the clamped SwiGLU that several families write as their own ``_apply_gate``
  (GPT-OSS and the OpenAI privacy filter, MiniMax-M3-VL, DeepSeek-V4, GLM-5-Next,
  HunYuan-V4): ``min(gate, L) * sigmoid(alpha min(gate, L)) * (clip(up, L) + c)``,
  from the module's own alpha / limit attributes;
* expert-parallel sentinel ids (``>= num_experts``) contribute nothing;
  DTensor weights are used through ``to_local()``.

Anything else (another custom ``_apply_gate``, ``has_post_expert_norm``, an
activation without a fused kernel) falls back to HF's own ``grouped_mm``
implementation, with one warning naming the class.

The router too: where a family's router is softmax + top-k (+ renormalise),
the same math as :func:`mars_kernels.topk_gating`, its forward runs on that
fused op whenever the model's experts implementation is ``"mars_kernels"``
(:data:`FUSED_ROUTERS` lists them). Every other router (sigmoid scores,
correction biases, grouped or hashed selection, extra scaling, a softmax in
the input's precision) stays HF's. A router's forward is replaced only if its
source is the one checked here (a fingerprint per router): a transformers
release that changes a router keeps HF's. Routers are linked to their
model's config when they are built, so this applies to models built or
loaded after ``import mars_kernels.transformers``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from .ops import moe_align, moe_mlp, topk_gating

try:
    from transformers.integrations import moe as _hf_moe
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "mars_kernels.transformers needs HF transformers >= 5.20 with the experts interface "
        "(pip install 'mars-kernels[hf]')", name="transformers"
    ) from exc
if not hasattr(_hf_moe, "ALL_EXPERTS_FUNCTIONS"):  # pragma: no cover
    raise ImportError("mars_kernels.transformers needs transformers >= 5.20 (no experts interface found)")

__all__ = ["NAME", "FUSED_ROUTERS", "Plan", "plan", "experts_forward", "register", "decorated_experts_classes",
           "fused_router_classes", "router_fingerprint"]

#: The name to pass as ``experts_implementation``.
NAME = "mars_kernels"

# act_fn module type name -> the element function of mars_kernels' activations.
_ACT_FNS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}
_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}  # relu2: ungated only

# Experts classes whose own _apply_gate is the clamped SwiGLU:
# class name -> (alpha attribute or None for 1, limit attribute, up offset).
_CLAMPED_SWIGLU = {
    "GptOssExperts": ("alpha", "limit", 1.0),
    "OpenAIPrivacyFilterExperts": ("alpha", "limit", 1.0),
    "MiniMaxM3VLExperts": ("swiglu_alpha", "swiglu_limit", 1.0),
    "DeepseekV4Experts": (None, "limit", 0.0),
    "Glm5NextTextExperts": (None, "swiglu_limit", 0.0),
    "HYV4Experts": (None, "swiglu_limit", 0.0),
    "HYV4VLExperts": (None, "swiglu_limit", 0.0),
}
# Experts classes whose _apply_gate is the default gated activation, only
# computed in float32 (which the kernels do anyway).
_DEFAULT_GATE_IN_FP32 = {"BeamExperts"}


@dataclass(frozen=True)
class Plan:
    """How :func:`experts_forward` runs one experts class: ``native`` with the
    mars_kernels ``activation`` spec, or the HF fallback for ``reason``."""

    native: bool
    activation: str | None = None
    reason: str = ""


def _act_fn_name(module: nn.Module) -> str | None:
    act = getattr(module, "act_fn", None)
    name = _ACT_FNS.get(type(act).__name__) if act is not None else None
    if name == "gelu" and getattr(act, "act", None) is not None and getattr(act.act, "__name__", "") == "_gelu_python":
        return "gelu"  # the python erf form is the same function
    return name


def plan(module: nn.Module) -> Plan:
    """The :class:`Plan` for an experts module (cached on the module)."""
    cached = module.__dict__.get("_mars_kernels_plan")
    if cached is not None:
        return cached
    result = _make_plan(module)
    module.__dict__["_mars_kernels_plan"] = result
    return result


def _make_plan(module: nn.Module) -> Plan:
    cls = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        return Plan(False, reason="a post-expert norm (has_post_expert_norm)")
    has_gate = getattr(module, "has_gate", True)
    interleaved = not getattr(module, "is_concatenated", True)
    fn = _act_fn_name(module)
    custom_gate = has_gate and getattr(type(module), "_apply_gate", None) is not _hf_moe._default_apply_gate
    if has_gate and cls in _CLAMPED_SWIGLU:
        alpha_attr, limit_attr, offset = _CLAMPED_SWIGLU[cls]
        alpha = 1.0 if alpha_attr is None else float(getattr(module, alpha_attr))
        # Without an alpha the gate function is silu: F.silu in the class, or its act_fn.
        if alpha_attr is None and getattr(module, "act_fn", None) is not None and fn != "silu":
            return Plan(False, reason=f"its clamped gate with act_fn {type(module.act_fn).__name__}")
        limit = getattr(module, limit_attr)
        limit = float("inf") if limit is None else float(limit)
        spec = f"swiglu_clamp{':interleaved' if interleaved else ''}:alpha={alpha!r}:limit={limit!r}:up_offset={offset!r}"
        return Plan(True, spec)
    if custom_gate and cls not in _DEFAULT_GATE_IN_FP32:
        return Plan(False, reason=f"its own _apply_gate ({cls}._apply_gate)")
    if fn is None:
        act = getattr(module, "act_fn", None)
        what = type(act).__name__ if act is not None else "(no act_fn attribute)"
        return Plan(False, reason=f"its activation {what} (no fused kernel)")
    if not has_gate:
        return Plan(True, fn)
    if fn not in _GATED:
        return Plan(False, reason=f"its gated activation {type(getattr(module, 'act_fn', None)).__name__} (no fused kernel)")
    return Plan(True, _GATED[fn] + (":interleaved" if interleaved else ""))


_warned: set[str] = set()


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's local shard (the experts of this rank); other tensors as they are."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


def _expert_weights(module: nn.Module):
    """(w1 [E, D, H1], b1, w2 [E, H, D], b2) as views of the module's parameters."""
    up = module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj
    up, down = _local(up), _local(module.down_proj)
    if not getattr(module, "is_transposed", False):  # [E, out, in], applied as x @ W^T
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    b1 = b2 = None
    if getattr(module, "has_bias", False):
        b1 = _local(module.gate_up_proj_bias if getattr(module, "has_gate", True) else module.up_proj_bias)
        b2 = _local(module.down_proj_bias)
    return up, b1, down, b2


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward of HF's experts interface on mars_kernels.

    hidden_states [T, D], top_k_index [T, k] (expert ids; ids >= num_experts are
    expert-parallel sentinels and contribute nothing), top_k_weights [T, k] ->
    [T, D] in hidden_states' dtype: sum_j w[t, j] * Expert_{e_tj}(hidden_states[t]).
    """
    p = plan(self)
    if not p.native:
        cls = type(self).__name__
        if cls not in _warned:
            _warned.add(cls)
            warnings.warn(f"mars_kernels: {cls} runs HF's grouped_mm experts implementation instead of "
                          f"mars_kernels, because of {p.reason}", RuntimeWarning, stacklevel=2)
        return _hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    w1, b1, w2, b2 = _expert_weights(self)
    E = w1.shape[0]
    idx = top_k_index
    if getattr(self, "_is_expert_parallel", False):
        idx = torch.where(idx >= E, torch.full_like(idx, E), idx)  # E: moe_align's "dropped" sentinel
    x = hidden_states.to(w1.dtype)  # as HF's grouped_mm: autocast may hand over float32 activations
    name = _backend.resolve(None, x.device)
    meta = moe_align(idx, E, _backend.EXPERT_BLOCK_SIZE[name], backend=name)
    y = moe_mlp(x, top_k_weights, meta, w1, b1, w2, b2, p.activation, backend=name)
    return y.to(hidden_states.dtype)


# --------------------------------------------------------------------------- routers on topk_gating

@dataclass(frozen=True)
class _Router:
    """How a router's forward maps onto topk_gating (name: a label for the rule).

    logits: how the router forms its logits from hidden_states h --
        "linear"        F.linear(h.reshape(-1, hidden_dim), weight)
        "linear_any"    F.linear(h, weight) (any leading shape)
        "linear_float"  F.linear(h.reshape(-1, hidden_dim).float(), weight.float())
        "linear_any_float"  F.linear(h, weight).float() (any leading shape)
        "wg"            h.reshape(-1, D), as float when wg's weight is float32, then wg(h)
    mode: topk_gating's mode (softmax over all E then top-k, or top-k logits then softmax).
    renormalize: "always", "never" or "norm_topk_prob" (the router's attribute).
    weights: the dtype of the returned weights: "logits", "hidden" or "float32".
    fingerprints: sha256 prefixes of the normalised forward sources checked against this rule.
    """

    name: str
    logits: str
    mode: str
    renormalize: str
    weights: str
    fingerprints: tuple[str, ...]
    condition: str | None = None  # an attribute that must equal "softmax" (Cohere2's expert_selection_fn)
    flat_only: bool = False  # HF's forward is this rule only for [T, D] input (a softmax over dim 1)


_SOFTMAX_TOPK_QWEN = _Router("qwen", "linear", "softmax_topk", "norm_topk_prob", "logits", ("217f7068448531cf",))
_SOFTMAX_TOPK_QWEN35 = _Router("qwen3_5", "linear", "softmax_topk", "always", "logits", ("2a5edbb09368e93e",))
_SOFTMAX_TOPK_MIXTRAL = _Router("mixtral", "linear", "softmax_topk", "always", "float32", ("c97ef63ea84be7bd",))
_TOPK_SOFTMAX_GRANITE = _Router("granite", "linear_any_float", "topk_softmax", "always", "hidden", ("fb098cbd018abf0f",))
_SOFTMAX_TOPK_JAMBA = _Router("jamba", "linear_any", "softmax_topk", "never", "hidden", ("7d48cb7418da0b85",))
_SOFTMAX_TOPK_HUNYUAN = _Router("hunyuan", "wg", "softmax_topk", "always", "logits", ("a7559b6517f52c2b",))
_SOFTMAX_TOPK_LARA = _Router("lara_mini", "linear_float", "softmax_topk", "norm_topk_prob", "hidden", ("fb2ad9e78df55322",))
# Cohere2's softmax branch (top-k logits, softmax over them, then an optional
# division by their sum, which is 1): topk_softmax. Its sigmoid branch stays HF's.
_TOPK_SOFTMAX_COHERE2 = _Router("cohere2", "linear_any", "topk_softmax", "always", "hidden", ("730ed8deeda7505b",),
                                condition="expert_selection_fn", flat_only=True)

#: Router classes whose forward runs on :func:`mars_kernels.topk_gating` under
#: ``experts_implementation="mars_kernels"``: class name -> (modeling module's
#: family, rule). The rule's fingerprints are those of the forwards read and
#: checked (tests/test_hf_transformers.py runs each router both ways); any
#: other source keeps HF's forward.
FUSED_ROUTERS: dict[str, tuple[str, _Router]] = {
    **{cls: (fam, _SOFTMAX_TOPK_QWEN) for cls, fam in (
        ("Qwen3MoeTopKRouter", "qwen3_moe"), ("Qwen2MoeTopKRouter", "qwen2_moe"), ("OlmoeTopKRouter", "olmoe"),
        ("FlexOlmoTopKRouter", "flex_olmo"), ("MellumTopKRouter", "mellum"), ("Qwen3NextTopKRouter", "qwen3_next"),
        ("Qwen3OmniMoeThinkerTextTopKRouter", "qwen3_omni_moe"), ("Qwen3OmniMoeTalkerTextTopKRouter", "qwen3_omni_moe"),
        ("Qwen4ExpTextTopKRouter", "qwen4_exp"))},
    **{cls: (fam, _SOFTMAX_TOPK_QWEN35) for cls, fam in (
        ("Qwen3_5MoeTopKRouter", "qwen3_5_moe"), ("Qwen3OmniMoeTextTopKRouter", "qwen3_omni_moe"),
        ("Qwen3VLMoeTextTopKRouter", "qwen3_vl_moe"))},
    "MixtralTopKRouter": ("mixtral", _SOFTMAX_TOPK_MIXTRAL),
    "MiniMaxTopKRouter": ("minimax", _SOFTMAX_TOPK_MIXTRAL),
    **{cls: (fam, _TOPK_SOFTMAX_GRANITE) for cls, fam in (
        ("GraniteMoeTopKRouter", "granitemoe"), ("GraniteMoeSWATopKRouter", "granitemoe_swa"),
        ("GraniteMoeHybridTopKRouter", "granitemoehybrid"), ("GraniteMoeSharedTopKRouter", "granitemoeshared"))},
    "JambaTopKRouter": ("jamba", _SOFTMAX_TOPK_JAMBA),
    "HunYuanMoEV1Gate": ("hunyuan_v1_moe", _SOFTMAX_TOPK_HUNYUAN),
    "LaraMiniTopKRouter": ("lara_mini", _SOFTMAX_TOPK_LARA),
    "Cohere2MoeTopKRouter": ("cohere2_moe", _TOPK_SOFTMAX_COHERE2),
}


def _normalised_source(fn) -> str:
    lines = inspect.getsource(fn).splitlines()
    code = "\n".join(line.split("#", 1)[0] for line in lines)
    return re.sub(r"\s+", " ", code).strip()


def router_fingerprint(cls: type) -> str:
    """The fingerprint of a router class's forward: sha256 (16 hex digits) of
    its source without comments and with whitespace collapsed."""
    return hashlib.sha256(_normalised_source(cls.forward).encode()).hexdigest()[:16]


def _router_logits(self, hidden_states: torch.Tensor, how: str) -> torch.Tensor:
    if how == "linear":
        return F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    if how == "linear_float":
        return F.linear(hidden_states.reshape(-1, self.hidden_dim).float(), self.weight.float())
    if how == "linear_any":
        return F.linear(hidden_states, self.weight)
    if how == "linear_any_float":
        return F.linear(hidden_states, self.weight).float()
    h = hidden_states.reshape(-1, hidden_states.shape[-1])  # "wg"
    return self.wg(h.float() if self.wg.weight.dtype == torch.float32 else h)


def _fused_router_forward(self, hidden_states: torch.Tensor, rule: _Router):
    """The router's (logits, weights, indices), with the selection and weights from topk_gating."""
    logits = _router_logits(self, hidden_states, rule.logits)
    renormalize = rule.renormalize == "always" or (rule.renormalize == "norm_topk_prob" and bool(self.norm_topk_prob))
    weights, indices = topk_gating(logits.reshape(-1, logits.shape[-1]), self.top_k, mode=rule.mode,
                                   renormalize=renormalize)
    lead = logits.shape[:-1]
    dtype = {"logits": logits.dtype, "hidden": hidden_states.dtype, "float32": torch.float32}[rule.weights]
    return logits, weights.reshape(*lead, -1).to(dtype), indices.reshape(*lead, -1)


def _patch_router(cls: type, rule: _Router) -> None:
    """Make cls keep its config (to read the experts implementation at each
    call) and run _fused_router_forward when that is "mars_kernels"."""
    if "_mars_kernels_rule" in cls.__dict__:
        return
    original_init, original_forward = cls.__init__, cls.forward

    @functools.wraps(original_init)
    def __init__(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        self.__dict__["_mars_kernels_config"] = config

    @functools.wraps(original_forward)
    def forward(self, hidden_states, *args, **kwargs):
        config = self.__dict__.get("_mars_kernels_config")
        if (args or kwargs or config is None or getattr(config, "_experts_implementation", None) != NAME
                or (rule.condition is not None and getattr(self, rule.condition) != "softmax")
                or (rule.flat_only and hidden_states.dim() != 2)):
            return original_forward(self, hidden_states, *args, **kwargs)
        return _fused_router_forward(self, hidden_states, rule)

    cls.__init__, cls.forward = __init__, forward
    cls._mars_kernels_rule = rule
    cls._mars_kernels_original_forward = original_forward


@functools.cache
def fused_router_classes() -> dict[str, type]:
    """Patch the routers of :data:`FUSED_ROUTERS` whose forward has a checked
    fingerprint (done on import) -> {class name: class}. A family whose
    modeling module does not import here, or whose router source differs, is
    left alone."""
    out: dict[str, type] = {}
    for name, (family, rule) in FUSED_ROUTERS.items():
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except Exception:  # noqa: BLE001 - a family missing from this transformers, or its optional dependencies
            continue
        cls = getattr(module, name, None)
        if cls is None:
            continue
        if "_mars_kernels_rule" not in cls.__dict__ and router_fingerprint(cls) not in rule.fingerprints:
            continue
        _patch_router(cls, rule)
        out[name] = cls
    return out


def register() -> None:
    """Register :func:`experts_forward` as ``experts_implementation="mars_kernels"``
    and put the routers of :data:`FUSED_ROUTERS` on topk_gating (done on
    import; calling it again changes nothing)."""
    _hf_moe.ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)
    fused_router_classes()


@functools.cache
def decorated_experts_classes() -> dict[str, type]:
    """Every experts class of the installed transformers decorated with
    ``@use_experts_implementation`` (name -> class), found by the decorator's
    marks: a wrapped ``__init__`` and ``forward`` and an ``_apply_gate``.
    Families whose modeling module does not import here are skipped."""
    import importlib
    import pkgutil

    import transformers.models as models

    out: dict[str, type] = {}
    for info in pkgutil.iter_modules(models.__path__):
        try:
            mod = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except Exception:  # noqa: BLE001 - no modeling module, or optional dependencies missing
            continue
        for attr in vars(mod).values():
            if (isinstance(attr, type) and issubclass(attr, nn.Module) and attr.__module__ == mod.__name__
                    and hasattr(attr.__init__, "__wrapped__") and hasattr(attr.forward, "__wrapped__")
                    and hasattr(attr, "_apply_gate")):
                out[attr.__name__] = attr
    return out


register()
