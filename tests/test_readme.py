"""The README's corpus example, run as written: its shard reads as one sample with two labelled segments."""

from __future__ import annotations

import re
from pathlib import Path

from bank_builder.config import IngestConfig, SegmentConfig
from bank_builder.ingest import iter_samples
from bank_builder.records import Sample
from bank_builder.segments import make_segments

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_corpus_example_gives_labelled_segments(tmp_path, monkeypatch):
    section = README.read_text(encoding="utf-8").split("## Corpus format", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (corpus example)", "exec"), {})
    ingest = IngestConfig(mask_kind="instance")
    [sample] = list(iter_samples(str(tmp_path / "corpus" / "train-000000.tar"), ingest))
    assert isinstance(sample, Sample) and sample.image.shape == (64, 64, 3)
    segments = make_segments(sample, SegmentConfig())
    assert sorted((s.label, s.area) for s in segments) == [("grass", 64 * 32), ("sky", 64 * 32)]
