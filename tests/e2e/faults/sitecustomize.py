"""Fault injection for tests/e2e/test_faults.py, named as such: loaded in every process of a test
run through PYTHONPATH, active only when ``SPIN_TEST_FAULT`` is set.

``kill_rank_from_checkpoint_writer``: on trainer rank 0 (with replicated shards only rank 0 writes), the second checkpoint's first
``dist_checkpointing.save`` arms a fork hook; the first helper Megatron's writer forks then
kills its rank with SIGKILL (as the OOM killer would, mid-write) and keeps running for a
minute, as a writer helper that nobody reaps would.  The rank's peers are left inside the
checkpoint's collectives.
"""

import os
import sys

if os.environ.get("SPIN_TEST_FAULT") == "kill_rank_from_checkpoint_writer":
    import importlib.abc
    import importlib.util

    def _kill_parent_and_linger():
        import signal
        import time

        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)
        os._exit(0)

    class _PatchCheckpointSave(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "megatron.core.dist_checkpointing.serialization":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def patched(module):
                exec_module(module)
                save, calls = module.save, [0]

                def save_with_fault(*args, **kwargs):
                    import torch.distributed as dist

                    if dist.is_initialized() and dist.get_rank() == 0:
                        calls[0] += 1
                        if calls[0] == 4:  # three saves per checkpoint: actor, reference, optimizer
                            os.register_at_fork(after_in_child=_kill_parent_and_linger)
                    return save(*args, **kwargs)

                module.save = save_with_fault

            spec.loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, _PatchCheckpointSave())
