"""The weight-update wire format shared by the pusher (``sync``) and the engines (``rollout``).

Buckets of named tensors and their flattened layout (:mod:`.bucket`), the pickled tensor
payloads of ``/update_weights_from_tensor`` (:mod:`.tensor_payload`) and the process group
of a broadcast push (:mod:`.update_group`).  A leaf: torch only, nothing of megatron_spin but
``platform``, so both sides of a push import it and neither imports the other.
"""
