"""Request options and response shapes of the HTTP API (query.service), as pydantic models.

Options arrive as one JSON string in a multipart field (`options`), beside the image files, so one request can
carry an image, reference images and their prompts. Unknown keys are refused (a typo is an error, not a no-op).
Coordinates are pixels of the image they refer to: boxes XYXY (max exclusive), points (x, y).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

Mode = Literal["vocabulary", "open_set", "reference", "foreground"]
Part = Literal["json", "label_map", "overlay"]
Number = StrictFloat | StrictInt


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ReferenceOptions(_Options):
    """One reference prompt: an image (a form field of the request) and exactly one of box, scribble or mask."""

    image: StrictStr = Field("image", description="form field holding the reference image; 'image' = the target")
    label: StrictStr = Field("target", description="class name; references sharing a label form one class")
    box: tuple[Number, Number, Number, Number] | None = Field(None, description="XYXY pixels, max exclusive")
    scribble: list[tuple[Number, Number]] | None = Field(None, description="polyline of (x, y) pixel points",
                                                         max_length=10_000)
    mask: StrictStr | None = Field(None, description="form field holding a PNG mask at the reference image's "
                                                     "size; non-zero pixels are the object")


class SegmentOptions(_Options):
    """Options of POST /v1/segment (the `options` form field, a JSON object; every key optional)."""

    mode: Mode = "vocabulary"
    classes: list[StrictStr] | None = Field(None, description="vocabulary mode: class names, e.g. ['cat', 'grass']")
    background_threshold: Number | None = Field(None, description="vocabulary: regions scoring below it are "
                                                                  "background (0); null = every region labelled")
    region: Literal["superpixel", "grid"] = Field("superpixel", description="how the image is cut into regions")
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
    fpr: Number | None = Field(None, gt=0, lt=1, description="reference: other-label bank fraction allowed above "
                                                             "the calibrated threshold")
    threshold: Number | None = Field(None, ge=0, le=1, description="foreground: score at or above = foreground")
    foreground_labels: list[StrictStr] | None = Field(None, description="foreground: bank labels that count as "
                                                                        "foreground (default: non-stuff labels)")

    @property
    def parts(self) -> list[str]:
        """What to return, as a list."""
        return [self.return_] if isinstance(self.return_, str) else list(dict.fromkeys(self.return_))


class SearchOptions(_Options):
    """POST /v1/search: a query (an `image` form file, `text` or `vector`), k and the probe count."""

    text: StrictStr | None = Field(None, description="text query: matched to bank labels by text embedding; "
                                                     "their visual prototype is the query vector")
    vector: list[Number] | None = Field(None, description="(C,) L2-normalised visual embedding")
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

    error: str = Field(description="e.g. invalid_image, payload_too_large, invalid_options, unknown_version")
    detail: Any = Field(description="human-readable message")
    available: list[str] | None = Field(None, description="unknown_version: the versions the bank has")


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
    encoder: dict[str, Any] = Field(description="the bank's encoder spec (untrained: weights are random)")
    untrained: bool
    dims: dict[str, Any]
    totals: dict[str, Any]
    index: dict[str, Any] | None
    labels: int
    cache: dict[str, Any]
    limits: dict[str, Any]
    loaded_at: str
