"""moe_align / permute / unpermute / grouped_mlp / moe_mlp on every backend
against the reference and the naive per-expert loop, forward and backward."""
import pytest
import torch

import mars_kernels as mk
from mars_kernels import reference as ref
from helpers import assert_close, backend_params


def _routing(T, E, k, device, seed=0, one_expert=False, few_experts=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if one_expert:
        logits[:, E // 2] += 50.0
    if few_experts:  # leaves most experts empty
        logits[:, : max(E - 2, 0)] -= 50.0
    w, i = ref.topk_gating(logits, k)
    return w.to(device), i.to(device)


def _expert_params(E, D, H, activation, dtype, device, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    h1 = 2 * H if activation == "swiglu" else H
    p = [torch.randn(E, D, h1, generator=g) / D**0.5, torch.randn(E, h1, generator=g) * 0.1,
         torch.randn(E, H, D, generator=g) / H**0.5, torch.randn(E, D, generator=g) * 0.1]
    p = [t.to(device=device, dtype=dtype) for t in p]
    if not bias:
        p[1] = p[3] = None
    return p


META_FIELDS = ("counts", "offsets", "permutation", "inverse", "block_expert", "block_start")


def check_meta_invariants(meta, indices):
    T, k = indices.shape
    E, S = meta.num_experts, T * k
    flat = indices.reshape(-1).cpu()
    perm, inv = meta.permutation.cpu(), meta.inverse.cpu()
    counts, offsets = meta.counts.cpu(), meta.offsets.cpu()
    assert all(getattr(meta, f).dtype == torch.int64 for f in META_FIELDS)
    assert torch.equal(perm[inv], torch.arange(S)) and torch.equal(inv[perm], torch.arange(S))
    assert torch.equal(offsets[1:] - offsets[:-1], counts) and int(offsets[0]) == 0
    assert int(offsets[-1]) == int((flat < E).sum())  # every kept assignment has exactly one slot
    for e in range(E):
        slots = perm[offsets[e] : offsets[e + 1]]
        assert bool((flat[slots] == e).all())
        assert bool((slots[1:] > slots[:-1]).all())  # stable: by flat index within an expert
    assert bool((flat[perm[offsets[-1] :]] == E).all())  # dropped ones last
    be, bs = meta.block_expert.cpu(), meta.block_start.cpu()
    assert be.numel() == -(-S // meta.block_size) + E
    assert bool(((be >= -1) & (be < E)).all())
    covered = torch.zeros(S, dtype=torch.int64)
    for b in range(be.numel()):
        e = int(be[b])
        if e < 0:
            continue
        lo, hi = int(bs[b]), min(int(bs[b]) + meta.block_size, int(offsets[e + 1]))
        assert int(offsets[e]) <= lo < hi
        covered[lo:hi] += 1
    assert torch.equal(covered[: int(offsets[-1])], torch.ones(int(offsets[-1]), dtype=torch.int64))


ALIGN_CASES = [(0, 4, 2, 8), (1, 1, 1, 4), (37, 7, 3, 16), (100, 257, 8, 64), (20, 5, 5, 3), (50, 8, 2, 1)]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,E,k,bs", ALIGN_CASES)
def test_align_invariants_and_reference(device, backend, T, E, k, bs):
    _, idx = _routing(T, E, k, device)
    meta = mk.moe_align(idx, E, bs, backend=backend)
    check_meta_invariants(meta, idx)
    want = ref.moe_align(idx, E, bs)
    for f in META_FIELDS:
        assert torch.equal(getattr(meta, f), getattr(want, f)), f


@pytest.mark.parametrize("device,backend", backend_params())
def test_align_with_dropped_assignments(device, backend):
    w, idx = _routing(60, 6, 2, device, one_expert=True)
    kept, kw, dropped = mk.apply_capacity(idx, w, 6, capacity=15)
    assert int(dropped) == int((kept == 6).sum()) > 0
    meta = mk.moe_align(kept, 6, 8, backend=backend)
    check_meta_invariants(meta, kept)
    assert bool((meta.counts <= 15).all())


def test_capacity_priority_is_documented_order():
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    w = torch.full((4, 2), 0.5)
    kept, kw, dropped = mk.apply_capacity(idx, w, 2, capacity=2)
    # expert 0: first choices of tokens 0, 1, 3 -> tokens 0 and 1 fit; expert 1:
    # first choice of token 2, then second choices of tokens 0, 1, 3 -> token 0 fits.
    assert kept.tolist() == [[0, 1], [0, 2], [1, 2], [2, 2]]
    assert int(dropped) == 4 and kw[1, 1] == 0 and kw[0, 1] == 0.5


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_permute_unpermute(device, backend, dtype):
    w, idx = _routing(29, 7, 3, device)
    meta = mk.moe_align(idx, 7, 8, backend=backend)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(29, 33, generator=g).to(device=device, dtype=dtype)
    ys0 = torch.randn(29 * 3, 33, generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(29, 33, generator=g).to(device=device, dtype=dtype)
    gs = torch.randn(87, 33, generator=g).to(device=device, dtype=dtype)
    out = {}
    for b in ("reference", backend):
        x, ys, ww = x0.clone().requires_grad_(True), ys0.clone().requires_grad_(True), w.clone().requires_grad_(True)
        xs = mk.permute(x, meta, backend=b)
        y = mk.unpermute(ys, meta, ww, backend=b)
        y_plain = mk.unpermute(ys0, meta, backend=b)
        ((xs * gs).sum() + (y * gy).sum()).backward()
        out[b] = (xs, y, y_plain, x.grad, ys.grad, ww.grad)
    for name, a, r in zip(("permute", "unpermute", "plain sum", "dx", "dy_sorted", "dweights"), out[backend], out["reference"]):
        assert_close(a, r, torch.float32 if name == "dweights" else dtype, name)
    assert torch.equal(out[backend][0], out["reference"][0])  # a gather is exact


def _moe_case(device, backend, T, D, H, E, k, activation, dtype, bias=True, **routing):
    w, idx = _routing(T, E, k, device, **routing)
    params = _expert_params(E, D, H, activation, dtype, device, bias)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)

    def run(b):
        x, ww = x0.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ps = [None if p is None else p.clone().requires_grad_(True) for p in params]
        if b == "loop":
            y = ref.moe_loop(x, ww, idx, *ps, activation)
        else:
            block = mk.backend.EXPERT_BLOCK_SIZE[b]
            meta = mk.moe_align(idx, E, block, backend=b)
            y = mk.moe_mlp(x, ww, meta, *ps, activation, backend=b)
        # the zero terms give every input a gradient even when no token reaches it
        tie = sum(0 * t.sum() for t in [x, ww, *ps] if t is not None)
        ((y * gy).sum() + tie).backward()
        return [y, x.grad, ww.grad] + [None if p is None else p.grad for p in ps]

    return run


# (T, D, H, E, k): T = 0 and 1, E = 1, prime E, E = 257, k = 1 and k = E, odd D/H.
MOE_SHAPES = [(0, 8, 16, 4, 2), (1, 8, 16, 1, 1), (37, 24, 40, 7, 3), (16, 33, 17, 5, 5), (12, 16, 8, 257, 2)]
NAMES = ("y", "dx", "dweights", "dw1", "db1", "dw2", "db2")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,D,H,E,k", MOE_SHAPES)
@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu"])
def test_moe_mlp_matches_reference_and_loop(device, backend, T, D, H, E, k, activation):
    run = _moe_case(device, backend, T, D, H, E, k, activation, torch.float32)
    got, want, loop = run(backend), run("reference"), run("loop")
    for name, a, r, l in zip(NAMES, got, want, loop):
        assert_close(a, r, torch.float32, f"{name} vs reference")
        assert_close(r, l, torch.float32, f"reference {name} vs loop")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("case", ["one_expert", "few_experts", "no_bias"])
def test_moe_mlp_edge_routings(device, backend, case):
    kw = {"one_expert": dict(one_expert=True), "few_experts": dict(few_experts=True), "no_bias": dict(bias=False)}[case]
    run = _moe_case(device, backend, 40, 16, 24, 8, 2, "gelu", torch.float32, **kw)
    for name, a, r in zip(NAMES, run(backend), run("loop")):
        if r is None:
            assert a is None
            continue
        assert_close(a, r, torch.float32, name)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moe_mlp_half_precision(device, backend, dtype):
    run = _moe_case(device, backend, 30, 32, 48, 6, 2, "swiglu", dtype)
    ref32 = _moe_case(device, backend, 30, 32, 48, 6, 2, "swiglu", torch.float32)("reference")
    for name, a, r in zip(NAMES, run(backend), ref32):
        # against the float32 computation: the error of working in `dtype`
        scale = r.abs().max().clamp(min=1)
        tol = 2e-2 if dtype == torch.float16 else 8e-2
        assert float((a.float() - r).abs().max() / scale) < tol, name


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mlp_on_sorted_rows(device, backend, activation):
    w, idx = _routing(25, 7, 2, device)
    kept, _, _ = mk.apply_capacity(idx, w, 7, capacity=8)
    params = _expert_params(7, 16, 24, activation, torch.float32, device)
    block = mk.backend.EXPERT_BLOCK_SIZE[backend]
    meta = mk.moe_align(kept, 7, block, backend=backend)
    xs0 = torch.randn(50, 16, device=device)
    gy = torch.randn(50, 16, device=device)
    out = {}
    for b in ("reference", backend):
        xs = xs0.clone().requires_grad_(True)
        ps = [p.clone().requires_grad_(True) for p in params]
        y = mk.grouped_mlp(xs, *ps[:2], ps[2], ps[3], meta, activation, backend=b)
        (y * gy).sum().backward()
        out[b] = [y, xs.grad] + [p.grad for p in ps]
    for name, a, r in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), out[backend], out["reference"]):
        assert_close(a, r, torch.float32, name)


@pytest.mark.parametrize("device,backend", backend_params())
def test_moe_mlp_with_dropped_assignments(device, backend):
    w, idx = _routing(40, 6, 2, device, one_expert=True)
    kept, kw, dropped = mk.apply_capacity(idx, w, 6, capacity=12)
    assert int(dropped) > 0
    params = _expert_params(6, 16, 24, "silu", torch.float32, device)
    x = torch.randn(40, 16, device=device)
    block = mk.backend.EXPERT_BLOCK_SIZE[backend]
    meta = mk.moe_align(kept, 6, block, backend=backend)
    y = mk.moe_mlp(x, kw, meta, *params, "silu", backend=backend)
    assert_close(y, ref.moe_loop(x, kw, kept, *params, "silu"), torch.float32, "y")


@pytest.mark.parametrize("device,backend", backend_params())
def test_inference_without_grad_matches(device, backend):
    run = _moe_case(device, backend, 37, 24, 40, 7, 3, "swiglu", torch.float32)
    w, idx = _routing(37, 7, 3, device)
    params = _expert_params(7, 24, 40, "swiglu", torch.float32, device)
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(3)).to(device)
    block = mk.backend.EXPERT_BLOCK_SIZE[backend]
    meta = mk.moe_align(idx, 7, block, backend=backend)
    with torch.no_grad():
        y = mk.moe_mlp(x, w, meta, *params, "swiglu", backend=backend)
    assert_close(y, run(backend)[0].detach(), torch.float32, "y under no_grad")


@pytest.mark.parametrize("device,backend", backend_params())
def test_combine_is_bitwise_deterministic(device, backend):
    run = _moe_case(device, backend, 64, 32, 32, 8, 4, "gelu", torch.float32)
    first, second = run(backend), run(backend)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_bad_input_gets_clear_errors():
    idx = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\] \(4 = dropped\), got values in \[2, 5\]"):
        mk.moe_align(idx + 2, 4)
    with pytest.raises(ValueError, match="indices must be an int32/int64 \\[T, k\\] tensor"):
        mk.moe_align(idx.float(), 4)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        mk.moe_align(idx, 4, 0)
    meta = mk.moe_align(idx, 4)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x must have T = 2 rows for this meta, got 3"):
        mk.permute(torch.randn(3, 8), meta)
    w1, w2 = torch.randn(4, 8, 16), torch.randn(4, 16, 8)
    with pytest.raises(ValueError, match=r"w1 must have shape \[E, D, H\] = \(4, 8, 16\), got \(4, 9, 16\)"):
        mk.moe_mlp(x, torch.ones(2, 2), meta, torch.randn(4, 9, 16), None, w2, None)
    with pytest.raises(ValueError, match=r"w1 must have shape \[E, D, 2H\]"):
        mk.moe_mlp(x, torch.ones(2, 2), meta, w1, None, w2, None, "swiglu")
    with pytest.raises(TypeError, match="w2 must have the activations' dtype torch.float32, got torch.float64"):
        mk.moe_mlp(x, torch.ones(2, 2), meta, w1, None, w2.double(), None)
    with pytest.raises(ValueError, match=r"b1 must have shape \[E, 16\]"):
        mk.moe_mlp(x, torch.ones(2, 2), meta, w1, torch.zeros(4, 8), w2, None)
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.moe_mlp(x, torch.ones(2, 2), meta, w1, None, w2, None, "tanh")
    with pytest.raises(ValueError, match=r"weights must have shape \[T, k\] = \(2, 2\)"):
        mk.moe_mlp(x, torch.ones(2, 3), meta, w1, None, w2, None)
    with pytest.raises(TypeError, match="meta must be a MoEMeta"):
        mk.permute(x, (1, 2))
    with pytest.raises(ValueError, match="tensors must be on one device"):
        mk.grouped_mlp(mk.permute(x, meta), w1.to("meta"), None, w2, None, meta)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_int64_offsets(backend):
    # S * D = T * k * D > 2^31: row offsets must be 64-bit in every kernel.
    k, D, E = 8, 2048, 16
    T = (1 << 31) // (k * D) + 3
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, E, (T, k), device="cuda", generator=g)
    idx[-1] = torch.arange(E - k, E, device="cuda")
    w = torch.rand(T, k, device="cuda", generator=g)
    meta = mk.moe_align(idx, E, mk.backend.EXPERT_BLOCK_SIZE[backend], backend=backend)
    xs = mk.permute(x, meta, backend=backend)
    last = meta.inverse[-k:]
    assert torch.equal(xs[last], x[-1].expand(k, D))
    y = mk.unpermute(xs.float().to(torch.bfloat16), meta, w, backend=backend)
    torch.testing.assert_close(y[-1].float(), (w[-1].sum() * x[-1].float()), rtol=2e-2, atol=2e-2)
    H = 64
    params = _expert_params(E, D, H, "gelu", torch.bfloat16, "cuda")
    out = mk.moe_mlp(x, w, meta, *params, "gelu", backend=backend)
    want = ref.moe_loop(x[-4:], w[-4:], idx[-4:], *params, "gelu")
    torch.testing.assert_close(out[-4:].float(), want.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_large_moe(backend, dtype):
    run = _moe_case("cuda", backend, 4096, 512, 256, 64, 8, "swiglu", dtype)
    ref32 = _moe_case("cuda", backend, 4096, 512, 256, 64, 8, "swiglu", torch.float32)("reference")
    for name, a, r in zip(NAMES, run(backend), ref32):
        scale = r.abs().max().clamp(min=1)
        assert float((a.float() - r).abs().max() / scale) < (2e-2 if dtype != torch.bfloat16 else 8e-2), name


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_cpu_bf16_few_rows_per_expert(transposed, rows):
    # Decode-sized GEMMs (a few rows per expert) run on a kernel of their own
    # in bfloat16 on CPUs with AVX512-BF16: weights in either layout (HF's
    # [E, out, in] transposed, or [E, in, out]), a K that is not a multiple of
    # 32, experts with 1..5 rows, against the float32 loop.
    E, D, H, k = 6, 72, 40, 2
    T = rows * E // k
    idx = torch.arange(T * k).view(T, k) % E
    w = torch.rand(T, k, generator=torch.Generator().manual_seed(2))
    params = _expert_params(E, D, H, "swiglu", torch.float32, "cpu")
    if transposed:  # the same values, stored [E, out, in] and seen through a transposed view
        params = [p if p is None or p.dim() != 3 else p.transpose(1, 2).contiguous().transpose(1, 2) for p in params]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    want = ref.moe_loop(x, w, idx, *params, "swiglu")
    meta = mk.moe_align(idx, E, mk.backend.EXPERT_BLOCK_SIZE["cpu"], backend="cpu")
    bf = [None if p is None else p.bfloat16() for p in params]
    got = mk.moe_mlp(x.bfloat16(), w, meta, *bf, "swiglu", backend="cpu")
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).abs().max() / want.abs().max()) < 2e-2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_cpu_experts_larger_than_one_row_tile(monkeypatch, activation):
    # Tiles of 256 rows: 1300 tokens on mostly one expert cross several tiles,
    # with a partial last one (the weight gradients are summed over tiles).
    monkeypatch.setenv("MARS_KERNELS_CPU_ROW_TILE", "256")
    monkeypatch.setenv("MARS_KERNELS_CPU_PARTS", "1")
    run = _moe_case("cpu", "cpu", 1300, 16, 12, 3, 2, activation, torch.float32, one_expert=True)
    for name, a, r in zip(NAMES, run("cpu"), run("loop")):
        assert_close(a, r, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parts", ["1", "2", "3"])
def test_cpu_low_precision_chunks_match_the_loop(monkeypatch, dtype, parts):
    # In bfloat16 / half, each token's sum over its k rows is kept in float32
    # between chunks and rounded once, on the last chunk, straight into the
    # output. Cut into chunks of 16 or 37 rows (experts cut too), the results
    # are the same on every run, and match the unchunked kernel and the
    # float32 loop to 2% of each result's largest value (the dtype's rounding
    # of inputs and products; the GEMMs' row blocks and an expert's weight-
    # gradient partials change with the cuts, so bits may differ between cuts).
    monkeypatch.setenv("MARS_KERNELS_CPU_PARTS", parts)
    monkeypatch.setenv("MARS_KERNELS_CPU_ROW_TILE", "16")
    case = (151, 24, 20, 9, 3, "swiglu")
    run = _moe_case("cpu", "cpu", *case, dtype, few_experts=True)
    whole, loop = run("cpu"), _moe_case("cpu", "cpu", *case, torch.float32, few_experts=True)("loop")
    def near(a, r, what):
        assert float((a.float() - r.float()).abs().max()) <= 2e-2 * float(r.float().abs().max()), what

    for name, a, r in zip(NAMES, whole, loop):
        assert a.dtype == (dtype if name != "dweights" else torch.float32), name
        near(a, r, name)
    for chunk_rows in ("16", "37"):
        monkeypatch.setenv("MARS_KERNELS_CPU_CHUNK_ROWS", chunk_rows)
        first, second = run("cpu"), run("cpu")
        for name, a, b, w in zip(NAMES, first, second, whole):
            assert torch.equal(a, b), (name, chunk_rows)
            near(a, w, f"{name}, chunks of {chunk_rows}")


@pytest.mark.parametrize("parts,chunk_rows", [("1", None), ("2", None), ("3", "37"), ("7", None), ("2", "16")])
@pytest.mark.parametrize("routing", ["spread", "one_expert", "few_experts", "dropped"])
def test_cpu_parts_match_loop(monkeypatch, parts, chunk_rows, routing):
    # The CPU kernel runs the expert-sorted rows in chunks of whole experts
    # (an expert larger than a chunk is cut), and cuts each chunk into one
    # contiguous range per thread ("part"); an expert can straddle parts and
    # chunks (its weight gradients are then summed from partials). Any number
    # of parts, more than the threads included, small chunks, row tiles inside
    # a part and experts cut in several pieces, gives the loop's results, and
    # the same bits on every run.
    monkeypatch.setenv("MARS_KERNELS_CPU_PARTS", parts)
    if chunk_rows:
        monkeypatch.setenv("MARS_KERNELS_CPU_CHUNK_ROWS", chunk_rows)
    monkeypatch.setenv("MARS_KERNELS_CPU_ROW_TILE", "16")
    T, D, H, E, k = 151, 12, 20, 9, 3
    if routing == "dropped":
        w, idx = _routing(T, E, k, "cpu", one_expert=True)
        idx, w, dropped = mk.apply_capacity(idx, w, E, capacity=40)
        assert int(dropped) > 0
        params = _expert_params(E, D, H, "silu", torch.float32, "cpu")
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
        meta = mk.moe_align(idx, E, 64, backend="cpu")
        ys = [mk.moe_mlp(x, w, meta, *params, "silu", backend="cpu") for _ in range(2)]
        assert torch.equal(ys[0], ys[1])
        assert_close(ys[0], ref.moe_loop(x, w, idx, *params, "silu"), torch.float32, "y")
        return
    run = _moe_case("cpu", "cpu", T, D, H, E, k, "swiglu", torch.float32, **(
        {} if routing == "spread" else {routing: True}))
    first, second, loop = run("cpu"), run("cpu"), run("loop")
    for name, a, b, r in zip(NAMES, first, second, loop):
        assert torch.equal(a, b), name
        assert_close(a, r, torch.float32, name)
