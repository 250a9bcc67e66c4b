"""What a model is, independent of how it is built or stored: the architecture record read
from an HF config (:mod:`.arch`), the numeric precision (:mod:`.precision`) and the model FLOPs
of a step (:mod:`.flops`, for the planner and for MFU).

A leaf (it imports only ``errors``), so the builders (``models``), the converter tables
(``convert``), the layouts (``parallel``) and the checkpoints (``ckpt``) can all depend on it.
"""
