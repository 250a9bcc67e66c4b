"""The Megatron side of an update: the actor (DDP + optimizer), the reference, vocab-parallel
log-probs, the pipeline-schedule pass, micro-batching, and the offline (preference-file) loop."""
