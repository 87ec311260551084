"""tests.paced_encoder's fast encoder whose first call carrying several chunks fails (a task error, not a dead
actor): the driver must then send each of those chunks again alone, losing and repeating none."""

from __future__ import annotations

from typing import Any

from bank_builder.workers import DecodedBatch, EncodedBatch
from tests.paced_encoder import EncoderWorker as FastWorker


class EncoderWorker(FastWorker):
    """The fast paced encoder; raises once, on its first call of more than one chunk."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.failed_once = False

    def encode(self, *chunks: list[DecodedBatch]) -> tuple[dict[str, Any], list[list[EncodedBatch]]]:
        """The paced call, or RuntimeError the first time it carries several chunks."""
        if len(chunks) > 1 and not self.failed_once:
            self.failed_once = True
            raise RuntimeError(f"injected failure of a call of {len(chunks)} chunks")
        return super().encode(*chunks)
