"""Expert parallelism (mars_kernels.expert_parallel) over 2 Gloo processes.

The sharded layers must equal the single-process layer that sees the
concatenation of both ranks' tokens (rank 0's first), with the loss summed
over the ranks: outputs, input and gate-weight gradients, and each rank's
expert-parameter gradients = the matching slice of the full layer's. Also:
uneven token counts and shards, ranks without tokens, skewed routing, k = 1
and k = E, the group-wide capacity rule, conversions, the communication timer,
errors.

Every distributed case runs in ONE pair of spawned processes (the module-scoped
fixture ``dist_results``; process start-up dominates the cost); the references
are computed here, in the test process, which has no process group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import mars_kernels as mk
from dist_utils import run_distributed
from helpers import assert_close
from mars_kernels.expert_parallel import comm_timing

P = 2
D, H = 6, 10
PARAMS = ("w1", "b1", "w2", "b2")


@dataclass(frozen=True)
class Case:
    E: int = 4
    k: int = 2
    tokens: tuple = (37, 5)  # per rank
    dtype: torch.dtype = torch.float32
    routing: str = "random"  # "random", or "rank0"/"rank1": every token to that rank's experts
    capacity_factor: float | None = None
    activation: str = "gelu"
    bias: bool = True
    backend: str | None = None
    x_needs_grad: tuple = (True, True)
    pre_dropped: bool = False  # some ids already E (dropped upstream)
    seed: int = 0


F64 = torch.float64
EXPERT_CASES = {
    "fp32": Case(),
    "fp64": Case(dtype=F64),
    "E5_uneven_shards_fp32": Case(E=5),
    "E5_uneven_shards_fp64": Case(E=5, dtype=F64, tokens=(8, 41)),
    "rank0_no_tokens": Case(tokens=(0, 23)),
    "rank1_no_tokens_fp64": Case(tokens=(19, 0), dtype=F64),
    "no_tokens_anywhere": Case(tokens=(0, 0)),
    "all_to_rank1_experts": Case(routing="rank1"),
    "all_to_rank0_experts_E5_k3": Case(E=5, k=3, routing="rank0", dtype=F64),
    "k1": Case(k=1, E=5),
    "k_equals_E": Case(E=3, k=3, dtype=F64),
    "swiglu_no_bias": Case(activation="swiglu", bias=False),
    "reference_backend": Case(backend="reference", dtype=F64),
    "x_needs_grad_on_rank1_only": Case(x_needs_grad=(False, True)),
    "pre_dropped_ids": Case(pre_dropped=True),
    "capacity": Case(capacity_factor=0.6),
    "capacity_E5_fp64": Case(E=5, capacity_factor=0.8, dtype=F64, tokens=(11, 30)),
    "capacity_rank0_no_tokens": Case(capacity_factor=0.5, tokens=(0, 20)),
    "capacity_k1_all_to_rank1": Case(k=1, capacity_factor=1.0, routing="rank1"),
}


@dataclass(frozen=True)
class MoECase:
    tokens: tuple = (37, 5)
    dtype: torch.dtype = torch.float32
    E: int = 4
    k: int = 2
    capacity_factor: float | None = None
    seed: int = 1


MOE_CASES = {
    "dropless_fp32": MoECase(),
    "dropless_fp64_E5_rank0_no_tokens": MoECase(tokens=(0, 29), dtype=F64, E=5),
    "per_rank_capacity_fp64": MoECase(capacity_factor=0.7, dtype=F64),
}


# --------------------------------------------------------------------------- inputs, shared by both sides


def make_inputs(case: Case) -> list[tuple[torch.Tensor, ...]]:
    """Per rank: x [T_r, D], weights [T_r, k], indices [T_r, k], cotangent [T_r, D]."""
    gen = torch.Generator().manual_seed(case.seed + 100)
    lo, hi = (0, case.E) if case.routing == "random" else mk.shard_range(case.E, P, int(case.routing[-1]))
    out = []
    for T in case.tokens:
        x = torch.randn(T, D, generator=gen, dtype=F64).to(case.dtype)
        indices = torch.rand(T, hi - lo, generator=gen).argsort(1)[:, : case.k] + lo
        if case.pre_dropped:
            indices[torch.rand(T, case.k, generator=gen) < 0.25] = case.E
        weights = torch.rand(T, case.k, generator=gen, dtype=F64).to(case.dtype)
        cotangent = torch.randn(T, D, generator=gen, dtype=F64).to(case.dtype)
        out.append((x, weights, indices, cotangent))
    return out


def full_experts(case: Case) -> mk.Experts:
    torch.manual_seed(case.seed)
    layer = mk.Experts(D, H, case.E, activation=case.activation, bias=case.bias, backend=case.backend)
    return layer.to(case.dtype)


def grads_of(module, names=PARAMS) -> dict:
    out = {}
    for n in names:
        p = getattr(module, n)
        if p is not None:
            out[n] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return out


# --------------------------------------------------------------------------- what each rank runs


def _expert_case_on_rank(rank: int, case: Case) -> dict:
    sharded = mk.shard_experts(full_experts(case), capacity_factor=case.capacity_factor)
    x, weights, indices, cotangent = make_inputs(case)[rank]
    x.requires_grad_(case.x_needs_grad[rank])
    weights.requires_grad_(True)
    y = sharded(x, weights, indices)
    (y * cotangent).sum().backward()
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweights": weights.grad,
        "grads": grads_of(sharded),
        "range": (sharded.expert_start, sharded.expert_stop),
        "dropped": int(sharded.last_dropped),
        "dropped_total": int(sharded.last_dropped_total),
        "capacity": sharded.last_capacity,
    }


def _moe_case_on_rank(rank: int, case: MoECase) -> dict:
    torch.manual_seed(case.seed)
    moe = mk.SparseMoE(D, H, case.E, case.k, capacity_factor=case.capacity_factor).to(case.dtype)
    mk.expert_parallel(moe)
    x, cotangent = moe_inputs(case)[rank]
    x.requires_grad_(True)
    y, aux = moe(x)
    (y * cotangent).sum().backward()
    return {
        "sharded": isinstance(moe.experts, mk.ShardedExperts),
        "y": y.detach(),
        "dx": x.grad,
        "router_grad": moe.router.proj.weight.grad.clone(),
        "grads": grads_of(moe.experts),
        "range": (moe.experts.expert_start, moe.experts.expert_stop),
        "dropped": int(aux["dropped"]),
    }


def _misc_on_rank(rank: int) -> dict:
    out = {}
    for E in (4, 5):
        torch.manual_seed(3)
        full = mk.Experts(D, H, E)
        gathered = mk.gather_experts(mk.shard_experts(full))
        out[f"roundtrip_E{E}"] = {n: getattr(gathered, n).detach() for n in PARAMS}
    torch.manual_seed(7)
    fresh = mk.gather_experts(mk.ShardedExperts(D, H, 5))
    out["fresh_E5"] = {n: getattr(fresh, n).detach() for n in PARAMS}
    try:
        mk.ShardedExperts(D, H, 1)
    except ValueError as exc:
        out["too_few_experts"] = str(exc)
    sharded = mk.ShardedExperts(D, H, 4, capacity_factor=1.0)
    k = 1 if rank == 0 else 2
    try:
        sharded(torch.randn(3, D), torch.rand(3, k), torch.zeros(3, k, dtype=torch.int64))
    except ValueError as exc:
        out["k_mismatch"] = str(exc)
    # The timer counts every exchange: counts, rows out, rows back; then 2 in backward.
    sharded = mk.ShardedExperts(D, H, 4)
    x, w, i = torch.randn(5, D), torch.rand(5, 2, requires_grad=True), torch.randint(0, 4, (5, 2))
    with comm_timing() as timer:
        y = sharded(x, w, i)
        y.sum().backward()
    out["timer"] = (timer.calls, timer.seconds)
    with torch.no_grad():
        y_eval = sharded(x, w, i)
    out["no_grad"] = (y.detach(), y_eval, y_eval.requires_grad)
    # E = 3 over 2 ranks (2 + 1 experts): the routing tables (buffers) have the same shapes on every rank, so
    # DistributedDataParallel, which broadcasts buffers, wraps the layer (it aborted with a collective mismatch).
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(5)
    moe = mk.expert_parallel(mk.SparseMoE(D, H, 3, k=1))
    out["buffer_shapes_E3"] = {n: tuple(b.shape) for n, b in moe.named_buffers()}
    DDP._set_params_and_buffers_to_ignore_for_model(moe, [f"experts.{n}" for n, _ in moe.experts.named_parameters()])
    ddp = DDP(moe)
    for _ in range(2):
        y, _aux = ddp(torch.randn(4 + rank, D))
        y.sum().backward()
    out["ddp_E3_grad"] = moe.router.proj.weight.grad.clone()
    return out


def _all_cases_on_rank(rank: int, world_size: int) -> dict:
    assert world_size == P
    return {
        "experts": {name: _expert_case_on_rank(rank, c) for name, c in EXPERT_CASES.items()},
        "moe": {name: _moe_case_on_rank(rank, c) for name, c in MOE_CASES.items()},
        "misc": _misc_on_rank(rank),
    }


@pytest.fixture(scope="module")
def dist_results():
    return run_distributed(_all_cases_on_rank, P, timeout_s=30)


# --------------------------------------------------------------------------- single-process references


def moe_inputs(case: MoECase) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(case.seed + 200)
    draw = lambda T: torch.randn(T, D, generator=gen, dtype=F64).to(case.dtype)  # noqa: E731
    return [(draw(T), draw(T)) for T in case.tokens]


def reference_experts(case: Case) -> dict:
    full = full_experts(case)
    parts = make_inputs(case)
    x, weights, indices, cotangent = (torch.cat(t) for t in zip(*parts))
    x.requires_grad_(True)
    weights.requires_grad_(True)
    kept_idx, kept_w, capacity = indices, weights, -1
    if case.capacity_factor is not None:
        capacity = math.ceil(case.capacity_factor * x.shape[0] * case.k / case.E)
        kept_idx, kept_w, _ = mk.apply_capacity(indices, weights, case.E, capacity)
    y = full(x, kept_w, kept_idx)
    (y * cotangent).sum().backward()
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweights": weights.grad,
        "grads": grads_of(full),
        "dropped_rows": (kept_idx != indices).sum(1),
        "capacity": capacity,
    }


def rank_rows(tokens: tuple, rank: int) -> slice:
    start = sum(tokens[:rank])
    return slice(start, start + tokens[rank])


# --------------------------------------------------------------------------- distributed tests


@pytest.mark.parametrize("name", list(EXPERT_CASES))
def test_sharded_experts_match_single_process(dist_results, name):
    case, ref = EXPERT_CASES[name], reference_experts(EXPERT_CASES[name])
    assert [r["experts"][name]["range"] for r in dist_results] == [mk.shard_range(case.E, P, r) for r in range(P)]
    for rank, res in enumerate(r["experts"][name] for r in dist_results):
        rows, (start, stop) = rank_rows(case.tokens, rank), res["range"]
        assert_close(res["y"], ref["y"][rows], what=f"rank {rank} y")
        assert_close(res["dweights"], ref["dweights"][rows], what=f"rank {rank} dweights")
        if case.x_needs_grad[rank]:
            assert_close(res["dx"], ref["dx"][rows], what=f"rank {rank} dx")
        else:
            assert res["dx"] is None
        assert set(res["grads"]) == set(ref["grads"])
        for n, g in res["grads"].items():
            assert_close(g, ref["grads"][n][start:stop], what=f"rank {rank} {n}.grad")
        assert res["capacity"] == ref["capacity"]
        assert res["dropped"] == int(ref["dropped_rows"][rows].sum())
        assert res["dropped_total"] == int(ref["dropped_rows"].sum())


def test_capacity_cases_drop_something(dist_results):
    """Guard against capacity cases that would pass vacuously."""
    for name, case in EXPERT_CASES.items():
        if case.capacity_factor is not None:
            assert dist_results[1]["experts"][name]["dropped_total"] > 0, name


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_expert_parallel_sparse_moe_matches_single_process(dist_results, name):
    case = MOE_CASES[name]
    torch.manual_seed(case.seed)
    full = mk.SparseMoE(D, H, case.E, case.k, capacity_factor=case.capacity_factor).to(case.dtype)
    parts = moe_inputs(case)
    if case.capacity_factor is None:  # dropless: one pass over the concatenation
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        y, _ = full(x)
        (y * torch.cat([p[1] for p in parts])).sum().backward()
        rows = [rank_rows(case.tokens, r) for r in range(P)]
        ys, dxs = [y.detach()[r] for r in rows], [x.grad[r] for r in rows]
        dropped = [0] * P
    else:  # SparseMoE's capacity is per rank: one pass per rank's tokens, gradients summed
        ys, dxs, dropped = [], [], []
        for x, cotangent in parts:
            x.requires_grad_(True)
            y, aux = full(x)
            (y * cotangent).sum().backward()
            ys.append(y.detach())
            dxs.append(x.grad)
            dropped.append(int(aux["dropped"]))
        assert sum(dropped) > 0
    results = [r["moe"][name] for r in dist_results]
    full_grads = grads_of(full.experts)
    for rank, res in enumerate(results):
        assert res["sharded"]
        assert_close(res["y"], ys[rank], what=f"rank {rank} y")
        assert_close(res["dx"], dxs[rank], what=f"rank {rank} dx")
        assert res["dropped"] == dropped[rank]
        start, stop = res["range"]
        for n, g in res["grads"].items():
            assert_close(g, full_grads[n][start:stop], what=f"rank {rank} {n}.grad")
    # The router is replicated: its gradient summed over ranks (what DDP all-reduces) is the full one.
    assert_close(sum(r["router_grad"] for r in results), full.router.proj.weight.grad, what="router grad")


def test_gather_of_shards_is_the_full_layer_on_every_rank(dist_results):
    for E in (4, 5):
        torch.manual_seed(3)
        full = mk.Experts(D, H, E)
        for res in dist_results:
            for n in PARAMS:
                assert torch.equal(res["misc"][f"roundtrip_E{E}"][n], getattr(full, n).detach()), (E, n)


def test_fresh_init_does_not_depend_on_group_size(dist_results):
    torch.manual_seed(7)
    single = mk.ShardedExperts(D, H, 5)  # no process group: all 5 experts here
    for res in dist_results:
        for n in PARAMS:
            assert torch.equal(res["misc"]["fresh_E5"][n], getattr(single, n).detach()), n
    w1 = single.w1.detach()
    assert not any(torch.equal(w1[a], w1[b]) for a in range(5) for b in range(a))


def test_distributed_errors_are_raised_on_every_rank(dist_results):
    for res in dist_results:
        assert "num_experts=1" in res["misc"]["too_few_experts"]
        assert "same k" in res["misc"]["k_mismatch"]


def test_routing_tables_are_rank_independent_and_ddp_wraps_an_uneven_shard(dist_results):
    shapes = [r["misc"]["buffer_shapes_E3"] for r in dist_results]
    assert shapes[0] == shapes[1] and shapes[0], shapes
    grads = [r["misc"]["ddp_E3_grad"] for r in dist_results]
    assert torch.equal(grads[0], grads[1])  # DDP's all-reduce ran: the router replicas agree


def test_comm_timer_and_no_grad(dist_results):
    for res in dist_results:
        calls, seconds = res["misc"]["timer"]
        assert calls == 5 and seconds > 0
        y, y_eval, requires_grad = res["misc"]["no_grad"]
        assert torch.equal(y, y_eval) and not requires_grad


# --------------------------------------------------------------------------- single process, no process group


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_process_group_it_is_local_experts(dtype):
    case = Case(E=5, tokens=(29,), dtype=dtype)
    full = full_experts(case)
    sharded = mk.shard_experts(full)
    assert (sharded.world_size, sharded.expert_start, sharded.expert_stop) == (1, 0, 5)
    x, w, i, g = make_inputs(case)[0]
    outs = []
    for layer in (full, sharded):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = layer(xr, wr, i)
        (y * g).sum().backward()
        outs.append((y.detach(), xr.grad, wr.grad, grads_of(layer)))
    for a, b, what in zip(outs[1][:3], outs[0][:3], ("y", "dx", "dweights")):
        assert_close(a, b, what=what)
    for n in PARAMS:
        assert_close(outs[1][3][n], outs[0][3][n], what=n)
    assert {k: v.shape for k, v in sharded.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}


def test_single_process_capacity_is_apply_capacity():
    case = Case(E=4, tokens=(50,), capacity_factor=0.7)
    ref = reference_experts(case)
    sharded = mk.shard_experts(full_experts(case), capacity_factor=case.capacity_factor)
    x, w, i, _ = make_inputs(case)[0]
    y = sharded(x, w, i)
    assert sharded.last_capacity == ref["capacity"] == math.ceil(0.7 * 50 * 2 / 4)
    assert int(sharded.last_dropped) == int(ref["dropped_rows"].sum()) > 0
    assert_close(y.detach(), ref["y"])


def test_shard_range():
    assert [mk.shard_range(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [mk.shard_range(8, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert [mk.shard_range(4, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="rank"):
        mk.shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        mk.shard_range(4, 0, 0)


def test_bad_inputs_raise_clear_errors():
    layer = mk.ShardedExperts(D, H, 4)
    x, w = torch.randn(3, D), torch.rand(3, 2)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\]"):
        layer(x, w, torch.tensor([[0, 5], [1, 2], [3, 3]]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\]"):
        layer(x, w, torch.tensor([[0, -1], [1, 2], [3, 3]]))
    with pytest.raises(ValueError, match="d_model=6"):
        layer(torch.randn(3, D + 1), w, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="weights"):
        layer(x, torch.rand(3, 1), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="T = 3"):
        layer(x, torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double(), w, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="activation"):
        mk.ShardedExperts(D, H, 4, activation="tanh")
    with pytest.raises(ValueError, match="capacity_factor"):
        mk.ShardedExperts(D, H, 4, capacity_factor=0)
    with pytest.raises(TypeError, match="Experts"):
        mk.shard_experts(torch.nn.Linear(2, 2))
    moe = mk.expert_parallel(mk.SparseMoE(D, H, 4, 2))
    with pytest.raises(ValueError, match="already sharded"):
        mk.expert_parallel(moe)
