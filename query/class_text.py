"""Class-name text embeddings for vocabulary mode, computed once per name and shared by every Segmenter of one
encoder (the service's region presets and bank versions, eval's banks and presets), so a name costs one text
forward however many Segmenters ask for it."""

from __future__ import annotations

import threading

import numpy as np

from bank_builder.embed import TEXT_TEMPLATE
from bank_builder.encoders import Encoder

CACHE_SIZE = 4096  # class names kept; the oldest goes first


class ClassText:
    """TEXT_TEMPLATE.format(name) embeddings of one encoder, cached; safe to share between request threads."""

    def __init__(self, encoder: Encoder, size: int = CACHE_SIZE) -> None:
        self.encoder, self.size = encoder, size
        self._vectors: dict[str, np.ndarray] = {}  # class name → (D,) float32
        self._lock = threading.Lock()

    def __call__(self, names: list[str]) -> np.ndarray:
        """(K, D) float32 L2-normalised embeddings, one encoder call per new name (as the builder embeds labels,
        so a class's vector never depends on the other names)."""
        vectors = []
        for name in names:
            with self._lock:  # read and trimmed under one lock; two threads may embed a new name twice, harmlessly
                vector = self._vectors.get(name)
            if vector is None:
                vector = self.encoder.encode_text([TEXT_TEMPLATE.format(name)])[0]
                with self._lock:
                    if len(self._vectors) >= self.size:
                        self._vectors.pop(next(iter(self._vectors)))
                    self._vectors[name] = vector
            vectors.append(vector)
        return np.stack(vectors).astype(np.float32)
