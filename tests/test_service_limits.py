"""Bounded requests and validated input, tried on real uvicorn servers as a hostile client would: big and thin images,
a heavy segmentation beside light searches, a full worker pool, non-finite and deeply nested JSON, and a bounded
schemathesis run over the OpenAPI description that must meet no 5xx."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pycocotools import mask as mask_utils

from query.client import RefbankClient
from query.serving import ServiceConfig
from tests.service_fixtures import MAX_UPLOAD, NAMES, TOKEN, multipart, png, png_header, raw, serving

AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEAVY_SIDE = 4000  # a 4000 x 4000 request: about 114 KB as PNG (a held-out image scaled up), 16 M pixels to answer
SCHEMATHESIS_EXAMPLES = 50  # per API operation, positive and negative cases together


@pytest.fixture(scope="module")
def tight(world):
    """A server on the session bank with one image worker and no queue: a second image request is refused."""
    config = ServiceConfig(bank=world["bank"], token=TOKEN, max_upload_bytes=MAX_UPLOAD, max_json_bytes=64 << 10,
                           max_k=64, image_workers=1, image_queue=0)
    with serving(config) as running:
        yield running


def big(world, side: int = HEAVY_SIDE) -> bytes:
    """A held-out image scaled up (nearest) to side x side, as PNG."""
    return png(np.asarray(Image.fromarray(world["heldout"][0].image).resize((side, side), Image.NEAREST)))


def gauge(client: RefbankClient, name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics."""
    for family in text_string_to_metric_families(client.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"/metrics has no {name} {labels}")


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


class Background(threading.Thread):
    """One request in a thread, timed; `result` holds its answer (or the exception it raised)."""

    def __init__(self, call) -> None:
        super().__init__(daemon=True)
        self.call, self.result, self.seconds, self.ended = call, None, None, None

    def run(self) -> None:
        start = time.perf_counter()
        try:
            self.result = self.call()
        except Exception as exc:  # the assertions look at it
            self.result = exc
        self.ended = time.perf_counter()
        self.seconds = self.ended - start


# ----------------------------------------------------------------------------------------- working resolution


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_answers_keep_the_request_size_from_a_working_size_map(client, world):
    """A 1000 x 600 request is segmented at the working size and its maps are upsampled: the label map is a
    nearest upsampling of a (h, w) map, and the region RLEs tile the request exactly, each inside one label."""
    height, width = 600, 1000
    image = np.asarray(Image.fromarray(world["heldout"][3].image).resize((width, height), Image.NEAREST))
    info = client.bank()
    side = max(info["limits"]["working_side"], info["encoder"]["image_size"])
    assert side < width  # the request is reduced
    answer = client.segment(image, classes=NAMES, return_=["json", "label_map", "overlay"])
    result, label_map = answer["result"], answer["label_map"]
    assert label_map.shape == (height, width) and result["size"] == [height, width]
    assert answer["overlay"].size == (width, height)
    assert sum(e["pixels"] for e in answer["legend"]) == height * width
    h, w = round(height * side / width), side
    rows, cols = np.arange(height) * h // height, np.arange(width) * w // width
    first_row, first_col = np.searchsorted(rows, np.arange(h)), np.searchsorted(cols, np.arange(w))
    np.testing.assert_array_equal(label_map, label_map[first_row[rows]][:, first_col[cols]])
    assert len(np.unique(label_map)) >= 2
    cover = np.zeros((height, width), np.int64)
    for region in result["regions"]:
        mask = mask_utils.decode({"size": region["rle"]["size"], "counts": region["rle"]["counts"].encode()}) > 0
        cover += mask
        value = result["classes"].index(region["label"]) + 1 if region["label"] else 0
        assert mask.sum() == region["area"] > 0 and (label_map[mask] == value).all()
    assert (cover == 1).all()


