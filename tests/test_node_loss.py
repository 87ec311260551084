"""Node loss: a worker node of a multi-node Ray cluster dies mid-build (its encoder actor with it); the build
finishes and its bank is the bank of a clean build, row for row and byte for byte."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from tests.build_helpers import assert_same_bank, part_digests, read_bank, tiny_config


@pytest.fixture
def cluster():
    """A head of 1 CPU (the driver, decode and write tasks fit; an encoder of 1.5 CPUs does not) and two worker
    nodes of 2 CPUs: the encoder actor runs on a worker node, and another one is left to take its place."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_build_survives_losing_the_encoders_node(tmp_path, cluster):
    cluster, workers = cluster
    make_corpus(str(tmp_path / "corpus"), CorpusConfig(shards=6, samples_per_shard=4, image_size=96, seed=4))
    source = str(tmp_path / "corpus" / "*.tar")
    clean, lost = str(tmp_path / "clean"), str(tmp_path / "lost")
    assert build_bank(tiny_config(source, clean)).ok
    removed = []

    def remove_encoder_node(progress) -> None:
        # After the first encoded chunk, while shards are still to come: the node that runs the encoder goes.
        if removed or not progress.images or progress.shards_done >= progress.shards_total - 1:
            return
        # The encoder's node is its placement-group bundle's (the clean build's group is removed by now).
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        node_id = groups[0]["bundles_to_node_id"][0]
        node = next(w for w in workers if w.node_id == node_id)
        cluster.remove_node(node)
        removed.append(node_id)

    report = build_bank(tiny_config(source, lost), on_progress=remove_encoder_node)
    assert removed, "the node was never removed: the build ended before its first progress call with shards to go"
    assert report.ok and report.actor_restarts >= 1
    assert_same_bank(read_bank(lost), read_bank(clean))
    assert part_digests(lost) == part_digests(clean)
    # Segment ids come from the part ordinals: the same shards got the same ordinals.
    assert read_bank(lost)["segment_id"].to_pylist() == read_bank(clean)["segment_id"].to_pylist()
