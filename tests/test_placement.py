"""How a build sizes its encoder actors from the cluster, and `--gpus` for GPU nodes that are not up yet."""

from __future__ import annotations

import pytest

from bank_builder.config import PipelineConfig
from bank_builder.encoder_pool import EncoderStartError, plan_placement
from bank_builder.format import BankRef, current_version
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from tests.build_helpers import tiny_config


def test_gpus_asked_for_are_planned_though_none_is_up_yet(ray_local):
    # ray_local has 2 CPUs and no GPU: by default one CPU actor, torch threads from its reservation
    default = plan_placement(PipelineConfig())
    assert default.actors == 1 and "GPU" not in default.bundle and default.decode_cpus == 0.25
    assert default.threads == 2 and plan_placement(PipelineConfig(gpus=0)) == default
    # an autoscaling cluster starts its GPU nodes when the build asks for them: the plan must ask
    asked = plan_placement(PipelineConfig(gpus=3))
    assert asked.actors == 3 and asked.bundle == {"GPU": 1.0} and asked.actor_resources["num_gpus"] == 1
    assert asked.decode_cpus == 1.0


def test_a_build_whose_gpus_never_come_fails_with_the_reason_and_publishes_nothing(ray_local, tmp_path):
    make_corpus(str(tmp_path / "c"), CorpusConfig(shards=1, samples_per_shard=2, image_size=64))
    config = tiny_config(str(tmp_path / "c" / "*.tar"), str(tmp_path / "bank"), gpus=1, encoder_start_timeout_s=3)
    with pytest.raises(EncoderStartError, match=r"could not place 1 encoder actors of \{'GPU': 1.0\}"):
        build_bank(config)
    assert current_version(BankRef(str(tmp_path / "bank"))) is None