def test_huge_and_thin_images_are_refused_from_the_header(server, world):
    """Checked before any pixel is decoded: 1 x 40,000,000 (68 bytes of PNG) and 5000 x 5000 are over max_pixels; a
    1 x 10,000,000 or 20,000 x 500 strip is within it but far past max_aspect (20)."""
    cases = [((1, 40_000_000), 413, "image_too_large"), ((5000, 5000), 413, "image_too_large"),
             ((1, 10_000_000), 422, "invalid_image_shape"), ((20_000, 500), 422, "invalid_image_shape")]
    for (width, height), status, code in cases:
        for path, options in (("/v1/segment", {"classes": ["cat"]}), ("/v1/search", {"k": 3})):
            got, _, body = raw(server.url, path, *multipart({"image": png_header(width, height)},
                                                             {"options": json.dumps(options)}))
            assert (got, json.loads(body)["error"]) == (status, code), (width, height, path)
    reference = {"mode": "reference", "references": [{"image": "ref", "box": [0, 0, 1, 1]}]}
    files = {"image": png(world["heldout"][0].image), "ref": png_header(1, 10_000_000)}
    got, _, body = raw(server.url, "/v1/segment", *multipart(files, {"options": json.dumps(reference)}))
    assert got == 422 and "reference 0 image" in json.loads(body)["detail"]


# ----------------------------------------------------------------------------------------- worker pools


def test_a_heavy_segmentation_does_not_stall_light_searches(server, client, world):
    """While a 4000 x 4000 segmentation runs (label map and overlay at full size), text searches answer at their
    own pace: each takes a small fraction of the heavy request's time and all finish before it does. (Times are
    ratios inside one run: the heavy request's own wall time is the yardstick.)"""
    options = json.dumps({"classes": NAMES, "return": ["json", "label_map", "overlay"]})
    heavy = Background(lambda: raw(server.url, "/v1/segment", *multipart({"image": big(world)}, {"options": options})))
    client.search(text="warm", k=5)  # lists resident and the text path warm, as on a server that has been serving
    heavy.start()
    wait_until(lambda: gauge(client, "refbank_pool_running", pool="image") == 1 or not heavy.is_alive())
    light, ended = [], []
    for text in ("cat", "grass", "moon", "cat", "brick"):
        start = time.perf_counter()
        assert len(client.search(text=text, k=5)["results"]) == 5
        ended.append(time.perf_counter())
        light.append(ended[-1] - start)
    heavy.join(timeout=300)
    status, _, body = heavy.result
    assert status == 200 and json.loads(body)["result"]["size"] == [HEAVY_SIDE, HEAVY_SIDE]
    print(f"heavy {heavy.seconds:.2f} s; light {[round(s, 3) for s in light]} s")
    assert max(ended) < heavy.ended, "the light requests did not overlap the heavy one"
    assert max(light) < heavy.seconds / 3, (light, heavy.seconds)


def test_a_full_pool_answers_429_with_retry_after_and_keeps_serving(tight, world):
    server, client = tight
    before = client.bank()["pools"]["image"]
    options = json.dumps({"classes": NAMES, "return": ["json", "overlay"]})
    heavy = Background(lambda: raw(server.url, "/v1/segment", *multipart({"image": big(world, 2000)},
                                                                          {"options": options})))
    heavy.start()
    wait_until(lambda: gauge(client, "refbank_pool_running", pool="image") == 1 or not heavy.is_alive())
    small = png(world["heldout"][1].image)
    refused = [raw(server.url, "/v1/segment", *multipart({"image": small}, {"options": '{"classes": ["cat"]}'})),
               raw(server.url, "/v1/search", *multipart({"image": small}, {"options": '{"k": 3}'}))]
    still_running = heavy.is_alive()
    text = client.search(text="cat", k=3)  # another pool: answered meanwhile
    heavy.join(timeout=300)
    assert still_running and heavy.result[0] == 200, heavy.result
    for status, headers, body in refused:
        answer = json.loads(body)
        assert (status, answer["error"]) == (429, "overloaded") and "retry in" in answer["detail"]
        assert int(headers["retry-after"]) >= 1
    assert len(text["results"]) == 3
    assert client.segment(small, classes=["cat"])["result"]["size"] == [128, 128]  # the place is free again
    assert gauge(client, "refbank_pool_refused_total", pool="image") >= 2
    after = client.bank()["pools"]["image"]
    assert (after["refused"] - before["refused"], after["completed"] - before["completed"]) == (2, 2)
    assert (after["running"], after["queued"], after["workers"], after["queue"]) == (0, 0, 1, 0)


# ----------------------------------------------------------------------------------------- hostile input


