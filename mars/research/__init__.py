"""Variants of MARS still under study, as strategies the model layer plugs
into :class:`mars_kernels.MarsMoE` (never flags on the kernel package's
layers). Variants the research log rejected are not kept in code; the log
(``docs/mars_research.md``) keeps their numbers and the commit they lived in."""
