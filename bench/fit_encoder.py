"""Fitting speed of the stand-in encoder: seconds per training step with 1 and with 2 torch threads, one run.

Prints JSON. Both thread counts train copies of the same starting model on the same generated batches, in
alternating rounds, so load from other processes falls on both alike; ratio = 2-thread ÷ 1-thread seconds per
step (below 1: the second thread helps; above 1: it costs, as when other processes hold the cores).
cpu_s_per_step is this process's CPU time per step. The load average before and after is printed with them.

    python bench/fit_encoder.py --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bank_builder.encoders import load_encoder
from bank_builder.encoders.fit import FitConfig, _torch_threads, _train, prepare_segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per thread count per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of 1 and 2 threads")
    parser.add_argument("--images", type=int, default=128, help="generated training images (multiple of 64)")
    args = parser.parse_args()
    config = FitConfig()
    encoder = load_encoder(config.encoder)
    data = prepare_segments(replace(config.train, shards=max(1, args.images // 64)), "train", encoder.spec)
    wall = {1: 0.0, 2: 0.0}
    cpu = {1: 0.0, 2: 0.0}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for threads in (1, 2):
            model = copy.deepcopy(encoder.model)
            with _torch_threads(threads):
                start, start_cpu = time.perf_counter(), time.process_time()
                _train(model, encoder.spec, data, replace(config, steps=args.steps, threads=threads))
                wall[threads] += time.perf_counter() - start
                cpu[threads] += time.process_time() - start_cpu
    steps = args.steps * args.rounds
    print(json.dumps({
        "batch_images": config.batch_images, "steps_per_thread_count": steps,
        "s_per_step": {t: round(w / steps, 3) for t, w in wall.items()},
        "cpu_s_per_step": {t: round(c / steps, 3) for t, c in cpu.items()},
        "ratio_2_over_1": round(wall[2] / wall[1], 2),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }, indent=1))


if __name__ == "__main__":
    main()
