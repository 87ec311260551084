"""ReME-style curation of a bank's references: group-based filtering of labelled segments by their visual
agreement with their label's group, near-duplicate removal, a quality score per segment, unpaired segments
dropped. Pairing of unlabelled segments with caption phrases happens in the build (bank_builder.pairing).

Public API:
  curate_bank(bank, config=CurationConfig(), storage_options=None) -> CurationReport

Modules: config (CurationConfig), groups (per-label centroids and similarity histograms, a Ray task per part),
decide (per-part decisions object and counts), run (the driver: passes, report, publish). The decisions'
layout is bank_builder.format.curation; the index reads it to take kept segments only.
"""

from bank_builder.curate.config import CurationConfig
from bank_builder.curate.run import CurationReport, curate_bank

__all__ = ["CurationConfig", "CurationReport", "curate_bank"]
