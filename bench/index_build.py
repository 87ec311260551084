"""Benchmark refbank's Ray index build against one monolithic faiss build; plot recall vs latency.

    python bench/index_build.py --vectors 1000000 --dim 64 --out bench-out/index

Both builds index the same synthetic bank (bench/synthetic_bank.py: Parquet parts written once, reused by later
runs with the same shape) with the same factory string and the same training sample, each in its own subprocess:
  monolithic  read every part into one float32 matrix, train, add_with_ids, faiss.write_index
  refbank     bank_builder.index.build_index on a fresh local Ray (2 CPUs here): list objects + directory
Memory: the parent samples the subprocess and all its descendants (driver, Ray workers, raylet, GCS, agents)
every 0.1 s with psutil and reports the peak of the summed PSS (shared pages, e.g. Ray's /dev/shm object
store, counted once), the peak of the summed RSS, and the largest single process; plus each driver's own
ru_maxrss. Build time of refbank's variant is reported with and without its extra stages (autotune, text).
Needs matplotlib for the plot (`pip install matplotlib==3.11.2`); prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

import bench_common  # noqa: E402 - first: it takes this folder off the path (bench/query.py shadows `query`)

bench_common.leave_bench_folder()
_bank = bench_common.sibling("synthetic_bank")
clustered, ensure_bank, ground_truth, read_all = _bank.clustered, _bank.ensure_bank, _bank.ground_truth, _bank.read_all

RAY_SYSTEM = ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--parts", type=int, default=50)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.25, help="cluster spread: larger = harder (more nprobe)")
    p.add_argument("--memory-target", type=int, default=40, help="bytes per vector, id included (auto factory)")
    p.add_argument("--factory", default=None, help="faiss factory string (default: refbank's automatic choice)")
    p.add_argument("--refine-factor", type=int, default=4,
                   help="0 = no refine (both builds store codes only); else both store float16 vectors too")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nprobes", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--out", default="bench-out/index")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant, alternating; fastest time, top memory")
    p.add_argument("--variant", choices=["monolithic", "refbank"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_for(args: argparse.Namespace):
    from bank_builder.index import IndexConfig, choose_params

    base = IndexConfig(memory_target_bytes_per_vector=args.memory_target, flat_below=0,
                       refine=args.refine_factor > 0, refine_factor=max(args.refine_factor, 1))
    factory = args.factory or choose_params(args.vectors, args.dim, base).factory
    return IndexConfig(**{**base.__dict__, "factory": factory})


# --- the two variants (each runs in its own subprocess) ------------------------------------------------------


def run_monolithic(args: argparse.Namespace, bank: str) -> dict:
    """One faiss index in one process: all vectors in memory, the same training sample as refbank's build.

    With refine, the index stores what refbank's lists store: ids, codes and float16 vectors
    (IndexIDMap(IndexRefine(the trained IVF, SQfp16)), i.e. factory "<factory>,Refine(SQfp16)" + ids)."""
    import faiss

    from bank_builder.format import BankRef, read_manifest
    from bank_builder.index import choose_params
    from bank_builder.index.train import plan_sample, train_index

    config, t0 = config_for(args), time.perf_counter()
    entries = sorted(read_manifest(BankRef(bank)).parts, key=lambda p: p.ordinal)
    x, ids = read_all(bank)
    t_read = time.perf_counter()
    params = choose_params(len(x), x.shape[1], config)
    plan, starts = plan_sample(entries, params.n_train, params.n_queries, config.seed), np.cumsum(
        [0] + [p.rows for p in entries])
    train_rows = np.concatenate([starts[i] + plan[p.name][0] for i, p in enumerate(entries)])
    index, _ = train_index(params, x[train_rows], config)
    if config.refine:
        refine = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefine(index, refine)  # the Python wrappers keep the wrapped indexes alive
    index = faiss.IndexIDMap(index)
    t_train = time.perf_counter()
    index.add_with_ids(x, ids)
    t_add = time.perf_counter()
    path = artifact(args, "monolithic", "faissindex")
    faiss.write_index(index, path)
    t_end = time.perf_counter()
    return {"factory": params.factory + (",Refine(SQfp16)" if config.refine else ""), "seconds": round(t_end - t0, 2),
            "stages_s": {"read": round(t_read - t0, 2), "train": round(t_train - t_read, 2),
                         "add": round(t_add - t_train, 2), "write": round(t_end - t_add, 2)},
            "index_bytes": os.path.getsize(path), "driver_ru_maxrss_mb": _ru_maxrss_mb()}


def run_refbank(args: argparse.Namespace, bank: str) -> dict:
    """bank_builder.index.build_index on a fresh local Ray."""
    import ray

    from bank_builder.index import build_index

    try:  # build_index starts a local Ray (2 CPUs on this machine)
        r = build_index(bank, config_for(args))
    finally:
        ray.shutdown()
    extra = r.timings_s.get("autotune", 0) + r.timings_s.get("text", 0)
    return {"factory": r.factory, "seconds": round(r.timings_s["total"], 2),
            "seconds_without_autotune_text": round(r.timings_s["total"] - extra, 2), "stages_s": r.timings_s,
            "list_objects": r.objects, "bytes": r.bytes, "nprobe": r.nprobe, "recall_at_10": r.recall_at_k,
            "version": r.version, "driver_ru_maxrss_mb": _ru_maxrss_mb()}


def artifact(args: argparse.Namespace, name: str, ext: str) -> str:
    """Path of an output file of this bank shape (runs of other shapes keep theirs)."""
    return os.path.join(args.out, f"{name}-{args.vectors}x{args.dim}.{ext}")


def _ru_maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- measuring a subprocess tree ------------------------------------------------------------------------------


def measured(cmd: list[str]) -> dict:
    """Run cmd; sample the memory of its whole process tree until it exits; its JSON result + memory peaks."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks = {"pss_mb": 0.0, "rss_mb": 0.0, "single_rss_mb": 0.0, "driver_and_workers_pss_mb": 0.0, "processes": 0}
    cpu: dict[int, float] = {}  # pid → user + system seconds, last seen (a busy shared machine skews wall time)
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(child.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total_pss = total_rss = single = own = 0.0
            for p in procs:
                try:
                    mem, cmdline, times = p.memory_full_info(), " ".join(p.cmdline()), p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                cpu[p.pid] = times.user + times.system
                total_pss, total_rss, single = total_pss + mem.pss, total_rss + mem.rss, max(single, mem.rss)
                if not any(s in cmdline for s in RAY_SYSTEM):
                    own += mem.pss
            for key, value in (("pss_mb", total_pss), ("rss_mb", total_rss), ("single_rss_mb", single),
                               ("driver_and_workers_pss_mb", own)):
                peaks[key] = max(peaks[key], round(value / 2**20, 1))
            peaks["processes"] = max(peaks["processes"], len(procs))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{cmd} failed with exit code {child.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(sum(cpu.values()), 1), "peak_memory": peaks}


# --- recall vs latency ----------------------------------------------------------------------------------------


def curves(args: argparse.Namespace, bank: str, centers: np.ndarray) -> dict:
    """recall@10 and ms/query per nprobe: refbank's search with refine and without, and the monolithic index."""
    import faiss

    from bank_builder.index.autotune import recall_at_k
    from query.bank import open_bank
    from query.lists import CacheConfig
    from query.search import BankSearcher

    queries = clustered(np.random.default_rng(123), centers, args.queries, args.spread)  # not bank vectors
    truth = ground_truth(bank, queries, 10)
    searcher = BankSearcher(open_bank(bank), CacheConfig(memory_bytes=1 << 40))
    mono = faiss.read_index(artifact(args, "monolithic", "faissindex"))
    nprobes = [n for n in map(int, args.nprobes.split(",")) if n <= searcher.nlist]
    searcher.search(queries[:10], 10, nprobe=searcher.nlist)  # load every list: measure search, not storage
    out: dict[str, list] = {"refbank_refine": [], "refbank": [], "monolithic_refine": [], "monolithic": []}
    refine = args.refine_factor
    for nprobe in nprobes:
        for name, fn in (("refbank_refine", lambda: searcher.search(queries, 10, nprobe, refine)),
                         ("refbank", lambda: searcher.search(queries, 10, nprobe, 0)),
                         ("monolithic_refine", lambda: _mono_search(mono, queries, nprobe, refine)),
                         ("monolithic", lambda: _mono_search(mono, queries, nprobe, 1))):
            if refine == 0 and name.endswith("_refine"):
                continue
            t = time.perf_counter()
            _, ids = fn()
            ms = 1000 * (time.perf_counter() - t) / len(queries)
            out[name].append({"nprobe": nprobe, "recall_at_10": round(recall_at_k(ids, truth), 4),
                              "ms_per_query": round(ms, 4)})
    return out


def _mono_search(index, queries: np.ndarray, nprobe: int, k_factor: int):
    """Search IDMap(IVF) or IDMap(Refine(IVF)); k_factor 1 re-ranks only the k found, so recall is the IVF's."""
    import faiss

    faiss.extract_index_ivf(index).nprobe = nprobe
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexRefine):
        inner.k_factor = k_factor
    return index.search(queries, 10)


