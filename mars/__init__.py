"""MARS: missingness-aware residual-guided specialization for incomplete multimodal learning (model layer)."""
