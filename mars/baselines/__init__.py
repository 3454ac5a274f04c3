"""The baselines, with the same encoders, data and budget as MARS, one file
each: late fusion (:mod:`.late_fusion`), MoE-Retriever (:mod:`.moe_retriever`,
with :mod:`.supporting`) and MCE (:mod:`.mce`, with :mod:`.shapley` and
:mod:`.subsets`). The vanilla MoE shares MARS's model (:mod:`mars.model`,
feature router only). :mod:`mars.methods` registers them all."""
