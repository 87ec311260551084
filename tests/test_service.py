"""The query service over real HTTP: a real uvicorn server on 127.0.0.1 (a free port, a background thread) serving a
real bank + sharded index built from a generated corpus, queried with query.client and raw urllib / http.client."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pycocotools import mask as mask_utils

from bank_builder.encoders import load_encoder
from bank_builder.index import build_index
from jobs import evaluate
from query.bank import open_bank
from query.client import RefbankClient, RefbankConnectionError, RefbankError
from query.corruption import PartReader
from query.regions import region_preset
from query.search import MAX_K, BankSearcher
from query.segment import Segmenter
from query.service import ServiceConfig, create_app, serve
from query.serving import encoder_config, label_table
from tests.build_helpers import read_bank
from tests.service_fixtures import (
    INDEX,
    MAX_UPLOAD,
    NAMES,
    TOKEN,
    Server,
    multipart,
    png,
    png_header,
    raw,
    wait_ready,
)


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- the API


def test_probes_and_bank_info(server, client, world):
    assert client.health() == {"status": "ok"}
    ready = client.ready()
    assert ready["status"] == "ready" and ready["untrained"] is True and ready["encoder"] == "tiny-clip"
    info = client.bank()
    assert info["version"] == info["current"] and info["versions"][:2] == ["v000001", "v000002"]
    assert info["untrained"] is True and info["encoder"]["untrained"] is True and info["encoder"]["seed"] == 0
    assert info["encoder"]["name"] == "tiny-clip" and info["labels"] == len(NAMES)
    assert info["totals"]["segments"] == read_bank(world["bank"]).num_rows > 0
    assert info["index"]["list_objects"] >= 2 and info["index"]["nprobe"] >= 1
    assert info["index"]["factory"].startswith("IVF")
    assert info["cache"]["index_bytes"] <= info["cache"]["memory_bytes"]  # the default budget holds this index
    assert {"hits", "misses", "bytes_fetched", "resident_bytes"} <= set(info["cache"])
    assert info["limits"]["max_k"] == 64 and info["limits"]["max_upload_bytes"] == MAX_UPLOAD
    status, headers, body = raw(server.url, "/openapi.json", token=None)
    spec = json.loads(body)
    assert status == 200 and {"/v1/segment", "/v1/search", "/v1/bank", "/admin/reload"} <= set(spec["paths"])
    assert raw(server.url, "/docs", token=None)[0] == 200


def test_segment_vocabulary_over_http(client, world):
    for sample in world["heldout"][:3]:
        height, width = sample.image.shape[:2]
        answer = client.segment(jpeg(sample.image), classes=NAMES, return_=["json", "label_map", "overlay"])
        result, label_map = answer["result"], answer["label_map"]
        assert label_map.shape == (height, width) and result["size"] == [height, width]
        assert answer["overlay"].size == (width, height) and answer["overlay"].mode == "RGB"  # a PIL image
        assert result["classes"] == NAMES and result["untrained"] is True and result["exists"] is None
        assert 1 <= label_map.min() and label_map.max() <= len(NAMES)  # no threshold: every region labelled
        assert sum(e["pixels"] for e in answer["legend"]) == height * width
        assert [e["label"] for e in answer["legend"]] == [None, *NAMES]
        assert sum(r["area"] for r in result["regions"]) == height * width
    # One PNG as the body: the same label map, bit for bit (the service is deterministic).
    np.testing.assert_array_equal(client.segment(jpeg(sample.image), classes=NAMES, return_="label_map"), label_map)
    grid = client.segment(sample.image, classes=["cat", "grass"], region="grid", background_threshold=0.99,
                          return_=["label_map"])
    assert grid["label_map"].shape == (height, width) and "result" not in grid


def test_vocabulary_miou_over_http(client, world):
    """The whole path (corpus → build → index → service → HTTP) on the 16 held-out images. Measured with the
    untrained tiny encoder: mIoU 0.158 (two runs), the best constant predictor 0.033."""
    truths = [evaluate.class_map(sample, NAMES) for sample in world["heldout"]]
    maps = [client.segment(png(sample.image), classes=NAMES, return_=["label_map"])["label_map"].astype(np.int64)
            for sample in world["heldout"]]
    miou = evaluate.mean_iou(maps, truths, len(NAMES))
    constant = max(evaluate.mean_iou([np.full(t.shape, c) for t in truths], truths, len(NAMES))
                   for c in range(1, len(NAMES) + 1))
    print(f"vocabulary mIoU over HTTP {miou:.3f}, best constant {constant:.3f}")
    assert miou >= 0.12 and miou >= 4 * constant


def test_a_budget_smaller_than_the_index_evicts_lists_and_answers_the_same(client, world):
    """A second server whose list budget holds part of the index: the same answers while lists come and go, the
    budget kept, and a search whose lists cannot fit at once refused with the fix (503), not answered wrongly."""
    budget = client.bank()["cache"]["index_bytes"] * 2 // 3
    paged = Server(create_app(ServiceConfig(bank=world["bank"], memory_bytes=budget, max_k=64)))
    try:
        small = RefbankClient(paged.url, timeout=60)
        wait_ready(small)
        table = read_bank(world["bank"])
        for row in (3, 40, 77, 120, 3, 90):
            vector = np.asarray(table["visual_embedding"][row].as_py(), np.float32)
            vector /= np.linalg.norm(vector)
            # nprobe 1: any one list fits the budget, all of them do not
            got = small.search(vector=vector, k=20, nprobe=1)["results"]
            want = client.search(vector=vector, k=20, nprobe=1)["results"]
            assert [h["segment_id"] for h in got] == [h["segment_id"] for h in want]
            np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], rtol=1e-6, atol=1e-6)
        info = small.bank()
        assert 0 < info["cache"]["resident_bytes"] + info["cache"]["leaked_bytes"] <= budget
        assert info["cache"]["evictions"] > 0
        with pytest.raises(RefbankError) as err:  # the tuned nprobe probes every list: more than the budget
            small.segment(png(world["heldout"][0].image), mode="open_set", k=5)
        assert (err.value.status, err.value.error) == (503, "budget_too_small")
        assert "raise the memory budget" in err.value.detail
    finally:
        paged.stop()


def test_segment_other_modes(client, world):
    sample = world["heldout"][2]
    open_set = client.segment(sample.image, mode="open_set", k=5)["result"]
    assert set(open_set["classes"]) <= set(NAMES) and open_set["mode"] == "open_set"
    voted = client.segment(sample.image, mode="open_set", k=5, unlabelled="vote")["result"]
    assert voted["classes"] == open_set["classes"]  # this bank labels every segment: the rules agree
    foreground = client.segment(sample.image, mode="foreground", threshold=0.5)["result"]
    assert foreground["classes"] == ["foreground"] and all(0 <= r["score"] <= 1 for r in foreground["regions"])


def test_region_presets_over_http_match_the_segmenter(client, world):
    """`region` takes every region preset; the refined one answers as a Segmenter with that preset in process."""
    bank = open_bank(world["bank"])
    segmenter = Segmenter(load_encoder(encoder_config(bank.manifest.encoder)), BankSearcher(bank), PartReader(bank),
                          label_table(bank), region_preset("refined"))
    image = world["heldout"][1].image
    for mode, options in (("vocabulary", {"classes": NAMES}), ("foreground", {})):
        answer = client.segment(png(image), mode=mode, region="refined", return_=["json", "label_map"], **options)
        local = getattr(segmenter, mode)(image, *options.values())
        np.testing.assert_array_equal(answer["label_map"], local.label_map)
        assert len(answer["result"]["regions"]) == len(local.regions)
    assert client.segment(png(image), classes=NAMES, region="hierarchy", return_="label_map").shape == image.shape[:2]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_reference_mode_exists_true_and_false(client, world):
    """Reference: the 'brick' ground-truth mask of held-out image 0. Measured on this seeded bank: found in
    held-out images 0, 4 and 7 (which hold brick), not found in 1, 2, 3, 5, 6 (which do not)."""
    heldout = world["heldout"]
    source = heldout[0]
    [brick] = [s["id"] for s in source.meta["segments"] if s["label"] == "brick"]
    reference = {"image": source.image, "mask": source.mask == brick, "label": "brick"}
    for target, expected in ((4, True), (1, False), (0, True)):
        assert any(s["label"] == "brick" for s in heldout[target].meta["segments"]) == expected
        result = client.segment(heldout[target].image, mode="reference", references=[reference])["result"]
        assert result["exists"] is expected and result["details"]["exists_by_class"] == {"brick": expected}
        assert result["classes"] == ["brick"]
    # A region of the target itself as the reference (mask decoded from the answer's RLE): found, labelled there.
    target = heldout[3].image
    regions = client.segment(target, classes=["cat"])["result"]["regions"]
    big = max(range(len(regions)), key=lambda i: regions[i]["area"])
    own = mask_utils.decode({"size": regions[big]["rle"]["size"], "counts": regions[big]["rle"]["counts"].encode()})
    # recruit 0: the prototype is that region's own embedding (the untrained encoder's label prototypes would pull
    # it toward another class)
    result = client.segment(target, mode="reference", references=[{"mask": own.astype(bool), "label": "it"}],
                            recruit=0.0)
    assert result["result"]["exists"] is True and result["result"]["regions"][big]["label"] == "it"
    assert result["result"]["details"]["decision"] == "margin" and result["result"]["details"]["margin"] > 0
    # Box and scribble prompts on the target image (no extra file: "image" names the target).
    for prompt in ({"box": (10, 10, 60, 50)}, {"scribble": [(5, 5), (60, 40), (100, 20)]}):
        result = client.segment(target, mode="reference", references=[{**prompt, "label": "x"}])["result"]
        assert isinstance(result["exists"], bool) and result["classes"] == ["x"]


def test_search_by_text_image_and_vector(client, world):
    text = client.search(text="cat", k=5)
    assert text["query"]["labels"][0][0] == "cat" and len(text["results"]) == 5
    for hit in text["results"]:
        assert {"image_key", "label", "bbox", "mask", "area", "part"} <= set(hit["metadata"])
    scores = [h["score"] for h in text["results"]]
    assert scores == sorted(scores, reverse=True)
    sample = world["heldout"][5]
    whole = client.search(image=png(sample.image), k=7)
    boxed = client.search(image=sample.image, box=(0, 0, 64, 64), k=7)
    assert len(whole["results"]) == len(boxed["results"]) == 7
    assert whole["query"]["kind"] == "image" and boxed["query"]["box"] == [0, 0, 64, 64]
    assert whole["results"] != boxed["results"]
    # A bank segment's own embedding finds that segment first, with cosine ≈ 1 (exact IVF-Flat + refine).
    table = read_bank(world["bank"])
    row = 17
    vector = np.asarray(table["visual_embedding"][row].as_py(), np.float32)
    hits = client.search(vector=vector / np.linalg.norm(vector), k=3)["results"]
    assert hits[0]["segment_id"] == table["segment_id"][row].as_py() and hits[0]["score"] > 0.999
    assert hits[0]["metadata"]["image_key"] == table["image_key"][row].as_py()


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server, client, world):
    image = world["heldout"][0].image
    cases = [  # (files, options, status, error code, a word of the message)
        ({"image": b"this is not an image"}, {"classes": ["cat"]}, 400, "invalid_image", "not an image"),
        ({"image": b""}, {"classes": ["cat"]}, 400, "invalid_image", "empty"),
        ({"image": jpeg(image)[:600]}, {"classes": ["cat"]}, 400, "invalid_image", "truncated"),  # in the header
        ({"image": jpeg(image)[:len(jpeg(image)) * 2 // 3]}, {"classes": ["cat"]}, 400, "invalid_image", "truncated"),
        ({"image": png_header(100_000, 100_000)}, {"classes": ["cat"]}, 413, "image_too_large", "pixels"),
        ({"image": png_header(8_000, 6_000)}, {"classes": ["cat"]}, 413, "image_too_large", "8000x6000"),
        ({"image": png(image)}, "{not json", 400, "invalid_options", "not valid JSON"),
        ({"image": png(image)}, {"classes": "cat"}, 422, "invalid_options", "classes"),
        ({"image": png(image)}, {"classes": ["cat", 7]}, 422, "invalid_options", "classes.1"),
        ({"image": png(image)}, {"classes": ["cat"], "colour": "red"}, 422, "invalid_options", "colour"),
        ({"image": png(image)}, {"mode": "telepathy"}, 422, "invalid_options", "mode"),
        ({"image": png(image)}, {"classes": ["cat"], "region": "fancy"}, 422, "invalid_options", "refined"),
        ({"image": png(image)}, {"classes": [f"c{i}" for i in range(17)]}, 422, "limit_exceeded", "16"),
        ({"image": png(image)}, {"mode": "open_set", "k": 65}, 422, "limit_exceeded", "max_k"),
        ({"image": png(image)}, {}, 422, "invalid_options", "classes"),
        ({"image": png(image)}, {"classes": ["cat", "cat"]}, 400, "bad_request", "unique"),
        ({"image": png(image)}, {"mode": "reference", "references": [{"box": [-5, 0, 900, 10]}]}, 400,
         "bad_request", "inside"),
        ({"image": png(image)}, {"mode": "reference", "references": [{"image": "ref0", "box": [0, 0, 9, 9]}]}, 422,
         "missing_file", "ref0"),
        ({"picture": png(image)}, {"classes": ["cat"]}, 422, "missing_file", "'image'"),
    ]
    for files, options, status, code, word in cases:
        text = options if isinstance(options, str) else json.dumps(options)
        got, headers, body = raw(server.url, "/v1/segment", *multipart(files, {"options": text}))
        answer = json.loads(body)
        assert (got, answer["error"]) == (status, code), (options, answer)
        assert word in answer["detail"], (word, answer)
    # Search: k above max_k, two queries at once, a vector of the wrong width or norm.
    for options, status, code in (({"text": "cat", "k": 65}, 422, "limit_exceeded"),
                                  ({"text": "cat", "vector": [1.0]}, 422, "invalid_options"),
                                  ({}, 422, "invalid_options"),
                                  ({"vector": [1.0, 0.0]}, 400, "bad_request"),
                                  ({"vector": [0.5] * 64}, 400, "bad_request")):
        with pytest.raises(RefbankError) as caught:
            client._request("POST", "/v1/search", json.dumps(options).encode(), "application/json")
        assert (caught.value.status, caught.value.error) == (status, code), options
    # Not multipart; no or wrong bearer token; unknown bank version; unknown path.
    got, _, body = raw(server.url, "/v1/segment", b'{"classes": ["cat"]}', "application/json")
    assert got == 415 and json.loads(body)["error"] == "unsupported_media_type"
    for token in (None, "wrong-token"):
        got, headers, body = raw(server.url, "/v1/bank", token=token)
        assert got == 401 and json.loads(body)["error"] == "unauthorized" and headers["www-authenticate"] == "Bearer"
    with pytest.raises(RefbankError) as caught:
        client.reload("v000099")
    assert caught.value.status == 404 and caught.value.body["available"][:2] == ["v000001", "v000002"]
    with pytest.raises(RefbankError) as caught:
        client.reload("v000001")  # published before the index existed
    assert caught.value.status == 409 and "no index" in caught.value.detail
    got, _, body = raw(server.url, "/v2/nothing", token=None)
    assert got == 404 and json.loads(body)["error"] == "not_found"
    # Bodies over the limit: declared by Content-Length, and streamed chunked with no length.
    big = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    assert len(png(big)) > MAX_UPLOAD
    with pytest.raises(RefbankError) as caught:
        client.segment(big, classes=["cat"])
    assert caught.value.status == 413 and caught.value.error == "payload_too_large"
    assert chunked_upload(server, MAX_UPLOAD + (300 << 10))[1]["error"] == "payload_too_large"
    # Still serving.
    assert client.ready()["status"] == "ready"
    assert client.segment(image, classes=["cat", "grass"])["result"]["size"] == list(image.shape[:2])


def chunked_upload(server: Server, size: int) -> tuple[int, dict]:
    """POST `size` bytes to /v1/segment with chunked transfer encoding (no Content-Length)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.putrequest("POST", "/v1/segment")
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
        connection.send(b"%x\r\n%s\r\n" % (len(head), head))
        piece = b"y" * (64 << 10)  # the file's bytes, streamed: a valid multipart body that never ends in time
        for _ in range(size // len(piece) + 1):
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_metrics_count_requests_and_cache(server, client, world):
    client.search(text="moon", k=4)
    client.segment(world["heldout"][1].image, mode="open_set")
    families = {f.name: f for f in text_string_to_metric_families(client.metrics())}
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["refbank_http_requests"].samples
                if s.name == "refbank_http_requests_total"}
    assert requests[("/v1/segment", "200")] >= 1 and requests[("/v1/search", "200")] >= 1
    latency = [s for s in families["refbank_http_request_duration_seconds"].samples
               if s.name.endswith("_count") and s.labels["endpoint"] == "/v1/segment"]
    assert latency and latency[0].value >= 1
    value = {name: families[name].samples[0].value for name in (
        "refbank_list_cache_hits", "refbank_list_cache_misses", "refbank_list_cache_fetched_bytes",
        "refbank_list_cache_resident_bytes", "refbank_list_cache_memory_budget_bytes", "refbank_ready")}
    assert value["refbank_list_cache_misses"] >= 1 and value["refbank_list_cache_hits"] >= 1
    assert value["refbank_list_cache_fetched_bytes"] > 0 and value["refbank_list_cache_resident_bytes"] > 0
    assert value["refbank_ready"] == 1
    [info] = families["refbank_bank_info"].samples
    assert info.labels["version"] == client.bank()["version"] and info.labels["untrained"] == "true"


