"""query.client against the session's real uvicorn server (tests/service_fixtures.py): decoded answers, the labels
endpoint, unknown class names, fixed colours, transport failures; the demo's overlays with their legend; what the
package ships (py.typed, static files)."""

from __future__ import annotations

import fnmatch
import json
import socket
import threading
import tomllib
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.demo import segment_heldout, write_examples
from query.client import RefbankClient, RefbankConnectionError, RefbankError, _multipart
from query.render import LEGEND_KEY, hex_colour, label_colour
from tests.build_helpers import read_bank
from tests.service_fixtures import NAMES, TOKEN, png

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_segment_answer_is_decoded(client, world):
    image = world["heldout"][1].image
    height, width = image.shape[:2]
    plain = client.segment(image, classes=["cat", "grass", "moon"], background_threshold=0.2)
    full = client.segment(image, classes=["cat", "grass", "moon"], background_threshold=0.2,
                          return_=["json", "label_map", "overlay"])
    # The label map rebuilt from the regions' RLE equals the server's own label-map PNG.
    assert plain["label_map"].dtype == np.uint16 and plain["label_map"].shape == (height, width)
    np.testing.assert_array_equal(plain["label_map"], full["label_map"])
    regions = plain["result"]["regions"]
    assert plain["region_map"].dtype == np.int32 and plain["region_map"].min() >= 0  # superpixels cover the image
    for i, region in enumerate(regions):
        mask = mask_utils.decode({"size": region["rle"]["size"], "counts": region["rle"]["counts"].encode()})
        np.testing.assert_array_equal(plain["region_map"] == i, mask.astype(bool))
        assert region["area"] == int(mask.sum())
    # Overlays are PIL images; one PNG alone comes back decoded too.
    assert isinstance(full["overlay"], Image.Image) and full["overlay"].size == (width, height)
    alone = client.segment(image, classes=["cat", "grass", "moon"], background_threshold=0.2, return_="overlay")
    assert isinstance(alone, Image.Image)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(full["overlay"]))
    only_map = client.segment(image, classes=["cat", "grass", "moon"], background_threshold=0.2, return_="label_map")
    assert isinstance(only_map, np.ndarray) and only_map.dtype == np.uint16
    np.testing.assert_array_equal(only_map, full["label_map"])


def test_labels_endpoint_lists_the_bank_labels_with_counts(server, client, world):
    truth = Counter(label for label in read_bank(world["bank"])["label"].to_pylist() if label is not None)
    answer = client.labels()
    assert answer["version"] == client.bank()["version"] and answer["total"] == len(truth) == len(NAMES)
    assert {e["label"]: e["count"] for e in answer["labels"]} == dict(truth)
    counts = [e["count"] for e in answer["labels"]]
    assert counts == sorted(counts, reverse=True)
    assert all(e["color"] == hex_colour(e["label"]) for e in answer["labels"])
    some = client.labels(prefix="C")
    assert {e["label"] for e in some["labels"]} == {n for n in NAMES if n.startswith("c")} == set(
        n for n in truth if n.startswith("c")) and some["total"] == len(some["labels"])
    top = client.labels(limit=2)
    assert top["labels"] == answer["labels"][:2] and top["total"] == len(NAMES)
    with pytest.raises(RefbankError) as caught:
        RefbankClient(server.url).labels()
    assert caught.value.status == 401
    with pytest.raises(RefbankError) as caught:
        client.labels(limit=0)
    assert caught.value.status == 422


