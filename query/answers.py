"""What each endpoint of the query service computes, on a worker thread of its pool (query.admission): a
segmentation, a search, the bank's description, its labels. Each works on the one `Snapshot` its request read, so a
reload never changes the bank under it; storage failures inside become 503 answers (ServiceState.reading).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
from fastapi.responses import Response

from bank_builder.format import current_version, list_versions
from query.api_models import SearchOptions, SegmentOptions
from query.middleware import SafeJSONResponse
from query.regions import Reference, embed_masks, prompt_mask
from query.render import SegmentationResult, hex_colour, label_map_png, legend, overlay_png
from query.segment import ForegroundConfig, OpenSetConfig, ReferenceConfig, VocabularyConfig
from query.serving import ApiError, ServiceState, Snapshot, decode_image, decode_mask


def segment_answer(state: ServiceState, snapshot: Snapshot, files: dict[str, bytes], options: SegmentOptions
                   ) -> Response:
    """POST /v1/segment: decode the uploads, run the mode, answer JSON (with PNGs base64) or one PNG."""
    config, timings, start = state.config, {}, time.perf_counter()
    images = {"image": decode_image(files["image"], config.max_pixels, "image", config.max_aspect)}
    references = []
    if options.mode == "reference":
        for i, ref in enumerate(options.references):
            if ref.image not in images:
                images[ref.image] = decode_image(files[ref.image], config.max_pixels, f"reference {i} image",
                                                 config.max_aspect)
            image = images[ref.image]
            mask = (None if ref.mask is None else
                    decode_mask(files[ref.mask], image.shape[:2], config.max_pixels, f"reference {i} mask"))
            references.append(Reference(image, mask=mask, box=ref.box, scribble=ref.scribble, label=ref.label))
    timings["decode"], start = _ms(start), time.perf_counter()
    with state.reading(snapshot):
        result = _dispatch(snapshot.segmenters[options.region], images["image"], references, options)
    timings["segment"], start = _ms(start), time.perf_counter()
    unknown = _unknown_names(options, snapshot.table.labels)
    if isinstance(options.return_, str) and options.return_ != "json":
        png = (label_map_png(result) if options.return_ == "label_map"
               else overlay_png(images["image"], result, float(options.alpha)))
        return Response(png, media_type="image/png", headers={
            "X-Refbank-Version": snapshot.bank.version, "X-Refbank-Classes": json.dumps(result.classes),
            "X-Refbank-Unknown-Classes": json.dumps(unknown), "X-Refbank-Untrained": str(result.untrained).lower()})
    parts = options.parts
    out: dict[str, Any] = {"version": snapshot.bank.version, "legend": legend(result), "unknown_classes": unknown}
    if "json" in parts:
        out["result"] = result.to_dict()
    if "label_map" in parts:
        out["label_map_png"] = base64.b64encode(label_map_png(result)).decode("ascii")
    if "overlay" in parts:
        out["overlay_png"] = base64.b64encode(overlay_png(images["image"], result, float(options.alpha))).decode()
    timings["render"] = _ms(start)
    out["timings_ms"] = timings
    return SafeJSONResponse(out)


def _dispatch(segmenter: Any, image: np.ndarray, references: list[Reference],
              options: SegmentOptions) -> SegmentationResult:
    """Run the mode `options` names; a bad option raises ValueError (→ 400) from the segmenter."""
    mode, o = options.mode, options
    if mode == "vocabulary":
        if not o.classes:
            raise ApiError(422, "invalid_options", 'vocabulary mode needs "classes": a list of class names, '
                                                   'e.g. ["cat", "grass"]')
        return segmenter.vocabulary(image, o.classes, VocabularyConfig(**_given(
            labels_per_class=o.labels_per_class, text_temperature=o.temperature, combine=o.combine,
            background_threshold=o.background_threshold)))
    if mode == "open_set":
        return segmenter.open_set(image, OpenSetConfig(**_given(k=o.k, temperature=o.temperature,
                                                                min_share=o.min_share, unlabelled=o.unlabelled)))
    if mode == "reference":
        if not references:
            raise ApiError(422, "invalid_options", 'reference mode needs "references": [{"image": "<form file>", '
                                                   '"box": [x0, y0, x1, y1], "label": "..."}]')
        return segmenter.reference(image, references, ReferenceConfig(**_given(
            fpr=o.fpr, k=o.k, temperature=o.temperature, decision=o.decision, margin=o.margin, recruit=o.recruit)))
    labels = None if o.foreground_labels is None else frozenset(o.foreground_labels)
    return segmenter.foreground(image, ForegroundConfig(**_given(threshold=o.threshold, foreground_labels=labels,
                                                                 k=o.k, temperature=o.temperature)))


def search_answer(state: ServiceState, snapshot: Snapshot, image: bytes | None, options: SearchOptions
                  ) -> dict[str, Any]:
    """POST /v1/search: the query vector (image, text or given), its top-k, their metadata."""
    config = state.config
    if options.vector is not None:
        vector, query = np.asarray(options.vector, np.float32)[None], {"kind": "vector"}
    elif options.text is not None:
        prototypes, matched = snapshot.segmenters["superpixel"].class_prototypes([options.text])
        vector = prototypes[0][:1]
        query = {"kind": "text", "text": options.text, "labels": next(iter(matched.values()))}
    else:
        pixels = decode_image(image, config.max_pixels, "image", config.max_aspect)
        box = options.box
        mask = prompt_mask(pixels.shape[:2], box=box) if box is not None else np.ones(pixels.shape[:2], bool)
        vector = embed_masks(state.encoder, pixels, [mask])
        query = {"kind": "image", "size": list(pixels.shape[:2]), "box": None if box is None else list(box)}
    with state.reading(snapshot):
        scores, ids = snapshot.searcher.search(vector, options.k, options.nprobe)
        found = ids[0] >= 0
        rows = snapshot.reads.metadata(ids[0][found])
    results = [{"rank": rank, "score": float(score), "segment_id": int(sid),
                "metadata": {k: v for k, v in row.items() if k != "segment_id"}}
               for rank, (score, sid, row) in enumerate(zip(scores[0][found], ids[0][found], rows))]
    return {"version": snapshot.bank.version, "query": query, "k": options.k, "results": results}


def bank_answer(state: ServiceState, snapshot: Snapshot, pools: dict[str, dict[str, int]]) -> dict[str, Any]:
    """GET /v1/bank: the version served, CURRENT and the versions on storage, index, cache, pools, limits."""
    with state.reading(snapshot):
        current, versions = current_version(snapshot.bank.ref), list_versions(snapshot.bank.ref)
    bank, config = snapshot.bank, state.config
    index = None
    if bank.index is not None:
        entry = bank.index
        index = {k: getattr(entry, k) for k in ("id", "factory", "kind", "metric", "vectors", "nlist", "code_size",
                                                "nprobe", "refine", "refine_factor", "k", "recall_at_k",
                                                "target_recall", "target_met", "created_at")}
        index["list_objects"], index["text_labels"] = len(entry.lists), entry.labels
    return {"uri": bank.uri, "version": bank.version, "current": current, "versions": versions, "note": snapshot.note,
            "encoder": bank.manifest.encoder, "untrained": bool(bank.spec.untrained), "dims": bank.dims,
            "totals": bank.manifest.totals, "index": index, "labels": len(snapshot.table.labels),
            "cache": snapshot.searcher.stats(), "pools": pools,
            "limits": {name: getattr(config, name) for name in (
                "max_upload_bytes", "max_json_bytes", "max_pixels", "max_aspect", "max_k", "max_vocabulary",
                "max_references", "working_side")},
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snapshot.loaded_at))}


def labels_answer(snapshot: Snapshot, prefix: str, limit: int) -> dict[str, Any]:
    """GET /v1/labels: the labels starting with `prefix` (case aside), most frequent first, at most `limit`."""
    table, start = snapshot.table, prefix.casefold()
    order = [i for i in np.argsort(-np.asarray(table.counts), kind="stable")
             if table.labels[i].casefold().startswith(start)]
    return {"version": snapshot.bank.version, "total": len(order),
            "labels": [{"label": table.labels[i], "count": int(table.counts[i]), "color": hex_colour(table.labels[i])}
                       for i in order[:limit]]}


def _unknown_names(options: SegmentOptions, bank_labels: list[str]) -> list[str]:
    """The requested names (vocabulary `classes`, foreground `foreground_labels`) that equal no bank label, case
    aside: vocabulary mode still maps them to the nearest labels by text, but the caller should know."""
    names = {"vocabulary": options.classes, "foreground": options.foreground_labels}.get(options.mode)
    if not names:
        return []
    known = {label.casefold() for label in bank_labels}
    return [name for name in names if name.strip().casefold() not in known]


def _given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None): the rest keep the config's defaults."""
    return {k: v for k, v in values.items() if v is not None}


def _ms(start: float) -> float:
    return round(1000 * (time.perf_counter() - start), 2)
