"""The run's configuration: the Hydra presets (``conf/``) and the tree of typed records they are
read into (:mod:`.run`).  The records themselves belong to the components that use them."""