def test_unknown_class_names_are_reported(server, client, world):
    image = world["heldout"][2].image
    answer = client.segment(image, classes=["cat", "Grass", "sky", "unicorn"])
    assert answer["unknown_classes"] == ["sky", "unicorn"]  # "Grass" is the bank's "grass", case aside
    assert answer["result"]["details"]["prototypes"]["sky"][0][0] in NAMES  # matched to the nearest bank label
    assert client.segment(image, classes=["cat", "grass"])["unknown_classes"] == []
    foreground = client.segment(image, mode="foreground", foreground_labels=["cat", "dragon"])
    assert foreground["unknown_classes"] == ["dragon"]
    assert client.segment(image, mode="open_set", k=5)["unknown_classes"] == []
    # A PNG answer says it in a header.
    body, kind = _multipart({"image": png(image)}, {"classes": ["cat", "sky"], "return": "overlay"})
    request = urllib.request.Request(server.url + "/v1/segment", data=body, headers={
        "Content-Type": kind, "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert json.loads(response.headers["X-Refbank-Unknown-Classes"]) == ["sky"]


def test_colours_are_fixed_per_label_across_requests(client, world):
    image = world["heldout"][0].image
    first = client.segment(image, classes=["cat", "grass", "brick", "galaxy"], alpha=1.0,
                           return_=["json", "overlay"])
    second = client.segment(image, classes=["galaxy", "moon", "cat"], alpha=1.0, return_=["json", "overlay"])
    colours = [{e["label"]: e["color"] for e in answer["legend"]} for answer in (first, second)]
    for label in ("cat", "galaxy"):
        assert colours[0][label] == colours[1][label] == hex_colour(label)
    for answer in (first, second):  # at alpha 1 every labelled pixel shows its label's colour
        pixels = np.asarray(answer["overlay"])
        for entry in answer["legend"]:
            where = answer["label_map"] == entry["value"]
            if entry["label"] is not None and where.any():
                assert (pixels[where] == label_colour(entry["label"])).all(), entry


def test_transport_failures_raise_the_projects_error():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(RefbankConnectionError) as caught:
        RefbankClient(f"http://127.0.0.1:{closed}").health()
    assert caught.value.error == "connection_refused" and caught.value.status is None
    assert isinstance(caught.value, RefbankError) and isinstance(caught.value, ConnectionError)
    assert "refbank serve" in str(caught.value)

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        with pytest.raises(RefbankConnectionError) as caught:
            RefbankClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5).bank()
        assert caught.value.error == "timeout" and "0.5 s" in caught.value.detail
    finally:
        silent.close()

    rude = socket.socket()  # answers every connection by closing it
    rude.bind(("127.0.0.1", 0))
    rude.listen(4)

    def hang_up() -> None:
        connection, _ = rude.accept()
        connection.recv(1024)
        connection.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        with pytest.raises(RefbankConnectionError) as caught:
            RefbankClient(f"http://127.0.0.1:{rude.getsockname()[1]}", timeout=10).health()
        assert caught.value.error == "unreachable" and "RemoteDisconnected" in caught.value.detail
    finally:
        thread.join(timeout=10)
        rude.close()


def test_demo_overlays_carry_a_legend(server, client, world, tmp_path):
    samples = world["heldout"][:2]
    segment_heldout(server.url, samples, tmp_path, token=TOKEN)
    for sample in samples:
        written = Image.open(tmp_path / f"{sample.key.rsplit('/', 1)[-1]}.overlay.png")
        answer = client.segment(sample.image, classes=NAMES, return_=["json", "overlay"])  # the same request
        present = [e["label"] for e in answer["legend"] if e["label"] is not None and e["pixels"] > 0]
        stored = json.loads(written.text[LEGEND_KEY])
        assert [e["label"] for e in stored] == present and len(present) >= 2
        assert all(e["color"] == hex_colour(e["label"]) for e in stored)
        pixels = np.asarray(written.convert("RGB"))
        height, width = sample.image.shape[:2]
        np.testing.assert_array_equal(pixels[:height, :width], np.asarray(answer["overlay"]))
        panel = {tuple(p) for p in pixels[height:].reshape(-1, 3)}
        assert all(label_colour(label) in panel for label in present)  # a swatch per label present


def test_the_package_ships_py_typed_and_its_static_files(tmp_path):
    for package in ("bank_builder", "query", "jobs"):
        assert (ROOT / package / "py.typed").is_file(), package
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package in ("bank_builder", "query", "jobs"):
        assert "py.typed" in data[package], package
    static = ROOT / "query" / "static"
    files = [p.relative_to(ROOT / "query").as_posix() for p in static.rglob("*") if p.is_file()]
    unshipped = [f for f in files if not any(fnmatch.fnmatchcase(f, g) and f.count("/") == g.count("/")
                                             for g in data["query"])]
    assert not unshipped, f"add these to [tool.setuptools.package-data] query: {unshipped}"
    for needed in ("static/index.html", "static/vendor/swagger-ui/swagger-ui-bundle.js",
                   "static/vendor/swagger-ui/LICENSE", "static/vendor/redoc/redoc.standalone.js",
                   "static/vendor/redoc/LICENSE", "static/examples/examples.json"):
        assert needed in files, needed
    # The page's examples are what the synthetic scene generator makes at the fixed seed.
    examples = json.loads((static / "examples" / "examples.json").read_text())
    assert write_examples(tmp_path) == examples and len(examples) == 3
    for example in examples:
        shipped = np.asarray(Image.open(static / "examples" / example["file"]))
        assert shipped.shape == (128, 128, 3) and set(example["classes"]) <= set(NAMES)
        np.testing.assert_array_equal(shipped, np.asarray(Image.open(tmp_path / example["file"])), err_msg=(
            "the scene generator changed: regenerate with jobs.demo.write_examples (see its docstring)"))
