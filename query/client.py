"""A small Python client of the query service (urllib for HTTP; answers decoded with numpy, PIL and pycocotools).

    client = RefbankClient("http://127.0.0.1:8000", token=None)
    answer = client.segment("photo.jpg", mode="vocabulary", classes=["cat", "grass"], return_=["json", "overlay"])
    answer["label_map"]          # (H, W) uint16 numpy array: 0 = background, i = answer["result"]["classes"][i - 1]
    answer["region_map"]         # (H, W) int32 numpy array: region i of answer["result"]["regions"], -1 = none
    answer["overlay"]            # PIL RGB image (asked for with "overlay")
    answer["unknown_classes"]    # requested names that are no bank label
    client.labels()["labels"]    # the bank's labels, counts and colours
    client.search(text="cat", k=5)["results"]

Images are bytes (an encoded file, sent as is), a path, a PIL image or an (H, W, 3) uint8 array (sent as PNG). A
4xx / 5xx answer raises RefbankError with the server's {"error", "detail"}; a server that cannot be reached (not
running, refused, timed out, connection dropped) raises RefbankConnectionError, a RefbankError with status None.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

ImageInput = bytes | str | os.PathLike | np.ndarray | Image.Image


class RefbankError(Exception):
    """What the client raises: an error answer (HTTP status, the server's error code and its message), or, as
    RefbankConnectionError, no answer at all."""

    def __init__(self, status: int | None, error: str, detail: Any, body: dict | None = None) -> None:
        super().__init__(f"HTTP {status} {error}: {detail}" if status is not None else f"{error}: {detail}")
        self.status, self.error, self.detail, self.body = status, error, detail, body or {}


class RefbankConnectionError(RefbankError, ConnectionError):
    """No answer at all: the server is not running, refused the connection, timed out or dropped it (status None;
    error is "connection_refused", "timeout" or "unreachable"). Also a ConnectionError, for generic handlers."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(None, error, detail)


class RefbankClient:
    """Client of one refbank service. timeout: seconds per request."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 120.0) -> None:
        self.base_url, self.token, self.timeout = base_url.rstrip("/"), token, timeout

    # ------------------------------------------------------------------------------------- endpoints

    def segment(self, image: ImageInput, mode: str = "vocabulary", classes: Sequence[str] | None = None,
                references: Sequence[dict[str, Any]] | None = None, region: str = "superpixel",
                background_threshold: float | None = None, return_: str | Sequence[str] = "json",
                **options: Any) -> dict[str, Any] | np.ndarray | Image.Image:
        """Segment `image`. references: dicts with "image" (ImageInput; omitted = the target image), "label",
        and one of "box" (x0, y0, x1, y1), "scribble" [(x, y), ...] or "mask" ((H, W) bool array or PNG bytes).
        region: a region preset, "superpixel", "grid", "hierarchy" or "refined" (labels refined per pixel).
        More options (k, temperature, fpr, threshold, labels_per_class, ...) pass through as keywords.

        Returns the JSON answer with decoded values added: "label_map" ((H, W) uint16, 0 = background, i =
        classes[i - 1]; from the label-map PNG when asked for, else from the regions), "region_map" ((H, W) int32,
        the index of the region each pixel belongs to, -1 = none; decoded from the regions' COCO RLE) and
        "overlay" (a PIL RGB image, when asked for). return_="label_map" alone returns the (H, W) uint16 array,
        return_="overlay" alone the PIL image."""
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
            return _overlay(answer) if return_ == "overlay" else _label_map(answer)
        if answer.get("result") is not None:
            answer["region_map"] = region_map(answer["result"])
            classes = answer["result"]["classes"]
            lookup = np.array([classes.index(r["label"]) + 1 if r["label"] is not None else 0
                               for r in answer["result"]["regions"]] + [0], dtype=np.uint16)
            answer["label_map"] = lookup[answer["region_map"]]  # index -1 = the trailing 0: no region
        if answer.get("label_map_png"):
            answer["label_map"] = _label_map(base64.b64decode(answer["label_map_png"]))
        if answer.get("overlay_png"):
            answer["overlay"] = _overlay(base64.b64decode(answer["overlay_png"]))
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

    def labels(self, prefix: str = "", limit: int = 1000) -> dict[str, Any]:
        """The bank's labels, most frequent first: {"version", "total", "labels": [{"label", "count", "color"}]}."""
        query = urllib.parse.urlencode({"prefix": prefix, "limit": limit})
        return self._request("GET", f"/v1/labels?{query}")

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
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _transport_error(self.base_url, self.timeout, exc) from None
        return json.loads(payload) if kind.startswith("application/json") else payload


def _transport_error(url: str, timeout: float, exc: BaseException) -> RefbankConnectionError:
    """The RefbankConnectionError for a request to `url` that got no HTTP answer."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return RefbankConnectionError("timeout", f"{url} did not answer within {timeout:g} s; the server may be "
                                                 "busy or loading: retry, or raise RefbankClient(timeout=...)")
    if isinstance(reason, ConnectionRefusedError):
        return RefbankConnectionError("connection_refused", f"nothing listens at {url}; start the service "
                                                            "(`refbank serve BANK`) or fix the URL")
    return RefbankConnectionError("unreachable", f"no answer from {url} ({type(reason).__name__}: {reason}); check "
                                                 "that the service is running and the URL is right")


def region_map(result: dict[str, Any]) -> np.ndarray:
    """(H, W) int32 of a segment answer's "result": the index of the region covering each pixel (the regions are
    disjoint), -1 where none does; decoded from the regions' COCO RLE."""
    height, width = result["size"]
    out = np.full((height, width), -1, dtype=np.int32)
    with warnings.catch_warnings():  # pycocotools 2.0.11's decode trips numpy 2's copy-keyword deprecation
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        for i, region in enumerate(result["regions"]):
            rle = {"size": region["rle"]["size"], "counts": region["rle"]["counts"].encode("ascii")}
            out[mask_utils.decode(rle).astype(bool)] = i
    return out


def _label_map(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.uint16)


def _overlay(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


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
    if isinstance(image, (np.ndarray, Image.Image)):
        return _png(np.asarray(image))
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
