"""Triton launchers and kernels of the ops (GPU; also runs on CPU under
``TRITON_INTERPRET=1``), one launcher module per op module of
:mod:`mars_kernels.ops` with its ``@triton.jit`` bodies in ``_<op>_kernels.py``
beside it. Each launcher function has exactly the schema of the
``torch.ops.mars_kernels`` op of the same name (declared in its op module) and is
registered as ``torch.ops.mars_triton.<name>`` (:mod:`mars_kernels.library`).

Importing this package raises ImportError when Triton is not installed; the ops
import it only when the triton backend runs.
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mars_kernels.ops.triton needs the 'triton' package (pip install triton); "
        "use the 'reference', 'cpu' or 'cuda' backend instead"
    ) from exc
