"""The ``load_format`` values of ``/update_weights_from_tensor`` (SGLang's names): plain constants,
so the sync config can validate one without importing the payload codec (and torch)."""

FLATTENED_BUCKET = "flattened_bucket"  # one flat buffer per bucket plus each tensor's name, dtype, shape, offset
LOAD_FORMATS = (None, FLATTENED_BUCKET)  # None: one serialized tensor per name
