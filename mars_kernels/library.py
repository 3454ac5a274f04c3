"""The one registration path of the kernel-level ops (``torch.library``).

Each op family's module under :mod:`mars_kernels.ops` declares its
kernel-level ops beside the public functions that call them, one
:func:`register` call per op, which attaches in one place:

* the schema, ``torch.ops.mars_kernels.<name>`` (defined here, in Python: the
  compiled extension ``mars_kernels._C`` only registers implementations of it
  for the CPU and CUDA dispatch keys, from ``csrc/cpu/<op>.cpp`` and
  ``csrc/cuda/<op>.cu``);
* its fake (meta) implementation, for ``torch.compile`` and meta tensors;
* its Triton twin ``torch.ops.mars_triton.<name>``: a ``torch.library.custom_op``
  with the same schema that runs the Triton launcher it is given (a callable;
  the op modules pass one that imports the launcher module on first call, so
  Triton stays optional);
* its autograd formula, to both namespaces.

None of this needs the compiled extension: without it the schemas, fakes,
autograd formulas and Triton twins all exist, and only the ``cpu`` and
``cuda`` backends are missing.

Load order: :mod:`mars_kernels.backend` loads ``_C`` before any op module
defines its schemas. The dispatcher accepts an implementation registered
before its schema and checks it against the schema when that arrives, so a
C++ kernel whose signature disagrees with the Python schema fails the
``define`` (at import) with the dispatcher's message.

Autograd formulas are written by argument name: ``setup(ctx, args, output)``
gets the inputs as a dict, and ``backward(ops, ctx, *grads)`` returns a dict
{input name: gradient} (inputs it leaves out get no gradient), where ``ops`` is
the namespace whose kernels the backward calls (the one the forward ran in).
"""
from __future__ import annotations

from typing import Callable

import torch

COMPILED = "mars_kernels"
TRITON = "mars_triton"

__all__ = ["COMPILED", "TRITON", "register", "namespace", "registered"]

# Kept alive for the life of the process: the schemas live as long as it does.
_LIBRARY = torch.library.Library(COMPILED, "FRAGMENT")
_registered: dict[str, tuple[str, ...]] = {}


def namespace(kind: str):
    """``torch.ops.mars_kernels`` for kind "compiled", ``torch.ops.mars_triton`` for "triton"."""
    return getattr(torch.ops, COMPILED if kind == "compiled" else TRITON)


def registered() -> dict[str, tuple[str, ...]]:
    """{op name: namespaces it is registered in} (for tests and docs)."""
    return dict(_registered)


def register(
    schema: str,
    *,
    fake: Callable | None = None,
    triton: Callable | None = None,
    setup: Callable | None = None,
    backward: Callable | None = None,
) -> None:
    """Declare ``mars_kernels::<schema>`` and register its fake, its Triton
    twin (``triton``: the launcher, called with the op's arguments) and its
    autograd formula (``setup`` + ``backward``, see the module docstring).

    ``schema`` is ``"name(args) -> returns"``. An op without tensor arguments
    (nothing to trace) needs no fake.
    """
    name = schema[: schema.index("(")].strip()
    _LIBRARY.define(schema)
    arg_names = [a.name for a in getattr(namespace("compiled"), name).default._schema.arguments]
    spaces = [COMPILED]
    if fake is not None:
        torch.library.register_fake(f"{COMPILED}::{name}", fake)
    if triton is not None:
        op = torch.library.custom_op(
            f"{TRITON}::{name}", triton, mutates_args=(), schema=schema[schema.index("("):]
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
