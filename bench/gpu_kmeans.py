"""The index's training step (`bank_builder.index.train.train_index`: spherical k-means of the coarse quantizer,
then the code) with k-means on GPU and on CPU, on the same vectors: seconds of each, and whether the two
quantizers are as good (mean inner product of every training vector with its nearest centroid). Prints JSON.

    python bench/gpu_kmeans.py --target-segments 1000000 --dim 512           # the training a 1M-segment bank gets
    python bench/gpu_kmeans.py --vectors 20000 --dim 64 --nlist 256 --cpu-only   # dry run

Vectors: clustered unit vectors (bench/synthetic_bank.py). The factory and sample size are the ones refbank
chooses for --target-segments vectors of --dim (IndexConfig defaults), unless --nlist / --vectors say otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

import bench_common  # noqa: E402 - first: it takes this folder off the path (bench/query.py shadows `query`)

bench_common.leave_bench_folder()
_bank = bench_common.sibling("synthetic_bank")


def quantizer_score(index, x: np.ndarray) -> float:
    """Mean inner product of x with its nearest coarse centroid (higher: a tighter quantizer)."""
    from bank_builder.format.trained import split_index

    _, ivf = split_index(index)
    scores, _ = ivf.quantizer.search(x, 1)
    return float(scores.mean())


def train(params, x: np.ndarray, gpu: bool) -> dict:
    """train_index with k-means on GPU (gpu) or CPU: seconds, where it ran, quantizer score."""
    from bank_builder.index import IndexConfig
    from bank_builder.index.train import train_index

    start = time.perf_counter()
    index, on_gpu = train_index(params, x, IndexConfig(use_gpu=gpu))
    return {"seconds": round(time.perf_counter() - start, 2), "kmeans_on_gpu": on_gpu,
            "quantizer_score": round(quantizer_score(index, x), 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target-segments", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vectors", type=int, default=None, help="training vectors (default: refbank's sample size)")
    p.add_argument("--nlist", type=int, default=None, help="lists (default: refbank's choice for the target)")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU run (dry run on a machine without one)")
    args = p.parse_args()

    import faiss

    from bank_builder.index import IndexConfig, choose_params

    params = choose_params(args.target_segments, args.dim, IndexConfig())
    if args.nlist:
        code = params.factory.split(",", 1)[1]
        params = replace(params, factory=f"IVF{args.nlist},{code}", nlist=args.nlist)
    n = args.vectors or params.n_train
    rng = np.random.default_rng(0)
    x = _bank.clustered(rng, _bank.unit(rng.standard_normal((1000, args.dim))), n, spread=1.25)
    out = {"faiss": faiss.__version__, "gpus_seen_by_faiss": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus")
           else 0, "factory": params.factory, "vectors": n, "dim": args.dim,
           "kmeans_iters": IndexConfig().kmeans_iters, "cpu": train(params, x, gpu=False)}
    if not args.cpu_only:
        out["gpu"] = train(params, x, gpu=True)
        out["speedup"] = round(out["cpu"]["seconds"] / out["gpu"]["seconds"], 2)
        out["score_ratio"] = round(out["gpu"]["quantizer_score"] / out["cpu"]["quantizer_score"], 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
