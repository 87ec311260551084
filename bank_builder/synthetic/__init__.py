"""Deterministic synthetic WebDataset corpus: image + mask + json shards for tests, demos and evals.

`make_corpus(url, CorpusConfig(...))` writes the shards (`iter_scenes` yields the same samples in memory);
`make_scene` composes one image; `noisy_caption` describes one with controlled wrong / missing phrases;
the class table is `class_names()`, the phrases that name each class `class_phrases()`. The README and
docs/CORPUS.md describe the layout it follows.
"""

from bank_builder.synthetic.captions import Caption, noisy_caption
from bank_builder.synthetic.scenes import (
    BACKGROUND_CLASSES,
    Scene,
    class_names,
    class_phrases,
    make_scene,
    min_visible_area,
)
from bank_builder.synthetic.shards import (
    CorpusConfig,
    CorpusSummary,
    encode_sample,
    iter_scenes,
    make_corpus,
    sample_key,
    tar_bytes,
)

__all__ = [
    "BACKGROUND_CLASSES",
    "Caption",
    "CorpusConfig",
    "CorpusSummary",
    "Scene",
    "class_names",
    "class_phrases",
    "encode_sample",
    "iter_scenes",
    "make_corpus",
    "make_scene",
    "min_visible_area",
    "noisy_caption",
    "sample_key",
    "tar_bytes",
]