def plot(data: dict, path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("refbank_refine", "o-"), ("refbank", "s-"), ("monolithic_refine", "v--"),
                        ("monolithic", "^--")):
        pts = data[name]
        if not pts:
            continue
        ax.plot([p["ms_per_query"] for p in pts], [p["recall_at_10"] for p in pts], style, label=name)
        for p in pts if name.startswith("refbank") else []:
            ax.annotate(str(p["nprobe"]), (p["ms_per_query"], p["recall_at_10"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="ms / query (batch of queries, 2 cores)", ylabel="recall@10 vs exact", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def build_seconds(run: dict) -> float:
    """What the time ratio compares: the whole build, less refbank's extra stages (autotune, text)."""
    return run.get("seconds_without_autotune_text", run["seconds"])


def best(runs: list[dict]) -> dict:
    """The fastest run, with the highest memory peaks over all runs and every run's time."""
    out = dict(min(runs, key=build_seconds))
    out["peak_memory"] = {key: max(r["peak_memory"][key] for r in runs) for key in runs[0]["peak_memory"]}
    out["all_seconds"] = [build_seconds(r) for r in runs]
    out["cpu_s"] = min(r["cpu_s"] for r in runs)
    return out


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    bank, centers = ensure_bank(args.out, args.vectors, args.dim, args.parts, args.clusters, args.spread)
    if args.variant:
        run = run_monolithic if args.variant == "monolithic" else run_refbank
        print(json.dumps(run(args, bank)))
        return
    base = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    runs: dict[str, list[dict]] = {"monolithic": [], "refbank": []}
    for _ in range(args.repeat):  # alternate, so load from other work on the machine hits both alike
        for variant in runs:
            runs[variant].append(measured(base + ["--variant", variant]))
    mono, ours = best(runs["monolithic"]), best(runs["refbank"])
    data = curves(args, bank, centers)
    title = f"{args.vectors:,} × {args.dim}, {ours['factory']}"
    png = plot(data, artifact(args, "recall_latency", "png"), title)
    ratio = {"time": round(ours["seconds_without_autotune_text"] / mono["seconds"], 3),
             "time_per_pair": [round(build_seconds(s) / build_seconds(m), 3)
                               for m, s in zip(runs["monolithic"], runs["refbank"])],
             "time_with_autotune_text": round(ours["seconds"] / mono["seconds"], 3),
             "time_excluding_train": round((ours["seconds_without_autotune_text"] - ours["stages_s"]["train"])
                                           / (mono["seconds"] - mono["stages_s"]["train"]), 3),
             "cpu_s": round(ours["cpu_s"] / mono["cpu_s"], 3),
             "peak_pss": round(ours["peak_memory"]["pss_mb"] / mono["peak_memory"]["pss_mb"], 3),
             "peak_single_process_rss": round(ours["peak_memory"]["single_rss_mb"] / mono["peak_memory"]["single_rss_mb"], 3)}
    print(json.dumps({"vectors": args.vectors, "dim": args.dim, "parts": args.parts, "cpus": os.cpu_count(),
                      "monolithic": mono, "refbank": ours, "refbank_over_monolithic": ratio, "curves": data,
                      "plot": png}, indent=1))


if __name__ == "__main__":
    main()
