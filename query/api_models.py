"""Request options and response shapes of the HTTP API (query.service), as pydantic models.

Options arrive as one JSON string in a multipart field (`options`), beside the image files, so one request can
carry an image, reference images and their prompts. Unknown keys are refused (a typo is an error, not a no-op).
Coordinates are pixels of the image they refer to: boxes XYXY (max exclusive), points (x, y).

Every number is finite and at most 1e9 in magnitude (JSON's NaN, Infinity and 1e400 are refused with 422, not
carried into arithmetic); a JSON document is at most max_json_bytes long and MAX_JSON_DEPTH deep (`parse_options`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    StrictStr,
    field_validator,
)

from query.serving import ApiError

MAX_MAGNITUDE = 1e9  # of any number in the options: far outside any image, far inside float and int64 range
MAX_JSON_DEPTH = 32  # nesting of arrays and objects in a JSON body or options field (the options need 3)


def _bounded(value: float) -> float:
    if not -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE:
        raise ValueError(f"must lie between -{MAX_MAGNITUDE:g} and {MAX_MAGNITUDE:g}")
    return value


# A finite JSON number (int or float, not bool, not a numeric string) of at most MAX_MAGNITUDE, as a float.
Number = Annotated[float, Strict(), AllowInfNan(False), AfterValidator(_bounded)]
Mode = Literal["vocabulary", "open_set", "reference", "foreground"]
Part = Literal["json", "label_map", "overlay"]


def parse_options(raw: Any, model: type[BaseModel], max_bytes: int) -> Any:
    """`raw` (JSON text or bytes; None = {}) validated as `model`: 413 over max_bytes, 400 for text that is not
    JSON or is nested deeper than MAX_JSON_DEPTH, 422 for anything but an object (pydantic: wrong fields)."""
    if raw is None:
        raw = "{}"
    if not isinstance(raw, (str, bytes)):
        raise ApiError(422, "invalid_options", "options must be a plain form field holding JSON, not a file")
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise ApiError(413, "payload_too_large", f"the JSON is {len(data)} bytes; this server takes at most "
                                                 f"{max_bytes} (max_json_bytes)")
    try:
        value = json.loads(data)
        too_deep = json_depth(value) > MAX_JSON_DEPTH
    except RecursionError:  # the C parser's own guard, far deeper than MAX_JSON_DEPTH
        too_deep = True
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_options", f"options is not valid JSON ({exc}); send a JSON object such as "
                                               '{"mode": "vocabulary", "classes": ["cat"]}') from None
    if too_deep:
        raise ApiError(400, "invalid_options", f"the JSON is nested more than {MAX_JSON_DEPTH} arrays / objects "
                                               "deep; the options need 3")
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_options", f"options must be a JSON object, got {type(value).__name__}")
    return model.model_validate(value)


def json_depth(value: Any) -> int:
    """Nesting depth of arrays and objects in a parsed JSON value (a scalar is 0), counted without recursion and
    given up on past MAX_JSON_DEPTH (that depth + 1 is returned)."""
    if not isinstance(value, (dict, list)):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return depth
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ReferenceOptions(_Options):
    """One reference prompt: an image (a form field of the request) and exactly one of box, scribble or mask."""

    image: StrictStr = Field("image", description="form field holding the reference image; 'image' = the target")
    label: StrictStr = Field("target", description="class name; references sharing a label form one class")
    box: tuple[Number, Number, Number, Number] | None = Field(None, description="XYXY pixels, max exclusive")
    scribble: list[tuple[Number, Number]] | None = Field(None, description="polyline of (x, y) pixel points",
                                                         min_length=1, max_length=10_000)
    mask: StrictStr | None = Field(None, description="form field holding a PNG mask at the reference image's "
                                                     "size; non-zero pixels are the object")


class SegmentOptions(_Options):
    """Options of POST /v1/segment (the `options` form field, a JSON object; every key optional)."""

    mode: Mode = "vocabulary"
    classes: list[StrictStr] | None = Field(None, description="vocabulary mode: class names, e.g. ['cat', 'grass']")
    background_threshold: Number | None = Field(None, description="vocabulary: regions scoring below it are "
                                                                  "background (0); null = every region labelled")
    region: Literal["superpixel", "grid", "hierarchy", "refined"] = Field(
        "superpixel", description="how the image is cut into regions, a region preset (query.regions.REGION_PRESETS): "
                                  "'superpixel', 'grid' (the encoder's patches), 'hierarchy' (merged superpixels) or "
                                  "'refined' (hierarchy, labels refined per pixel over the image's colours)")
    references: list[ReferenceOptions] = Field(default_factory=list, description="reference mode: the prompts")
    return_: Part | list[Part] = Field(
        "json", alias="return",
        description="'json' (default): the result as JSON; 'label_map' / 'overlay': that PNG as the response "
                    "body; a list: JSON with the result ('json') and the PNGs named, base64-encoded")
    alpha: Number = Field(0.5, ge=0, le=1, description="overlay opacity of the class colours")
    labels_per_class: StrictInt | None = Field(None, ge=1, description="vocabulary: bank labels per class")
    combine: Literal["mean", "max"] | None = Field(None, description="vocabulary: one prototype or several")
    k: StrictInt | None = Field(None, ge=1, description="open_set / reference / foreground: neighbours per region")
    temperature: Number | None = Field(None, gt=0, description="kNN vote softmax temperature")
    min_share: Number | None = Field(None, ge=0, description="open_set: vote share below which a region is 0")
    unlabelled: Literal["ignore", "vote"] | None = Field(
        None, description="open_set: votes of unlabelled bank segments: 'ignore' (default; a region takes its best "
                          "labelled vote) or 'vote' (they may win a region, which is then 0)")
    fpr: Number | None = Field(None, gt=0, lt=1, description="reference: other-label bank fraction allowed above "
                                                             "the calibrated threshold")
    decision: Literal["margin", "calibrated"] | None = Field(
        None, description="reference: how 'exists' is decided: 'margin' (default; the best region's relative score "
                          "≥ margin) or 'calibrated' (a region above the fpr threshold, nearer the reference than "
                          "any other bank label)")
    margin: Number | None = Field(None, ge=-2, le=2, description="reference: relative-score margin of the 'margin' "
                                                                 "decision (default 0.1)")
    recruit: Number | None = Field(None, ge=0, lt=1, description="reference: weight of the reference's own bank "
                                                                 "labels' prototypes in its prototype (default 0.5)")
    threshold: Number | None = Field(None, ge=0, le=1, description="foreground: score at or above = foreground")
    foreground_labels: list[StrictStr] | None = Field(None, max_length=10_000,
                                                      description="foreground: bank labels that count as "
                                                                  "foreground (default: non-stuff labels)")

    @property
    def parts(self) -> list[str]:
        """What to return, as a list."""
        return [self.return_] if isinstance(self.return_, str) else list(dict.fromkeys(self.return_))


class SearchOptions(_Options):
    """POST /v1/search: a query (an `image` form file, `text` or `vector`), k and the probe count."""

    text: StrictStr | None = Field(None, description="text query: matched to bank labels by text embedding; "
                                                     "their visual prototype is the query vector")
    vector: list[Number] | None = Field(None, description="(C,) L2-normalised visual embedding", max_length=65_536)
    box: tuple[Number, Number, Number, Number] | None = Field(None, description="image query: pool this XYXY box "
                                                                                 "instead of the whole image")
    k: StrictInt = Field(10, ge=1, description="results")
    nprobe: StrictInt | None = Field(None, ge=1, description="inverted lists probed (default: the bank's tuned value)")

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("text must not be blank")
        return value


class ReloadRequest(_Options):
    """POST /admin/reload: the version to serve (default: the bank's CURRENT)."""

    version: StrictStr | None = None


# ----------------------------------------------------------------------------------------- responses


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx: a short machine-readable code and a message saying what to fix."""

    error: str = Field(description="e.g. invalid_image, payload_too_large, invalid_options, unknown_version, "
                                   "overloaded (429, with Retry-After), storage_corrupt (503)")
    detail: Any = Field(description="human-readable message")
    available: list[str] | None = Field(None, description="unknown_version: the versions the bank has")
    object: str | None = Field(None, description="storage_corrupt: the damaged object, named inside the bank")
    objects: dict[str, str] | None = Field(None, description="/readyz storage_corrupt: damaged objects met, "
                                                             "each with what is wrong")


class LegendEntry(BaseModel):
    value: int = Field(description="label map value (0 = background)")
    label: str | None
    color: str = Field(description="#rrggbb overlay colour, derived from the label alone (fixed across requests)")
    pixels: int


class SegmentResponse(BaseModel):
    """JSON answer of /v1/segment. result: SegmentationResult.to_dict() (mode, classes, size [H, W], regions with
    COCO RLE, exists, encoder, untrained, details); label_map_png / overlay_png: base64 PNGs when asked."""

    version: str
    result: dict[str, Any] | None = None
    legend: list[LegendEntry]
    unknown_classes: list[str] = Field(description="requested class names (vocabulary `classes`, foreground "
                                                   "`foreground_labels`) that equal no bank label; vocabulary mode "
                                                   "used the nearest labels by text (see result.details.prototypes)")
    label_map_png: str | None = None
    overlay_png: str | None = None
    timings_ms: dict[str, float]


class LabelEntry(BaseModel):
    label: str
    count: int = Field(description="bank segments with this label")
    color: str = Field(description="#rrggbb overlay colour of the label (the same in every answer)")


class LabelsResponse(BaseModel):
    """GET /v1/labels: the bank's labels, most frequent first."""

    version: str
    total: int = Field(description="labels matching the prefix (may exceed the entries returned)")
    labels: list[LabelEntry]


class SearchHit(BaseModel):
    rank: int
    score: float = Field(description="inner product (cosine) with the query")
    segment_id: int
    metadata: dict[str, Any] = Field(description="part, image_key, segment_index, label, label_source, bbox (XYXY), "
                                                 "area, mask (COCO RLE), quality")


class SearchResponse(BaseModel):
    version: str
    query: dict[str, Any] = Field(description="kind (image / text / vector) and what the query vector came from")
    k: int
    results: list[SearchHit]


class BankResponse(BaseModel):
    uri: str
    version: str
    current: str | None
    versions: list[str]
    note: str | None = Field(None, description="why the version served is not CURRENT (CURRENT has no index yet)")
    encoder: dict[str, Any] = Field(description="the bank's encoder spec (untrained: weights are random)")
    untrained: bool
    dims: dict[str, Any]
    totals: dict[str, Any]
    index: dict[str, Any] | None
    labels: int
    cache: dict[str, Any]
    pools: dict[str, dict[str, int]] = Field(description="per worker pool (image, query): running, queued, refused "
                                                          "(429), completed calls, workers, queue limit")
    limits: dict[str, Any]
    loaded_at: str
