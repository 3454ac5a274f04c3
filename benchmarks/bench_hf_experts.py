"""The experts layer of HF transformers MoE families through HF's experts
interface: ``mars_kernels`` against HF's ``eager`` loop, ``grouped_mm`` and
``batched_mm``, and a dense SwiGLU MLP with the same GEMM FLOPs (the ceiling),
all in the same run, forward and forward + backward.

    python benchmarks/bench_hf_experts.py                 # all shapes, CPU fp32
    python benchmarks/bench_hf_experts.py --shapes qwen3 --rounds 9
    python benchmarks/bench_hf_experts.py --dtype bfloat16 --block   # bf16, router + experts
    python benchmarks/bench_hf_experts.py --device cuda --dtype bfloat16 --shapes qwen3-30b-a3b

The ``gemm floor`` peer runs only the GEMMs an MoE step needs, per expert with
``torch.mm`` (the library the kernels call) on rows already sorted by expert
and transposed where that is faster, into freshly allocated outputs as a step
would: forward x W1 and a W2, backward also dy W2^T, dW2, dW1 and dh W1^T; no
gather, activation, combine or router. ``of floor`` is how close ours comes to
it: at shapes where the expert GEMMs alone take as long as the whole dense MLP,
this floor, not the dense MLP, bounds what any implementation on these GEMMs
can reach.

``--block`` times the family's whole MoE block instead (its router, then the
experts): under ``mars_kernels`` a router whose math is softmax + top-k runs on
``topk_gating`` (``mars_kernels.transformers.FUSED_ROUTERS``; GPT-OSS keeps
HF's), under the HF implementations HF's router; the dense peer adds the
router's logits GEMM to the dense MLP.

Shapes (T tokens, D hidden, I expert intermediate, E experts, k per token):
``qwen3`` (4096, 512, 256, 64, 8): Qwen3-30B-A3B's proportions scaled to a CPU;
``mixtral`` (2048, 1024, 512, 16, 2); ``gpt-oss`` (2048, 512, 256, 32, 4) in
GPT-OSS's layout (transposed, biases, interleaved clamped SwiGLU);
``decode-1/4/16``: the qwen3 shape with T = 1, 4, 16 tokens, forward only;
``qwen3-30b-a3b`` (32768, 2048, 768, 128, 8): the real one, for a GPU.

Each round calls every implementation once (interleaved, so machine drift hits
all alike); the table gives medians and the ratios of per-round medians.
``batched_mm`` materialises one weight matrix per (token, expert) pair and is
skipped where that would exceed ``--batched-mm-limit-gb``. JSON (with the CPU
model and its ISA flags) to
``benchmarks/results/bench_hf_experts_<device>[_bf16][_block].json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import RESULTS_DIR, environment, print_header, print_rows, write_results  # noqa: E402

SHAPES = {
    "qwen3": dict(family="qwen3_moe", T=4096, D=512, I=256, E=64, k=8),
    "mixtral": dict(family="mixtral", T=2048, D=1024, I=512, E=16, k=2),
    "gpt-oss": dict(family="gpt_oss", T=2048, D=512, I=256, E=32, k=4),
    "decode-1": dict(family="qwen3_moe", T=1, D=512, I=256, E=64, k=8, forward_only=True),
    "decode-4": dict(family="qwen3_moe", T=4, D=512, I=256, E=64, k=8, forward_only=True),
    "decode-16": dict(family="qwen3_moe", T=16, D=512, I=256, E=64, k=8, forward_only=True),
    "qwen3-30b-a3b": dict(family="qwen3_moe", T=32768, D=2048, I=768, E=128, k=8),
}
DEFAULT_SHAPES = ["qwen3", "mixtral", "gpt-oss", "decode-1", "decode-4", "decode-16"]
IMPLS = ["mars_kernels", "grouped_mm", "batched_mm", "eager"]


def make_experts(shape: dict, dtype: torch.dtype, device: torch.device, block: bool = False):
    """An HF experts module of the shape's family, random weights (block: the
    family's MoE block, router and experts, the router's weights random too)."""
    from transformers import AutoConfig

    family = shape["family"]
    cfg = AutoConfig.for_model(family, hidden_size=shape["D"], intermediate_size=shape["I"],
                               moe_intermediate_size=shape["I"], num_experts=shape["E"],
                               num_local_experts=shape["E"], num_experts_per_tok=shape["k"], norm_topk_prob=True)
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as block_cls
    elif family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as block_cls
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as block_cls
    module = block_cls(cfg) if block else cls(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = shape["I"] if "down" in name else shape["D"]
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5 if "bias" not in name else torch.zeros(p.shape))
    module.config = cfg  # the block's experts and router read the implementation from this config
    return module.to(device=device, dtype=dtype)


def routing(T: int, E: int, k: int, device, dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    w, idx = torch.topk(logits.softmax(-1), k, dim=-1)
    return idx.to(device), (w / w.sum(-1, keepdim=True)).to(device=device, dtype=dtype)


def gemm_floor(experts, idx: torch.Tensor, x: torch.Tensor, train: bool):
    """A callable running only the GEMMs of the experts' step (see the module
    docstring), for an HF experts module with gate_up_proj [E, 2I, D] and
    down_proj [E, D, I] (biases and activation left out)."""
    E = experts.gate_up_proj.shape[0]
    w1, w2 = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2I, D], [E, D, I]
    counts = torch.bincount(idx.reshape(-1).cpu(), minlength=E)[:E].tolist()
    order = torch.argsort(idx.reshape(-1), stable=True)
    xs = x[order // idx.shape[1]].contiguous()
    S, D, I2, I = xs.shape[0], xs.shape[1], w1.shape[1], w2.shape[2]
    g = torch.Generator().manual_seed(4)
    a = torch.randn(S, I, generator=g).to(x)
    dy = torch.randn(S, D, generator=g).to(x)
    dh = torch.randn(S, I2, generator=g).to(x)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    lowp = x.dtype != torch.float32  # the library's reduced-precision GEMMs want row-major operands
    dyT = [dy[lo:hi].t().contiguous() for lo, hi in zip(bounds, bounds[1:])] if train and lowp else None
    dhT = [dh[lo:hi].t().contiguous() for lo, hi in zip(bounds, bounds[1:])] if train and lowp else None

    def call():
        with torch.no_grad():
            h, ys = x.new_empty(S, I2), x.new_empty(S, D)
            if train:
                G, dxs = x.new_empty(S, I), x.new_empty(S, D)
                dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
            for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                if lo == hi:
                    continue
                torch.mm(xs[lo:hi], w1[e].t(), out=h[lo:hi])
                torch.mm(a[lo:hi], w2[e].t(), out=ys[lo:hi])
                if train:
                    torch.mm(dy[lo:hi], w2[e], out=G[lo:hi])
                    torch.mm(dyT[e] if lowp else dy[lo:hi].t(), a[lo:hi], out=dw2[e])
                    torch.mm(dhT[e] if lowp else dh[lo:hi].t(), xs[lo:hi], out=dw1[e])
                    torch.mm(dh[lo:hi], w1[e], out=dxs[lo:hi])
    return call


def batched_mm_bytes(shape: dict, elem: int) -> int:
    S = shape["T"] * shape["k"]
    return S * (2 * shape["I"] * shape["D"] + shape["I"] * shape["D"]) * elem


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (CPU); 3x that for decode shapes")
    p.add_argument("--batched-mm-limit-gb", type=float, default=3.0)
    p.add_argument("--block", action="store_true", help="time the MoE block (router + experts), not the experts alone")
    p.add_argument("--out", help="JSON path (default benchmarks/results/bench_hf_experts_<device>[_bf16][_block].json)")
    p.add_argument("--note", help="recorded in the JSON's environment (e.g. what else the machine was running)")
    a = p.parse_args()
    import mars_kernels.transformers as mt

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    elem = torch.finfo(dtype).bits // 8
    env = environment(device)
    env["transformers"] = __import__("transformers").__version__
    env["scope"] = "block (router + experts)" if a.block else "experts"
    if a.note:
        env["note"] = a.note
    rows = []
    for name in a.shapes:
        shape = SHAPES[name]
        T, D, I, E, k = (shape[c] for c in "TDIEk")
        experts = make_experts(shape, dtype, device, block=a.block)
        idx, w = routing(T, E, k, device, dtype)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        dense_up = torch.randn(D, 2 * k * I, device=device, dtype=dtype) / D**0.5
        dense_down = torch.randn(k * I, D, device=device, dtype=dtype) / (k * I) ** 0.5
        dense_router = torch.randn(D, E, device=device, dtype=dtype) / D**0.5
        impls = [i for i in IMPLS if i != "batched_mm" or batched_mm_bytes(shape, elem) <= a.batched_mm_limit_gb * 2**30]
        modes = ["forward"] if shape.get("forward_only") else ["forward", "forward+backward"]
        for mode in modes:
            train = mode != "forward"

            def forward(xi, wi):
                if not a.block:
                    return experts(xi, idx, wi)
                out = experts(xi.unsqueeze(0))  # [1, T, D]; GPT-OSS's block also returns its router scores
                return out[0] if isinstance(out, tuple) else out

            def run_experts(impl):
                def call():
                    experts.config._experts_implementation = impl
                    if train:
                        xi = x.detach().requires_grad_(True)
                        wi = w.detach().requires_grad_(True)
                        experts.zero_grad(set_to_none=True)
                        forward(xi, wi).sum().backward()
                    else:
                        with torch.no_grad():
                            forward(x, w)
                return call

            def dense():
                xi = x.detach().requires_grad_(train)
                with torch.set_grad_enabled(train):
                    dense_up.requires_grad_(train), dense_down.requires_grad_(train), dense_router.requires_grad_(train)
                    gate, up = (xi @ dense_up).chunk(2, dim=-1)
                    y = (F.silu(gate) * up) @ dense_down
                    if a.block:
                        y = y + (xi @ dense_router).sum(-1, keepdim=True)  # the router's GEMM, kept in the graph
                    if train:
                        y.sum().backward()
                        dense_up.grad = dense_down.grad = dense_router.grad = None

            floor = None if a.block or not hasattr(experts, "gate_up_proj") else gemm_floor(experts, idx, x, train)
            fns = {impl: run_experts(impl) for impl in impls} | {"dense": dense}
            if floor is not None:
                fns["gemm_floor"] = floor
            rounds = a.rounds * (3 if shape.get("forward_only") else 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for fn in fns.values():
                    fn()  # warm-up
                samples = {n: [] for n in fns}
                for _ in range(rounds):
                    for n, fn in fns.items():
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        samples[n].append(time.perf_counter() - t0)
            med = {n: statistics.median(v) for n, v in samples.items()}
            flops = 2 * T * k * (D * 2 * I + I * D) * (3 if train else 1)

            def ratio(peer):
                if peer not in samples:
                    return None
                return statistics.median(b / a_ for a_, b in zip(samples["mars_kernels"], samples[peer]))

            best_hf = min((med[i], i) for i in impls if i != "mars_kernels")
            row = dict(shape=name, family=shape["family"], T=T, D=D, I=I, E=E, k=k, mode=mode, dtype=str(dtype),
                       scope="block" if a.block else "experts",
                       ms={n: 1e3 * v for n, v in med.items()},
                       ms_range={n: [1e3 * min(v), 1e3 * max(v)] for n, v in samples.items()},
                       x_grouped_mm=ratio("grouped_mm"), x_eager=ratio("eager"), x_batched_mm=ratio("batched_mm"),
                       best_hf=best_hf[1], x_best_hf=best_hf[0] / med["mars_kernels"],
                       of_dense=med["dense"] / med["mars_kernels"],
                       of_floor=med["gemm_floor"] / med["mars_kernels"] if "gemm_floor" in med else None,
                       tflops=flops / med["mars_kernels"] / 1e12, rounds=rounds,
                       native=mt.plan(experts).native)
            row.update({f"{n}_ms": 1e3 * v for n, v in med.items()})
            rows.append(row)
            cols = [("shape", "shape", ""), ("mode", "mode", ""), ("mars_kernels_ms", "ours ms", ".2f"),
                    ("grouped_mm_ms", "grouped_mm", ".2f"), ("batched_mm_ms", "batched_mm", ".2f"),
                    ("eager_ms", "eager", ".2f"), ("dense_ms", "dense", ".2f"), ("gemm_floor_ms", "gemm floor", ".2f"),
                    ("x_grouped_mm", "x grouped", ".2f"), ("x_best_hf", "x best HF", ".2f"),
                    ("of_dense", "of dense", ".0%"), ("of_floor", "of floor", ".0%")]
            if len(rows) == 1:
                print(f"{env['device']}, {dtype}, {env['scope']}, torch {env['torch']}, transformers "
                      f"{env['transformers']}\n{env['cpu_model']}, flags {' '.join(env['cpu_flags'] or ['?'])}")
                print_header(cols)
            print_rows([row], cols)
    tag = ("_bf16" if dtype == torch.bfloat16 and device.type == "cpu" else "") + ("_block" if a.block else "")
    out = a.out or str(RESULTS_DIR / f"bench_hf_experts_{'cuda' if device.type == 'cuda' else 'cpu'}{tag}.json")
    path = write_results("bench_hf_experts", env, rows, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
