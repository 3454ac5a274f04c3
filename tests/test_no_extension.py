"""The package without its compiled extension: what a user gets who installs
without a C++ compiler or with ``MARS_KERNELS_NO_EXTENSION=1``.

A fresh interpreter with ``MARS_KERNELS_NO_EXTENSION=1`` (mars_kernels then
does not load ``mars_kernels._C`` even where it is built) and, for the Triton
kernels on CPU, ``TRITON_INTERPRET=1``: the schemas, fakes, autograd formulas
and Triton twins all exist; ``backend="triton"`` runs and agrees with the
reference, forward and backward; ``auto`` takes the reference on CPU tensors
with one warning; ``cpu`` asked for explicitly raises.
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import torch
    import mars_kernels as mk

    assert not mk.extension_available()
    assert "mars_kernels._C" not in sys.modules
    assert mk.backend.NO_EXTENSION_VAR in mk.backend._extension_error
    assert set(mk.library.registered()["topk_gating_fwd"]) == {"mars_kernels", "mars_triton"}

    g = torch.Generator().manual_seed(0)
    T, E, k, D, H = 12, 6, 2, 8, 5

    def check(name, got, want):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)

    def run(fn, *leaves):
        # forward on both backends, and the gradients of a fixed linear function of the outputs
        out = {}
        for backend in ("reference", "triton"):
            xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
            ys = fn(backend, *xs)
            loss = sum((y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum()
                       for y in ys if y.is_floating_point())
            grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad], allow_unused=True)
            out[backend] = ([y.detach() for y in ys], [z for z in grads if z is not None])
        return out

    logits = torch.randn(T, E, generator=g)
    res = run(lambda b, x: mk.topk_gating(x, k, backend=b), logits)
    check("topk_gating indices", res["triton"][0][1:], res["reference"][0][1:])
    check("topk_gating", res["triton"][0][:1] + res["triton"][1], res["reference"][0][:1] + res["reference"][1])
    res = run(lambda b, x: mk.router_stats(x, backend=b), logits)
    check("router_stats", res["triton"][0] + res["triton"][1], res["reference"][0] + res["reference"][1])
    feature, noise = torch.randn(T, E, generator=g), torch.randn(T, E, generator=g)
    res = run(lambda b, r, f: mk.mars_routing(r, f, k, sigma_0=1.0, sigma_max=2.0, noise=noise, backend=b)[:5:2], logits, feature)
    check("mars_routing", res["triton"][0] + res["triton"][1], res["reference"][0] + res["reference"][1])

    # The expert MLP through the layer: moe_align/permute run their twins, moe_mlp the Triton kernels.
    torch.manual_seed(0)
    layer = mk.SparseMoE(D, H, E, k, backend="reference")
    x = torch.randn(3, 4, D, generator=g)
    y_ref, _ = layer(x)
    layer.backend = "triton"
    y_tri, _ = layer(x)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)

    # auto: the reference on CPU tensors, with one warning; cpu asked for explicitly: an error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mk.backend.resolve(None, logits.device) == "reference"
        assert mk.backend.resolve(None, logits.device) == "reference"
    assert len(caught) == 1 and "pure-PyTorch reference" in str(caught[0].message), caught
    try:
        mk.topk_gating(logits, k, backend="cpu")
    except RuntimeError as exc:
        assert "needs the compiled extension" in str(exc)
    else:
        raise AssertionError("backend='cpu' ran without the extension")

    # Meta tensors propagate shapes through the fakes.
    w, i = mk.topk_gating(torch.empty(T, E, device="meta"), k)
    assert w.shape == (T, k) and i.device.type == "meta"
    print("no-extension ok")
    """
)


def test_package_without_the_extension_runs_reference_and_triton():
    env = dict(os.environ, MARS_KERNELS_NO_EXTENSION="1", TRITON_INTERPRET="1")
    env.pop("MARS_KERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no-extension ok" in out.stdout