def test_non_finite_numbers_deep_json_and_wrong_types_get_4xx(server, client, tight, world):
    image = png(world["heldout"][0].image)
    deep = "[" * 100_000
    segment_cases = [  # (options text, status, word of the detail)
        ('{"mode": "reference", "references": [{"box": [0, 0, 1e400, 5]}]}', 422, "finite"),
        ('{"mode": "reference", "references": [{"scribble": [[1, 1e400]]}]}', 422, "finite"),
        ('{"mode": "reference", "references": [{"box": [0, 0, 1' + "0" * 30 + ', 5]}]}', 422, "between"),
        ('{"classes": ["cat"], "background_threshold": NaN}', 422, "finite"),
        ('{"mode": "open_set", "temperature": Infinity}', 422, "finite"),
        ('{"mode": "open_set", "temperature": -Infinity}', 422, "finite"),
        ('{"classes": ["cat"], "alpha": NaN}', 422, "finite"),
        (deep, 400, "nested"),
        ('{"classes": ' + deep, 400, "nested"),
        ('{"classes": [' + "[" * 40 + "]" * 40 + "]}", 400, "nested"),
        ('{"mode": "open_set", "k": "5"}', 422, "k"),
        ('{"mode": "open_set", "k": true}', 422, "k"),
        ('{"mode": "open_set", "unlabelled": "drop"}', 422, "unlabelled"),
        ('{"mode": "open_set", "k": 1' + "0" * 5000 + "}", 400, "JSON"),
        ('{"classes": {"a": 1}}', 422, "classes"),
        ('{"mode": "reference", "references": "x"}', 422, "references"),
        ("null", 422, "object"),
        ("5", 422, "object"),
    ]
    for options, status, word in segment_cases:
        got, _, body = raw(server.url, "/v1/segment", *multipart({"image": image}, {"options": options}))
        answer = json.loads(body)
        assert (got, answer["error"]) == (status, "invalid_options"), (options[:60], answer)
        assert word in answer["detail"], (word, answer["detail"])
    search_cases = [
        ('{"vector": [0.5, 1e400]}', 422, "finite"),
        ('{"text": "cat", "k": 1e400}', 422, "k"),
        ('{"text": "cat", "k": 1' + "0" * 30 + "}", 422, "max_k"),
        ('{"text": NaN}', 422, "text"),
        (deep, 400, "nested"),
        ('{"text": "cat", "nprobe": ' + deep, 400, "nested"),
        ('{"text": "cat", "k": 3, "x": "' + "y" * (MAX_UPLOAD + 1000) + '"}', 413, "at most"),
    ]
    for text, status, word in search_cases:
        got, _, body = raw(server.url, "/v1/search", text.encode(), "application/json")
        answer = json.loads(body)
        assert got == status and word in answer["detail"], (text[:60], got, answer)
    got, _, body = raw(server.url, "/v1/search", *multipart({"image": image}, {"options": '{"box": [0, 0, 1e400, 9]}'}))
    assert got == 422 and "finite" in json.loads(body)["detail"]
    got, _, body = raw(server.url, "/admin/reload", deep.encode(), "application/json")
    assert got == 400 and "nested" in json.loads(body)["detail"]
    assert client.search(text="cat", k=3, nprobe=10**12)["k"] == 3  # a huge nprobe is capped, not an error
    # Over max_json_bytes (64 KiB there) but under the upload limit: read to its end, dropped, answered 413.
    padded = json.dumps({"text": "cat", "k": 3, "vector": [0.0] * 20_000}).encode()
    for path in ("/v1/search", "/admin/reload"):
        got, _, body = raw(tight[0].url, path, padded, "application/json")
        assert got == 413 and "max_json_bytes" in json.loads(body)["detail"], path
    assert client.ready()["status"] == "ready"


def test_schemathesis_finds_no_server_error(tight):
    """Every operation of the OpenAPI description, SCHEMATHESIS_EXAMPLES generated cases each (valid and invalid),
    sent to a real server: no answer may be a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    server, _ = tight
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/segment", "/v1/search", "/v1/bank", "/v1/labels", "/admin/reload"}
    for operation in operations:
        cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

        @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(cases)
        def check(case) -> None:
            response = case.call(base_url=server.url, headers=AUTH, timeout=120)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error])

        check()
    print(f"schemathesis: {sum(statuses.values())} cases over {len(operations)} operations, statuses "
          f"{dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= len(operations) * 5 and not any(s >= 500 for s in statuses)
