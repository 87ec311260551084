"""Named encoder configurations (one JSON file per entry in configs/) and building encoders from them.

An entry binds architecture, pretrained weights and preprocessing, so a bank can never be built with
one model's weights and another's normalisation. An entry is self-contained data: an open_clip
`model_config` file is read into it, so the entry can travel with a job (`EncoderConfig.entry`) to
Ray workers and into a bank's encoder spec, and a worker or a query service rebuilds the encoder
from it without any registry of its own. `resolve_spec` is cheap (no model, no torch model code
imported); `load_encoder` builds the model and applies the weights policy:

- "pretrained": the entry's tag; if there is none or it cannot be loaded → EncoderWeightsError.
  Never a silent fallback to random weights.
- "untrained": the same architecture with weights seeded by `EncoderConfig.seed`; recorded in the
  spec and logged as a warning.
- anything else: a local checkpoint file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bank_builder.config import EncoderConfig
from bank_builder.encoders.base import Encoder, EncoderSpec

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
FAMILIES = {"open_clip": "bank_builder.encoders.open_clip_encoder", "timm": "bank_builder.encoders.timm_encoder"}
_REQUIRED = ("name", "family", "architecture", "pretrained", "image_size", "patch_size", "visual_dim",
             "text_dim", "mean", "std")
_OPTIONAL = ("model_config", "model_kwargs", "note")  # note: what the entry is, printed wherever its spec is
UNTRAINED_HINT = ("pass weights='untrained' (CLI: --weights untrained) to run the same architecture with "
                  "seeded random weights, or a local checkpoint path")

_ENTRIES: dict[str, dict[str, Any]] = {}


class EncoderWeightsError(RuntimeError):
    """The requested weights cannot be loaded; the message says what failed and what to do instead."""


def _validate(entry: Any, base_dir: Path | None) -> dict[str, Any]:
    """A checked copy of a registry entry; a `model_config` file (relative to `base_dir`) is read into it.

    base_dir None: the entry travelled with a job or a bank, so it must already hold the content.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"an encoder entry is a JSON object, got {type(entry).__name__}")
    missing = [k for k in _REQUIRED if k not in entry]
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise ValueError(f"encoder entry {entry.get('name')!r}: missing fields {missing}, unknown fields {unknown}")
    e = copy.deepcopy(entry)
    name = e["name"]
    if e["family"] not in FAMILIES:
        raise ValueError(f"encoder entry {name!r}: family must be one of {sorted(FAMILIES)}, not {e['family']!r}")
    if e["family"] == "timm" and (e["text_dim"] is not None or e.get("model_config") is not None):
        raise ValueError(f"encoder entry {name!r}: timm encoders have no text tower and no model_config file, so "
                         "text_dim must be null and the architecture's options go in model_kwargs")
    dims = [e["image_size"], e["patch_size"], e["visual_dim"]] + ([] if e["text_dim"] is None else [e["text_dim"]])
    if not all(isinstance(d, int) and d > 0 for d in dims) or e["image_size"] % e["patch_size"]:
        raise ValueError(f"encoder entry {name!r}: sizes must be positive ints and image_size a multiple of patch_size")
    if len(e["mean"]) != 3 or len(e["std"]) != 3:
        raise ValueError(f"encoder entry {name!r}: mean and std need one value per RGB channel")
    if isinstance(e.get("model_config"), (str, os.PathLike)):
        if base_dir is None:
            raise ValueError(f"encoder entry {name!r} names its model_config file {e['model_config']!r}, which "
                             "other processes cannot read; load the entry with read_encoder_entry (it reads the "
                             "file into the entry)")
        e["model_config"] = _read_json(base_dir / e["model_config"], f"model_config of encoder entry {name!r}")
    if e.get("model_config") is not None and not isinstance(e["model_config"], dict):
        raise ValueError(f"encoder entry {name!r}: model_config must be a file name or a JSON object")
    return e


def _read_json(path: Path, what: str) -> Any:
    """The parsed JSON file at `path`; ValueError naming `what` and the path when it is missing or invalid."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None


def _register(entry: dict[str, Any]) -> str:
    """Add a validated entry; re-adding the same content is a no-op, rebinding a name is an error."""
    name = entry["name"]
    if name in _ENTRIES and _ENTRIES[name] != entry:
        raise ValueError(f"encoder {name!r} is already registered with a different configuration; "
                         "banks record encoders by name, so give the new configuration its own name")
    _ENTRIES[name] = entry
    return name


def _load_builtin() -> None:
    """Register every entry file in configs/ (files without a `family` are open_clip model configs)."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if "family" in data:
            _register(_validate(data, CONFIG_DIR))


def list_encoders() -> list[str]:
    """Names of the registered encoders, sorted."""
    return sorted(_ENTRIES)


def get_encoder_entry(name: str) -> dict[str, Any]:
    """A copy of the registry entry `name`; ValueError listing the known names if there is none."""
    if name not in _ENTRIES:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(list_encoders())} "
                         "(or bring your own: --encoder-config FILE, encoder_config_from_file)")
    return copy.deepcopy(_ENTRIES[name])


