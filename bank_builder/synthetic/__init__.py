"""Deterministic synthetic WebDataset corpus: image + mask + json shards for tests, demos and evals.

`make_corpus(url, CorpusConfig(...))` writes the shards; `make_scene` composes one image; the class
table is `class_names()`. The README and docs/CORPUS.md describe the layout it follows.
"""

from bank_builder.synthetic.scenes import BACKGROUND_CLASSES, Scene, class_names, make_scene, min_visible_area
from bank_builder.synthetic.shards import (
    CorpusConfig,
    CorpusSummary,
    encode_sample,
    make_corpus,
    sample_key,
    tar_bytes,
)

__all__ = [
    "BACKGROUND_CLASSES",
    "CorpusConfig",
    "CorpusSummary",
    "Scene",
    "class_names",
    "encode_sample",
    "make_corpus",
    "make_scene",
    "min_visible_area",
    "sample_key",
    "tar_bytes",
]
