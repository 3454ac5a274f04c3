"""Baselines and related methods with the same encoders, data and budget as
MARS: MoE-Retriever (:mod:`.moe_retriever`) and MCE (:mod:`.mce`). Late fusion
and the vanilla MoE live in :mod:`mars.model` next to MARS, whose pieces they
share."""
