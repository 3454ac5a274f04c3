"""The one registration path of the kernel-level ops (``torch.library``).

The schemas are declared once, in C++ (``csrc/ops.cpp``), and the compiled
kernels register there for the CPU and CUDA dispatch keys
(``torch.ops.mars_kernels.*``). Each op family's module under
:mod:`mars_kernels.ops` then calls :func:`register` once per kernel-level op,
which attaches, in one place:

* its fake (meta) implementation, for ``torch.compile`` and meta tensors;
* its Triton twin ``torch.ops.mars_triton.<name>``: a ``torch.library.custom_op``
  with the same schema that runs the launcher of the same name in
  ``mars_kernels.ops.triton.<module>`` (imported on first call, so Triton stays
  optional);
* its autograd formula, to both namespaces.

Autograd formulas are written by argument name: ``setup(ctx, args, output)``
gets the inputs as a dict, and ``backward(ops, ctx, *grads)`` returns a dict
{input name: gradient} (inputs it leaves out get no gradient), where ``ops`` is
the namespace whose kernels the backward calls (the one the forward ran in).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .backend import extension_available

COMPILED = "mars_kernels"
TRITON = "mars_triton"

__all__ = ["COMPILED", "TRITON", "register", "namespace", "registered"]

_registered: dict[str, tuple[str, ...]] = {}


def namespace(kind: str):
    """``torch.ops.mars_kernels`` for kind "compiled", ``torch.ops.mars_triton`` for "triton"."""
    return getattr(torch.ops, COMPILED if kind == "compiled" else TRITON)


def registered() -> dict[str, tuple[str, ...]]:
    """{op name: namespaces it is registered in} (for tests and docs)."""
    return dict(_registered)


def _lazy_launcher(module: str, name: str) -> Callable:
    fn = None

    def launch(*args):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(f"mars_kernels.ops.triton.{module}"), name)
        return fn(*args)

    launch.__name__ = name
    return launch


def register(
    name: str,
    *,
    fake: Callable,
    triton: str | None = None,
    setup: Callable | None = None,
    backward: Callable | None = None,
) -> None:
    """Register the fake, the Triton twin (launcher module ``triton``) and the
    autograd formula (``setup`` + ``backward``, see the module docstring) of
    the C++-declared op ``mars_kernels::<name>``. Without the compiled
    extension there is no schema and nothing is registered (the ops then run
    on their pure-PyTorch twins)."""
    if not extension_available():
        return
    schema = getattr(torch.ops.mars_kernels, name).default._schema
    arg_names = [a.name for a in schema.arguments]
    spaces = [COMPILED]
    torch.library.register_fake(f"{COMPILED}::{name}", fake)
    if triton is not None:
        text = str(schema)
        op = torch.library.custom_op(
            f"{TRITON}::{name}", _lazy_launcher(triton, name), mutates_args=(), schema=text[text.index("("):]
        )
        op.register_fake(fake)
        spaces.append(TRITON)
    if backward is not None:
        def setup_context(ctx, inputs, output):
            setup(ctx, dict(zip(arg_names, inputs)), output)

        for space in spaces:
            ops = getattr(torch.ops, space)

            def formula(ctx, *grads, ops=ops):
                by_name = backward(ops, ctx, *grads)
                return tuple(by_name.get(n) for n in arg_names)

            torch.library.register_autograd(f"{space}::{name}", formula, setup_context=setup_context)
    _registered[name] = tuple(spaces)
