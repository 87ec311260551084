"""Encoders behind one interface: dense visual features (B, C, g, g) and text features (N, D).

Registry entries (configs/*.json, or your own file via `encoder_config_from_file`) bind architecture,
weights and preprocessing; `load_encoder` builds one with pretrained, explicitly untrained (seeded) or
local-checkpoint weights.
"""

from bank_builder.encoders.base import Encoder, EncoderSpec
from bank_builder.encoders.registry import (
    EncoderWeightsError,
    add_encoder_config,
    encoder_config_from_file,
    get_encoder_entry,
    list_encoders,
    load_encoder,
    read_encoder_entry,
    resolve_spec,
)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "EncoderWeightsError",
    "add_encoder_config",
    "encoder_config_from_file",
    "get_encoder_entry",
    "list_encoders",
    "load_encoder",
    "read_encoder_entry",
    "resolve_spec",
]
