"""Synthetic scenes: regions cut from scikit-image's bundled photographs, composited with occlusion.

Every class is one image that ships inside the scikit-image wheel (no download), so the corpus is
reproducible offline and each class has a consistent look that a visual encoder can retrieve.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

# name -> (skimage.data loader, caption phrases, RGB tint applied to grey sources so textures differ
# in colour as well as pattern). Index in this table = class id. The first phrase names the class
# verbatim and is the one clean captions use; the others are what noisy captions (captions.py) vary to.
_CLASSES: tuple[tuple[str, str, tuple[str, ...], tuple[float, float, float]], ...] = (
    ("brick", "brick", ("a brick wall", "bricks", "a wall of bricks"), (1.0, 0.72, 0.6)),
    ("grass", "grass", ("grass", "a lawn", "green grass"), (0.7, 1.0, 0.55)),
    ("gravel", "gravel", ("gravel", "small stones", "a gravel path"), (0.95, 0.9, 0.82)),
    ("cat", "chelsea", ("a cat", "a tabby cat", "a kitten"), (1.0, 1.0, 1.0)),
    ("coins", "coins", ("coins", "a pile of coins", "old coins"), (1.0, 0.88, 0.55)),
    ("moon", "moon", ("the moon", "a full moon", "the lunar surface"), (1.0, 1.0, 1.0)),
    ("coffee", "coffee", ("a cup of coffee", "coffee", "a coffee cup"), (1.0, 1.0, 1.0)),
    ("astronaut", "astronaut", ("an astronaut", "a spaceman"), (1.0, 1.0, 1.0)),
    ("rocket", "rocket", ("a rocket", "a space shuttle"), (1.0, 1.0, 1.0)),
    ("cameraman", "camera", ("a cameraman", "a photographer"), (1.0, 1.0, 1.0)),
    ("clock", "clock", ("a clock", "a wall clock", "a clock face"), (0.85, 0.9, 1.0)),
    ("motorcycle", "stereo_motorcycle", ("a motorcycle", "a motorbike", "a red motorcycle"), (1.0, 1.0, 1.0)),
    ("galaxy", "hubble_deep_field", ("a galaxy", "distant galaxies", "a field of stars"), (1.0, 1.0, 1.0)),
)
BACKGROUND_CLASSES: tuple[str, ...] = ("brick", "grass", "gravel")
_OBJECT_CLASSES: tuple[str, ...] = tuple(c[0] for c in _CLASSES if c[0] not in BACKGROUND_CLASSES)
_CLUTTER_SOURCE = "text"  # painted but never labelled: real corpora have unlabeled pixels (id 0)
_CLUTTER_PROBABILITY = 0.3
CAPTION_OPENERS: tuple[str, ...] = ("a photo of", "a picture of", "an image of")


@dataclass
class Scene:
    """One composed image with its ground truth.

    image: (H, W, 3) uint8 RGB. instances: (H, W) uint16, 0 = unlabeled, 1..n = visible instances
    (compact, in painting order; the background texture is 1 when it stays visible). labels:
    instance id -> class name, exactly the ids present in `instances`. caption: one sentence that
    names every class present.
    """

    image: np.ndarray
    instances: np.ndarray
    labels: dict[int, str]
    caption: str


def class_names() -> tuple[str, ...]:
    """The class table, index = class id (the `classes` of every sample's json)."""
    return tuple(c[0] for c in _CLASSES)


def class_phrases() -> dict[str, tuple[str, ...]]:
    """class name -> the phrases captions may name it with (the first one contains the name verbatim)."""
    return {c[0]: c[2] for c in _CLASSES}


def is_background(name: str) -> bool:
    """Whether a class is a background texture (captions put it after "on")."""
    return name in BACKGROUND_CLASSES


def min_visible_area(image_size: int) -> int:
    """Pixels an instance must keep visible to be labelled; >= 64 so default ingest keeps it."""
    return max(64, image_size * image_size // 400)


@functools.lru_cache(maxsize=None)
def _source(name: str) -> Image.Image:
    """The decoded RGB source image of a class (or of the clutter), cached per process."""
    table = {c[0]: (c[1], c[3]) for c in _CLASSES}
    loader, tint = table.get(name, (name, (1.0, 1.0, 1.0)))
    pixels = getattr(skimage.data, loader)()
    if isinstance(pixels, tuple):  # stereo_motorcycle returns (left, right, disparity)
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    rgb = pixels[:, :, :3].astype(np.float32) * np.asarray(tint, dtype=np.float32)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _crop(rng: np.random.Generator, name: str, height: int, width: int) -> np.ndarray:
    """A random window of the class image, rescaled to (height, width, 3) uint8 and colour-jittered."""
    source = _source(name)
    side = min(source.size) * rng.uniform(0.3, 1.0)  # scale jitter: how much of the source is shown
    crop_w = min(source.width, side * rng.uniform(0.8, 1.25))
    crop_h = min(source.height, side * rng.uniform(0.8, 1.25))
    left = rng.uniform(0, source.width - crop_w)
    top = rng.uniform(0, source.height - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    window = source.resize((width, height), Image.Resampling.BILINEAR, box=box)
    gain = rng.uniform(0.8, 1.2, size=3).astype(np.float32)
    offset = np.float32(rng.uniform(-20, 20))
    jittered = np.asarray(window, dtype=np.float32) * gain + offset
    return np.clip(jittered, 0, 255).astype(np.uint8)


def _ellipse(rng: np.random.Generator, size: int) -> np.ndarray:
    """A rotated ellipse filling most of a (size, size) canvas, bool."""
    canvas = Image.new("L", (size * 2, size * 2), 0)  # drawn at 2x, rotated, then cropped back
    rx, ry = size * rng.uniform(0.3, 0.5), size * rng.uniform(0.15, 0.5)
    ImageDraw.Draw(canvas).ellipse((size - rx, size - ry, size + rx, size + ry), fill=255)
    rotated = canvas.rotate(rng.uniform(0, 180), resample=Image.Resampling.NEAREST)
    half = size // 2
    return np.asarray(rotated.crop((half, half, half + size, half + size))) > 0


def _polygon(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random star-shaped polygon (3-9 vertices) in a (size, size) canvas, bool."""
    count = int(rng.integers(3, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = size * rng.uniform(0.25, 0.5, count)
    centre = size / 2
    points = [(centre + r * np.cos(a), centre + r * np.sin(a)) for r, a in zip(radii, angles)]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 0


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular blob: smooth low-resolution noise under a radial falloff, thresholded, bool."""
    noise = Image.fromarray(rng.uniform(0, 1, (6, 6)).astype(np.float32), "F")
    field = np.asarray(noise.resize((size, size), Image.Resampling.BICUBIC))
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    radius = np.sqrt(axis[:, None] ** 2 + axis[None, :] ** 2)
    return field * 0.6 + (1 - radius) > 0.55


_SHAPES = (_ellipse, _polygon, _blob)


def _paint(
    rng: np.random.Generator, image: np.ndarray, instances: np.ndarray, name: str, instance_id: int
) -> None:
    """Paint one object of class `name` at a random place and size, over what is already there."""
    image_size = image.shape[0]
    size = max(8, int(image_size * rng.uniform(0.2, 0.65)))
    shape = _SHAPES[int(rng.integers(len(_SHAPES)))](rng, size)
    top, left = (int(v) for v in rng.integers(-size // 3, image_size - 2 * size // 3, size=2))
    # Clip the object's canvas to the frame: objects may be partly out of the picture.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, image_size), min(left + size, image_size)
    if y1 <= y0 or x1 <= x0:
        return
    visible = shape[y0 - top : y1 - top, x0 - left : x1 - left]
    fill = _crop(rng, name, size, size)[y0 - top : y1 - top, x0 - left : x1 - left]
    image[y0:y1, x0:x1][visible] = fill[visible]
    instances[y0:y1, x0:x1][visible] = instance_id


def _compact(instances: np.ndarray, names: list[str], min_area: int) -> tuple[np.ndarray, dict[int, str]]:
    """Drop instances under `min_area` visible pixels (they become 0) and renumber the rest 1..n."""
    areas = np.bincount(instances.ravel(), minlength=len(names) + 1)
    lookup = np.zeros(len(names) + 1, dtype=np.uint16)
    labels: dict[int, str] = {}
    for old_id, name in enumerate(names, start=1):
        if areas[old_id] >= min_area:
            lookup[old_id] = len(labels) + 1
            labels[len(labels) + 1] = name
    return lookup[instances], labels


def caption_text(opener: str, objects: list[str], backgrounds: list[str]) -> str:
    """'a photo of a cat, coins and a clock on grass': object phrases listed, then the first background phrase."""
    listed = " and ".join(filter(None, (", ".join(objects[:-1]), objects[-1]))) if objects else ""
    if listed and backgrounds:
        return f"{opener} {listed} on {backgrounds[0]}"
    return f"{opener} {listed or (backgrounds[0] if backgrounds else 'an empty scene')}"


def _caption(rng: np.random.Generator, labels: dict[int, str]) -> str:
    """The clean caption: every class present by its first phrase, objects in painting order, then the background."""
    present = list(dict.fromkeys(labels.values()))
    phrases = class_phrases()
    opener = CAPTION_OPENERS[int(rng.integers(len(CAPTION_OPENERS)))]
    return caption_text(opener, [phrases[n][0] for n in present if not is_background(n)],
                        [phrases[n][0] for n in present if is_background(n)])


def make_scene(rng: np.random.Generator, image_size: int, min_objects: int, max_objects: int) -> Scene:
    """Compose one (image_size, image_size) scene: a texture background (instance 1 unless hidden) and
    min..max_objects occluding objects; unlabeled clutter (id 0) appears in some scenes."""
    background = BACKGROUND_CLASSES[int(rng.integers(len(BACKGROUND_CLASSES)))]
    image = _crop(rng, background, image_size, image_size)
    instances = np.ones((image_size, image_size), dtype=np.uint16)
    names = [background]
    count = int(rng.integers(min_objects, max_objects + 1))
    clutter_at = int(rng.integers(count + 1)) if rng.uniform() < _CLUTTER_PROBABILITY else -1
    for position in range(count + 1):
        if position == clutter_at:
            _paint(rng, image, instances, _CLUTTER_SOURCE, 0)
        if position < count:
            names.append(_OBJECT_CLASSES[int(rng.integers(len(_OBJECT_CLASSES)))])
            _paint(rng, image, instances, names[-1], len(names))
    instances, labels = _compact(instances, names, min_visible_area(image_size))
    return Scene(image=image, instances=instances, labels=labels, caption=_caption(rng, labels))
