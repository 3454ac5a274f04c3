"""MARS: missingness-aware residual-guided specialization for incomplete multimodal learning (model layer)."""
import os

# Bit-identical training runs (and resumes) on CPU need MKL's conditional
# numerical reproducibility: without it MKL may pick a GEMM code path by the
# memory alignment of the operands, so the same run can round differently from
# one process to the next. MKL reads the setting at its first call, so this
# must run before any GEMM; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
