"""A small Python client of the query service (standard library only: urllib).

    client = RefbankClient("http://127.0.0.1:8000", token=None)
    answer = client.segment("photo.jpg", mode="vocabulary", classes=["cat", "grass"], return_=["json", "label_map"])
    answer["label_map"]          # (H, W) uint8/uint16 array, decoded from the PNG the server sent
    client.search(text="cat", k=5)["results"]
    client.bank()["version"]

Images are bytes (an encoded file, sent as is), a path, or an (H, W, 3) uint8 array (sent as PNG). A 4xx / 5xx
answer raises RefbankError with the server's {"error", "detail"}.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
import uuid
from typing import Any, Sequence

import numpy as np
from PIL import Image

ImageInput = bytes | str | os.PathLike | np.ndarray


class RefbankError(Exception):
    """An error answer: HTTP status, the server's error code and its message."""

    def __init__(self, status: int, error: str, detail: Any, body: dict | None = None) -> None:
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status, self.error, self.detail, self.body = status, error, detail, body or {}


class RefbankClient:
    """Client of one refbank service. timeout: seconds per request."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 120.0) -> None:
        self.base_url, self.token, self.timeout = base_url.rstrip("/"), token, timeout

    # ------------------------------------------------------------------------------------- endpoints

    def segment(self, image: ImageInput, mode: str = "vocabulary", classes: Sequence[str] | None = None,
                references: Sequence[dict[str, Any]] | None = None, region: str = "superpixel",
                background_threshold: float | None = None, return_: str | Sequence[str] = "json",
                **options: Any) -> dict[str, Any] | bytes:
        """Segment `image`. references: dicts with "image" (ImageInput; omitted = the target image), "label",
        and one of "box" (x0, y0, x1, y1), "scribble" [(x, y), ...] or "mask" ((H, W) bool array or PNG bytes).
        More options (k, temperature, fpr, threshold, labels_per_class, ...) pass through as keywords.

        Returns the JSON answer; when it carries PNGs, "label_map" ((H, W) array) and "overlay" ((H, W, 3)
        uint8) are added, decoded. return_="label_map" or "overlay" alone returns that PNG's bytes."""
        body: dict[str, Any] = {"mode": mode, "region": region, "return": return_, **options}
        if classes is not None:
            body["classes"] = list(classes)
        if background_threshold is not None:
            body["background_threshold"] = background_threshold
        files = {"image": _encode_image(image)}
        if references:
            body["references"] = []
            for i, ref in enumerate(references):
                entry, more = _reference(i, ref)
                body["references"].append(entry)
                files.update(more)
        answer = self._request("POST", "/v1/segment", *_multipart(files, body))
        if isinstance(answer, bytes):
            return answer
        for key, name in (("label_map_png", "label_map"), ("overlay_png", "overlay")):
            if answer.get(key):
                answer[name] = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer[key]))))
        return answer

    def search(self, image: ImageInput | None = None, text: str | None = None,
               vector: Sequence[float] | np.ndarray | None = None, box: Sequence[float] | None = None, k: int = 10,
               nprobe: int | None = None) -> dict[str, Any]:
        """Top-k bank segments for one query: an image (whole, or `box` XYXY pixels), a text or a (C,) vector."""
        options: dict[str, Any] = {"k": k}
        if nprobe is not None:
            options["nprobe"] = nprobe
        if box is not None:
            options["box"] = [float(v) for v in box]
        if text is not None:
            options["text"] = text
        if vector is not None:
            options["vector"] = [float(v) for v in np.asarray(vector, dtype=np.float64).ravel()]
        if image is None:
            return self._request("POST", "/v1/search", json.dumps(options).encode(), "application/json")
        return self._request("POST", "/v1/search", *_multipart({"image": _encode_image(image)}, options))

    def bank(self) -> dict[str, Any]:
        """The bank being served: version, encoder spec (untrained flag), totals, index, cache statistics."""
        return self._request("GET", "/v1/bank")

    def health(self) -> dict[str, Any]:
        """GET /healthz: {"status": "ok"} while the process is up."""
        return self._request("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """GET /readyz: the version served once loaded; RefbankError 503 before."""
        return self._request("GET", "/readyz")

    def reload(self, version: str | None = None) -> dict[str, Any]:
        """Switch the server to `version` (None = the bank's CURRENT): {"previous", "version", "seconds"}."""
        return self._request("POST", "/admin/reload", json.dumps({"version": version}).encode(), "application/json")

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        return self._request("GET", "/metrics").decode()

    # ------------------------------------------------------------------------------------- transport

    def _request(self, method: str, path: str, data: bytes | None = None,
                 content_type: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload, kind = response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": exc.reason, "detail": raw.decode(errors="replace")}
            raise RefbankError(exc.code, body.get("error", str(exc.reason)), body.get("detail"), body) from None
        return json.loads(payload) if kind.startswith("application/json") else payload


def _reference(i: int, ref: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(the reference's options entry, its files): image and mask go as files ref<i> / mask<i>."""
    entry = {k: (list(v) if k == "box" else v) for k, v in ref.items() if k not in ("image", "mask") and v is not None}
    files = {}
    if ref.get("image") is not None:
        entry["image"] = f"ref{i}"
        files[f"ref{i}"] = _encode_image(ref["image"])
    mask = ref.get("mask")
    if mask is not None:  # PNG bytes, or an (H, W) array sent as a 0 / 255 PNG
        entry["mask"] = f"mask{i}"
        files[f"mask{i}"] = mask if isinstance(mask, bytes) else _png(np.asarray(mask, bool) * np.uint8(255))
    return entry, files


def _encode_image(image: ImageInput) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, np.ndarray):
        return _png(image)
    with open(image, "rb") as f:
        return f.read()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart(files: dict[str, bytes], options: dict[str, Any]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request: the files, then `options` as a JSON field."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, data in files.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                      "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n'
                  f"Content-Type: application/json\r\n\r\n{json.dumps(options)}\r\n".encode())
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
