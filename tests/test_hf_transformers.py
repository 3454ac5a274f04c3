"""Integration tier: HF transformers MoE families with
experts_implementation="mars_kernels" against HF's eager experts loop.

For each family whose tiny random model builds on CPU in a moment (odd expert
counts, k = 1..3): logits, loss and every parameter gradient of one training
step equal eager's (fp32, tight tolerance; bf16 at bf16 tolerances), and greedy
generate() gives the same tokens. Under "mars_kernels" the routers of
mars_kernels.transformers.FUSED_ROUTERS run on topk_gating; each of them is
also checked on its own against HF's forward. The coverage table (which
decorated experts classes run natively, which fall back and why, and which
routers run fused) is printed at the end of the test session.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.20")

import mars_kernels as mk  # noqa: E402
import mars_kernels.transformers as mt  # noqa: E402
from helpers import TOLERANCES  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

COVERAGE: dict[str, str] = {}

TINY = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=64,
            first_k_dense_replace=0, decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=24,
            n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, tie_word_embeddings=False, pad_token_id=0, attention_dropout=0.0)


def _experts(E: int, k: int) -> dict:
    return dict(num_experts=E, num_local_experts=E, n_routed_experts=E, num_experts_per_tok=k)


# model_type -> (config overrides, what the family exercises)
FAMILIES = {
    "qwen3_moe": (_experts(5, 2), "concatenated gate|up, silu"),
    "qwen2_moe": (_experts(7, 3), "shared expert next to the routed ones"),
    "mixtral": (_experts(9, 1), "k = 1"),
    "olmoe": (_experts(7, 2), ""),
    "deepseek_v3": (dict(_experts(9, 3), num_key_value_heads=4), "grouped routing, shared experts"),
    "gpt_oss": (_experts(5, 2), "transposed, bias, interleaved clamped SwiGLU"),
    "granitemoe": (_experts(7, 2), ""),
    "nemotron_h": (dict(_experts(5, 2), hybrid_override_pattern="*E", mamba_num_heads=4, mamba_head_dim=8,
                        n_groups=1, ssm_state_size=8, mamba_n_heads=4, moe_shared_expert_intermediate_size=24,
                        num_hidden_layers=2), "no gate (up_proj + relu^2)"),
    "openai_privacy_filter": (_experts(5, 2), "transposed, bias, concatenated clamped SwiGLU"),
    "deepseek_v4": (_experts(5, 2), "clamped SwiGLU in its own _apply_gate"),
    "hy_v4": (_experts(7, 2), "clamped SwiGLU with F.silu, no act_fn"),
    # more families of the interface, default flags, odd expert counts
    "deepseek_v2": (dict(_experts(7, 3), num_key_value_heads=4), ""),
    "glm4_moe": (_experts(9, 2), ""),
    "jamba": (dict(_experts(5, 2), num_hidden_layers=2, attn_layer_period=1, attn_layer_offset=0,
                   expert_layer_period=1, expert_layer_offset=0), "hybrid Mamba"),
    "minimax": (_experts(7, 1), ""),
    "phimoe": (_experts(5, 2), ""),
    "qwen3_next": (dict(_experts(7, 3), layer_types=["linear_attention", "full_attention"]), "hybrid linear attention"),
    "hunyuan_v1_moe": (_experts(5, 2), ""),
    "flex_olmo": (_experts(7, 2), ""),
    "granitemoeshared": (_experts(5, 3), ""),
    "kimi_linear": (dict(_experts(9, 2), num_key_value_heads=4, layer_types=["linear_attention", "full_attention"],
                         mlp_layer_types=["sparse", "sparse"]), "hybrid linear attention"),
}


def _model(model_type: str, overrides: dict, seed: int = 0):
    try:
        cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
    except Exception as exc:  # noqa: BLE001 - a family this transformers cannot build tiny here
        pytest.skip(f"{model_type}: tiny model does not build here ({type(exc).__name__}: {str(exc)[:80]})")
    with torch.no_grad():  # HF initialises some expert weights to zeros or leaves them empty
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _experts_modules(model):
    classes = mt.decorated_experts_classes()
    return [m for m in model.modules() if type(m).__name__ in classes]


def _step(model, impl: str, ids: torch.Tensor):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _routers(model):
    return [m for m in model.modules() if type(m).__name__ in mt.FUSED_ROUTERS]


class _CountFused:
    """Counts the calls of topk_gating made by fused routers while active."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = mt.topk_gating

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(mt, "topk_gating", counting)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_matches_eager(model_type, monkeypatch):
    overrides, what = FAMILIES[model_type]
    model = _model(model_type, overrides)
    experts = _experts_modules(model)
    if not experts:
        pytest.skip(f"{model_type}: no decorated experts module in the tiny model")
    plan = mt.plan(experts[0])
    COVERAGE[type(experts[0]).__name__] = (f"native ({plan.activation})" if plan.native
                                          else f"falls back to grouped_mm: {plan.reason}")
    routers = _routers(model)
    COVERAGE[type(experts[0]).__name__] += (f"; router {type(routers[0]).__name__} on topk_gating" if routers
                                           else "; HF's router")
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    logits, loss, grads = _step(model, "eager", ids)
    fused = _CountFused(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logits2, loss2, grads2 = _step(model, mt.NAME, ids)
    assert fused.calls == (len(routers) if routers else 0)
    torch.testing.assert_close(logits2, logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-6)
    assert grads2.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, atol=2e-5, rtol=2e-4, msg=lambda m: f"{model_type} {name}: {m}")
    # greedy decoding through the KV cache gives the same tokens
    model.set_experts_implementation("eager")
    ref = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_experts_implementation(mt.NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_matches_eager_bf16(model_type):
    """The same training step with the whole model in bfloat16. bf16 eager is
    itself far from exact (HF's eager and grouped_mm differ by several percent
    of a tensor's scale), so each implementation is measured against the
    float32 step on the same (bf16-rounded) weights: our logits, loss and
    every gradient are no further from it than eager's (relative error in
    norm), up to a factor 2 plus the bf16 tolerance (3 where eager's own
    error exceeds three tolerances). The routers get weights
    of scale 0.3 (logits of order 1, against HF's initial 0.02), so that no
    token sits on a near-tie that rounding alone would send to another expert
    in one implementation and not the other."""
    import copy

    overrides, _ = FAMILIES[model_type]
    model = _model(model_type, overrides)
    if not _experts_modules(model):
        pytest.skip(f"{model_type}: no decorated experts module in the tiny model")
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for module in model.modules():
            if type(module).__name__ in mt.FUSED_ROUTERS or "Router" in type(module).__name__:
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    truth = _step(reference, "eager", ids)
    eager = _step(model, "eager", ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = _step(model, mt.NAME, ids)
    assert ours[2].keys() == eager[2].keys() == truth[2].keys()
    atol, _ = TOLERANCES[torch.bfloat16]

    def err(a, b):  # relative error in norm: the max of a few elements is too noisy to compare
        return float((a.float() - b).norm() / b.norm().clamp(min=1e-12))

    pairs = [("logits", ours[0], eager[0], truth[0]), ("loss", ours[1], eager[1], truth[1])]
    pairs += [(name, ours[2][name], eager[2][name], truth[2][name]) for name in truth[2]]
    for name, a, e, t in pairs:
        # A gradient that bf16 rounding already moves by several tolerances in
        # eager (a scale summed over every position, with cancellation) is
        # rounding noise in both: a factor 3 there.
        factor = 3 if err(e, t) > 3 * atol else 2
        assert err(a, t) <= factor * err(e, t) + atol, (
            f"{model_type} {name}: {err(a, t):.4f} from float32, eager bf16 {err(e, t):.4f}")


def _router_config(cls):
    """A config the router class builds from: its family's default config or
    one of its sub-configs, with 12 experts, k = 3 and hidden size 48."""
    family = mt.FUSED_ROUTERS[cls.__name__][0]
    root = AutoConfig.for_model(family)
    candidates = [root] + [getattr(root, a) for a in dir(root) if a.endswith("_config")
                           and isinstance(getattr(root, a, None), transformers.PretrainedConfig)]
    for sub in list(candidates):
        candidates += [getattr(sub, a) for a in dir(sub) if a.endswith("_config")
                       and isinstance(getattr(sub, a, None), transformers.PretrainedConfig)]
    for cfg in candidates:
        for key, value in dict(hidden_size=48, num_experts=12, num_local_experts=12, num_experts_per_tok=3,
                               moe_topk=3, norm_topk_prob=True, expert_selection_fn="softmax").items():
            if hasattr(cfg, key):
                setattr(cfg, key, value)
        try:
            router = cls(cfg)
        except Exception:  # noqa: BLE001 - not this router's config
            continue
        return cfg, router
    pytest.skip(f"{cls.__name__}: no config of {family} builds it")


@pytest.mark.parametrize("name", sorted(mt.FUSED_ROUTERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_router_matches_hf(name, dtype):
    """Each fused router, on its own: HF's forward (experts implementation
    "eager") and the fused one ("mars_kernels") give the same logits and
    indices, weights of the same dtype within the dtype's tolerance, and the
    same gradients for the router's weight and its input."""
    classes = mt.fused_router_classes()
    if name not in classes:
        pytest.skip(f"{name}: not in this transformers, or its forward changed (HF's router is kept)")
    cls = classes[name]
    cfg, router = _router_config(cls)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    router = router.to(dtype)
    x = torch.randn(26, 48, generator=g).to(dtype)  # [T, D], as the MoE blocks call their routers
    outs = {}
    for impl in ("eager", mt.NAME):
        cfg._experts_implementation = impl
        router.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        logits, weights, indices = router(xi)
        (weights.float() * torch.linspace(-1, 1, weights.numel()).view_as(weights)).sum().backward()
        outs[impl] = (logits.detach(), weights.detach(), indices, xi.grad, [p.grad for p in router.parameters()])
    (l0, w0, i0, gx0, gp0), (l1, w1, i1, gx1, gp1) = outs["eager"], outs[mt.NAME]
    assert torch.equal(l1, l0) and torch.equal(i1, i0)
    assert w1.dtype == w0.dtype and w1.shape == w0.shape
    atol, rtol = TOLERANCES[w0.dtype]
    torch.testing.assert_close(w1, w0, atol=atol, rtol=rtol)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(gx1, gx0, atol=atol, rtol=rtol)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_routers_left_to_hf_are_not_patched():
    """Routers with other math (sigmoid scores, correction biases, a softmax in
    the input's precision) keep HF's forward."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    mt.fused_router_classes()
    for cls in (DeepseekV3TopkRouter, GptOssTopKRouter):
        assert "_mars_kernels_rule" not in cls.__dict__


def test_a_changed_router_keeps_hf_forward():
    """A router whose source does not match a checked fingerprint is left alone."""
    class FakeTopKRouter(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states  # not the checked source

    family, rule = mt.FUSED_ROUTERS["Qwen3MoeTopKRouter"]
    assert mt.router_fingerprint(FakeTopKRouter) not in rule.fingerprints


def test_every_decorated_class_has_a_plan():
    """Every experts class of this transformers either runs natively or falls
    back with a reason (built from the class alone where a tiny config is not
    at hand: flags and _apply_gate decide, the activation defaults to silu)."""
    classes = mt.decorated_experts_classes()
    assert len(classes) >= 40, "the experts interface should cover most MoE families"
    for name, cls in classes.items():
        probe = cls.__new__(cls)
        torch.nn.Module.__init__(probe)
        probe.has_gate, probe.has_bias = True, False
        probe.is_concatenated, probe.is_transposed, probe.has_post_expert_norm = True, False, False
        probe.act_fn = torch.nn.SiLU()
        for attr in ("alpha", "limit", "swiglu_alpha", "swiglu_limit"):
            setattr(probe, attr, 1.0)
        plan = mt.plan(probe)
        COVERAGE.setdefault(name, f"native ({plan.activation})" if plan.native
                            else f"falls back to grouped_mm: {plan.reason}")
        assert plan.native or plan.reason


# --------------------------------------------------------------------------- the experts module on its own


def _qwen_experts(E=6, k=2, dtype=torch.float32, seed=0):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = AutoConfig.for_model("qwen3_moe", **{**TINY, **_experts(E, k)})
    experts = Qwen3MoeExperts(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return experts.to(dtype)


def _call(experts, impl, x, idx, w):
    experts.config._experts_implementation = impl
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    y = experts(x, idx, w)
    if y.requires_grad:  # HF's eager loop returns a constant when no token reaches an expert (T = 0)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    zeros = [torch.zeros_like(p) for p in experts.parameters()]
    grads = [z if p.grad is None else p.grad.clone() for p, z in zip(experts.parameters(), zeros)]
    return (y.detach(), torch.zeros_like(x) if x.grad is None else x.grad,
            torch.zeros_like(w) if w.grad is None else w.grad, grads)


def _routing(T, E, k, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    if kind == "one_expert" and T:
        idx[:, 0] = 2
        idx[:, 1:] = (torch.arange(1, k) + 2) % E
    elif kind == "empty_experts" and T:
        idx = idx % 3  # experts 3.. get nothing
        idx[:, 1] = (idx[:, 0] + 1) % 3
    w = torch.rand(T, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True).clamp(min=1e-6)


@pytest.mark.parametrize("T,kind", [(1, "spread"), (13, "one_expert"), (13, "empty_experts"), (0, "spread")])
def test_experts_edge_cases(T, kind):
    experts = _qwen_experts()
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(3))
    idx, w = _routing(T, 6, 2, kind)
    ref = _call(experts, "eager", x, idx, w)
    ours = _call(experts, mt.NAME, x, idx, w)
    for a, b in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    for a, b in zip(ours[3], ref[3]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_expert_parallel_sentinels_contribute_nothing():
    experts = _qwen_experts()
    experts._is_expert_parallel = True
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(4))
    idx, w = _routing(9, 6, 2, "spread")
    idx[::2, 1] = 6 + torch.arange(5) % 3  # ids >= num_experts: other ranks' experts
    w = torch.where(idx >= 6, torch.zeros_like(w), w)
    ours = _call(experts, mt.NAME, x, idx, w)
    ref = _call(experts, "grouped_mm", x, idx, w)
    torch.testing.assert_close(ours[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=2e-5, rtol=2e-5)
    assert torch.all(ours[2][idx >= 6] == 0)


def test_bf16_forward_and_backward():
    experts = _qwen_experts(dtype=torch.bfloat16)
    x = torch.randn(17, 32, generator=torch.Generator().manual_seed(5)).bfloat16()
    idx, w = _routing(17, 6, 2, "spread")
    ours = _call(experts, mt.NAME, x, idx, w.bfloat16())
    ref = _call(experts, "eager", x, idx, w.bfloat16())
    assert ours[0].dtype == torch.bfloat16
    for a, b in zip(ours[:2] + tuple(ours[3]), ref[:2] + tuple(ref[3])):
        torch.testing.assert_close(a.float(), b.float(), atol=6e-2, rtol=6e-2)


def test_deterministic_bits():
    experts = _qwen_experts()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    idx, w = _routing(64, 6, 2, "spread")
    a, b = _call(experts, mt.NAME, x, idx, w), _call(experts, mt.NAME, x, idx, w)
    for s, t in zip(a[:3], b[:3]):
        assert torch.equal(s, t)
    for s, t in zip(a[3], b[3]):
        assert torch.equal(s, t)


def test_no_grad_keeps_nothing_for_backward():
    """Under no_grad the kernels are asked not to keep the pre-activations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "moe_mlp_fwd" in str(func):
                calls.append(args[-1])
            return func(*args, **(kwargs or {}))

    experts = _qwen_experts()
    experts.config._experts_implementation = mt.NAME
    x = torch.randn(5, 32)
    idx, w = _routing(5, 6, 2, "spread")
    with torch.no_grad(), Spy():
        experts(x, idx, w)
    assert calls == [False]


def test_fallback_warns_once_naming_the_class():
    experts = _qwen_experts()
    experts.has_post_expert_norm = True
    experts.post_expert_norm = torch.nn.Identity()
    experts.__dict__.pop("_mars_kernels_plan", None)
    mt._warned.discard(type(experts).__name__)
    experts.config._experts_implementation = mt.NAME
    idx, w = _routing(4, 6, 2, "spread")
    with pytest.warns(RuntimeWarning, match="Qwen3MoeExperts runs HF's grouped_mm.*post-expert norm"):
        experts(torch.randn(4, 32), idx, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experts(torch.randn(4, 32), idx, w)  # once only


def test_registration_is_idempotent_and_importing_mars_kernels_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, mars_kernels; assert 'transformers' not in sys.modules; "
            "import mars_kernels.transformers as mt; mt.register(); mt.register(); "
            "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS as F; "
            "assert F['mars_kernels'] is mt.experts_forward")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_compile_fullgraph_tiny_model():
    model = _model("qwen3_moe", _experts(5, 2))
    model.set_experts_implementation(mt.NAME)
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    eager = model(input_ids=ids, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, eager)


def test_from_pretrained_argument(tmp_path):
    model = _model("qwen3_moe", _experts(5, 2))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=mt.NAME)
    assert loaded.config._experts_implementation == mt.NAME
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_finetune_example_runs_and_its_curves_agree():
    """examples/hf_moe_finetune.py, a few steps: three implementations, the agreement check passes."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "hf_moe_finetune.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "6", "--eager-steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the loss curves agree" in done.stdout
    assert "tokens/s, same run: mars_kernels / grouped_mm" in done.stdout
