"""A build stand-in for tests (PipelineConfig(stand_in="tests.paced_encoder")): the real encoder actor, reporting
a set compute time per image instead of the measured one, so call sizing sees a fast encoder whatever this
machine does. Its first call also waits a moment, so the decoded chunks queue up behind it. Decode is the real
one (this module has no decode_shard)."""

from __future__ import annotations

import time
from typing import Any

from bank_builder.encoder_pool import EncoderWorker as RealWorker
from bank_builder.workers import DecodedBatch, EncodedBatch


class EncoderWorker(RealWorker):
    """The real encoder; its stats say `SECONDS_PER_IMAGE` a image."""

    SECONDS_PER_IMAGE = 1e-6
    FIRST_CALL_WAIT_S = 2.0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls = 0

    def encode(self, *chunks: list[DecodedBatch]) -> tuple[dict[str, Any], list[list[EncodedBatch]]]:
        """The real call, its stats' seconds replaced by the set pace."""
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.FIRST_CALL_WAIT_S)
        stats, encoded = super().encode(*chunks)
        stats["seconds"] = self.SECONDS_PER_IMAGE * sum(s["images"] for s in stats["chunks"])
        return stats, encoded