def test_version_switch_under_load_drops_no_request(server, client, world):
    """Publish a new version (a rebuilt index), then switch back and forth while another thread keeps querying."""
    before = client.bank()["version"]
    new = build_index(world["bank"], INDEX, retrain=True).version  # an index that holds every part: retrain
    assert new > before
    image = png(world["heldout"][6].image)
    failures, versions, stop = [], [], threading.Event()

    def load() -> None:
        worker = RefbankClient(server.url, token=TOKEN, timeout=60)
        deadline = time.monotonic() + 60
        for i in range(400):  # bounded in count and time
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                answer = (worker.segment(image, classes=["cat", "moon"]) if i % 2 else
                          worker.search(text="cat", k=5))
                versions.append(answer["version"])
            except Exception as exc:  # any failure at all is what this test looks for
                failures.append(repr(exc))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        for version in (new, before, None):  # None = CURRENT = new
            time.sleep(0.4)
            answer = client.reload(version)
            assert answer["version"] == (version or new) and client.bank()["version"] == answer["version"]
        time.sleep(0.4)
    finally:
        stop.set()
        thread.join(timeout=90)
    assert not failures, failures[:3]
    assert len(versions) >= 6 and versions[-1] == new and {before, new} <= set(versions)
    assert client.bank()["cache"]["misses"] >= 1  # the new version has its own cache, on the same cache dir


def test_not_ready_without_a_bank_and_serve_fails_fast(tmp_path):
    config = ServiceConfig(bank=str(tmp_path / "no-bank"))
    with pytest.raises(ValueError, match="no bank at .*nothing is stored there"):
        serve(config, port=1)  # loads before binding: a wrong bank URI stops `refbank serve` at once
    running = Server(create_app(config))
    try:
        client = RefbankClient(running.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.health() == {"status": "ok"}
                client.ready()
            except RefbankConnectionError:
                pass  # not listening yet
            except RefbankError as exc:
                assert exc.status == 503 and exc.error == "not_ready"
                if "nothing is stored there" in exc.detail:
                    break
            assert time.monotonic() < deadline, "readyz never reported the load failure"
            time.sleep(0.1)
        with pytest.raises(RefbankError) as caught:
            client.search(text="cat")
        assert caught.value.status == 503
    finally:
        running.stop()
    with pytest.raises(ValueError, match="max_k"):
        ServiceConfig(bank="unused", max_k=MAX_K + 1)