def read_encoder_entry(path_or_dict: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A checked, self-contained entry from a JSON file or a dict (a relative model_config path is resolved
    against the file's folder, or the working directory for a dict), checked against its library."""
    if isinstance(path_or_dict, dict):
        entry = _validate(path_or_dict, Path.cwd())
    else:
        path = Path(path_or_dict)
        entry = _validate(_read_json(path, "encoder config"), path.parent)
    _family(entry["family"]).check_entry(entry)
    return entry


def add_encoder_config(path_or_dict: str | os.PathLike | dict[str, Any]) -> str:
    """Register an entry in this process (see `read_encoder_entry`) and return its name.

    A build pins the entry into its job config, so Ray workers need no registration of their own.
    """
    return _register(read_encoder_entry(path_or_dict))


def encoder_config_from_file(path: str | os.PathLike, weights: str = "pretrained", seed: int = 0,
                             device: str = "auto") -> EncoderConfig:
    """An EncoderConfig carrying the whole entry in `path`; nothing is registered, nothing else is needed."""
    entry = read_encoder_entry(path)
    return EncoderConfig(name=entry["name"], weights=weights, seed=seed, device=device, entry=entry)


def _entry(config: EncoderConfig) -> dict[str, Any]:
    """The entry `config` carries (checked), or the one registered under its name."""
    return _validate(config.entry, None) if config.entry is not None else get_encoder_entry(config.name)


def _family(family: str) -> Any:
    """The module that builds models of `family` (imported on first use: it pulls in open_clip / timm)."""
    return importlib.import_module(FAMILIES[family])


def resolve_spec(config: EncoderConfig) -> EncoderSpec:
    """The spec `load_encoder(config)` will produce, without building a model."""
    e = _entry(config)
    untrained = config.weights == "untrained"
    if config.weights == "pretrained":
        if e["pretrained"] is None:
            raise EncoderWeightsError(
                f"encoder {e['name']!r} ({e['architecture']}) has no downloadable pretrained weights "
                f"(its registry entry has pretrained=null); {UNTRAINED_HINT}")
        # timm records the full model name it loads; open_clip the pretrained tag
        weights = e["pretrained"] if e["family"] == "open_clip" else f"{e['architecture']}.{e['pretrained']}"
    else:
        weights = config.weights
    return EncoderSpec(
        name=e["name"], family=e["family"], architecture=e["architecture"], weights=weights,
        untrained=untrained, seed=config.seed if untrained else None, image_size=e["image_size"],
        patch_size=e["patch_size"], visual_dim=e["visual_dim"], text_dim=e["text_dim"],
        mean=tuple(float(v) for v in e["mean"]), std=tuple(float(v) for v in e["std"]), entry=e,
        note=e.get("note"))


def load_encoder(config: EncoderConfig) -> Encoder:
    """Build the encoder `config` names, with the weights it asks for, in eval mode on its device."""
    spec = resolve_spec(config)
    entry = spec.entry
    family = _family(entry["family"])
    family.check_entry(entry)
    if spec.untrained:
        logger.warning("encoder %s runs with UNTRAINED weights (seed %d): its embeddings carry no learned "
                       "semantics; the bank's spec records untrained=True", spec.name, config.seed)
        # fork_rng: seeding must not disturb the caller's global RNG stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = family.build_model(entry)
    else:
        model = _load_weights(family, entry, config.weights)
    _check_dims(spec, family.model_dims(model))
    device = resolve_device(config.device)
    return family.ENCODER_CLASS(model.to(device).eval(), spec, device)


def _load_weights(family: Any, entry: dict[str, Any], weights: str) -> torch.nn.Module:
    """Build with the entry's pretrained tag or a local checkpoint file; EncoderWeightsError when that fails."""
    name, arch = entry["name"], entry["architecture"]
    if weights == "pretrained":
        what, kwargs = f"pretrained weights {entry['pretrained']!r}", {"tag": entry["pretrained"]}
    elif not os.path.isfile(weights):
        raise EncoderWeightsError(
            f"checkpoint {weights!r} for encoder {name!r} is not a file; weights must be 'pretrained', "
            f"'untrained' or the path of a local checkpoint. Fix the path, or {UNTRAINED_HINT}")
    else:
        what, kwargs = f"checkpoint {weights!r}", {"checkpoint": weights}
    try:
        return family.build_model(entry, **kwargs)
    except Exception as err:  # any download / parse / key error means these weights are unusable
        raise EncoderWeightsError(
            f"could not load {what} for encoder {name!r} ({arch}): {type(err).__name__}: {str(err).rstrip('.')}. "
            f"Fetch the weights where there is network access (or point to them with a local path), "
            f"or {UNTRAINED_HINT}") from err


def _check_dims(spec: EncoderSpec, actual: dict[str, int | None]) -> None:
    """ValueError when the built model's sizes differ from what the registry entry promises."""
    wrong = {k: (getattr(spec, k), v) for k, v in actual.items() if getattr(spec, k) != v}
    if wrong:
        detail = ", ".join(f"{k}: entry {want} vs model {got}" for k, (want, got) in wrong.items())
        raise ValueError(f"encoder {spec.name!r} ({spec.architecture}) does not match its registry entry: {detail}")


# Runtime helpers shared by the family modules.

def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pixels_to_tensor(images: np.ndarray, spec: EncoderSpec, device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB → (B, 3, S, S) float32 on `device`, scaled to [0, 1], normalised by spec mean/std."""
    size = spec.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ValueError(f"encoder {spec.name!r} takes (B, {size}, {size}, 3) uint8 images, "
                         f"got {images.shape} {images.dtype}; resize them with embed.prepare_image")
    # uint8 crosses to the device (4x less transfer than float), the arithmetic happens there
    x = to_device(images, device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`. To CUDA it goes through pinned memory with a non-blocking copy, so
    the copy does not stall the host while the GPU still computes (torch's pinned-memory cache keeps the buffer
    until the copy is done; later work on the same stream waits for it)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (callers cast results back to float32); a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


_load_builtin()
