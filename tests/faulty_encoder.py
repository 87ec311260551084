"""A build stand-in for tests (PipelineConfig(stand_in="tests.faulty_encoder")): tests.paced_encoder's fast encoder
(so waiting chunks of several shards travel in one call) that raises on every call carrying an image of shard
`BAD_SHARD`. Each call's shards and outcome are appended to `LOG` (one line of JSON), so a test can check that the
fault did hit calls shared with other shards."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bank_builder.workers import DecodedBatch, EncodedBatch
from tests.paced_encoder import EncoderWorker as FastWorker

BAD_SHARD = "train-000001"
LOG = Path(tempfile.gettempdir()) / "refbank-tests-faulty-encoder.jsonl"


class EncoderWorker(FastWorker):
    """The paced encoder; RuntimeError for any call that holds an image of BAD_SHARD."""

    def encode(self, *chunks: list[DecodedBatch]) -> tuple[dict[str, Any], list[list[EncodedBatch]]]:
        """The paced call, or RuntimeError when a chunk holds an image of BAD_SHARD; logged either way."""
        shards = sorted({key.rsplit("-", 1)[0] for chunk in chunks for batch in chunk for key in batch.rows.image_key})
        failed = BAD_SHARD in shards
        with LOG.open("a") as log:
            log.write(json.dumps({"chunks": len(chunks), "shards": shards, "failed": failed}) + "\n")
        if failed:
            raise RuntimeError(f"injected encoder fault for {BAD_SHARD}")
        return super().encode(*chunks)
