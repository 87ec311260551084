"""tests.paced_encoder's encoder reporting a slow pace (10 s an image): call sizing then sends one chunk a call."""

from __future__ import annotations

from tests.paced_encoder import EncoderWorker as FastWorker


class EncoderWorker(FastWorker):
    """The real encoder; its stats say 10 s a image."""

    SECONDS_PER_IMAGE = 10.0
