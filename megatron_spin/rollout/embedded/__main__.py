"""``python -m megatron_spin.rollout.embedded --model-path DIR``: see :mod:`.server`."""

import sys

from megatron_spin.rollout.embedded.server import main

sys.exit(main())
