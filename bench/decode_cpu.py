"""CPU time of decoding one shard in-process (`workers.decode_shard`: tar read, image decode, segments, resize,
soft masks), best of a few repeats, no Ray. Prints JSON. Compares code trees: run it with PYTHONPATH set to each.

    python bench/decode_cpu.py --workdir /tmp/decode-bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# bench/query.py would shadow the `query` package while this folder is on the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from bank_builder.batching import CPU_BATCH_SIZE, chunk_batches
from bank_builder.config import BuildConfig, EncoderConfig, PipelineConfig
from bank_builder.encoders import resolve_spec
from bank_builder.prepare import InputGeometry
from bank_builder.synthetic import CorpusConfig, make_corpus
from bank_builder.workers import decode_shard


def main() -> None:
    """Write one shard (once), decode it `--repeats` times, print the best CPU seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("decode-bench"))
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shard = args.workdir / "corpus" / "train-000000.tar"
    if not shard.exists():
        make_corpus(str(args.workdir / "corpus"), CorpusConfig(shards=1, samples_per_shard=args.images,
                                                               image_size=args.size, image_format="png"))
    config = BuildConfig(source=str(shard), bank=str(args.workdir / "bank"),
                         encoder=EncoderConfig(name="clip-vit-s32-alt", weights="untrained"),
                         pipeline=PipelineConfig(batch_size=CPU_BATCH_SIZE))  # what a CPU build sizes it to
    geometry = InputGeometry.of(resolve_spec(config.encoder))
    per_chunk = chunk_batches(config.pipeline, CPU_BATCH_SIZE, geometry.image_size)
    times = []
    for _ in range(args.repeats):
        start = time.process_time()
        outputs = sum(1 for _ in decode_shard(config.source, config, geometry, per_chunk))
        times.append(time.process_time() - start)
    print(json.dumps({"images": args.images, "size": args.size, "outputs": outputs, "cpu_s": [round(t, 3) for t in times],
                      "best_cpu_s": round(min(times), 3)}, indent=1))


if __name__ == "__main__":
    main()
