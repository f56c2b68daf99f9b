"""Scale benchmark (issue 9): store and index builds, index vs exact search, the top-k oracle at
N = 1e6, peak memory, and a data-parallel run with 1 versus 2 processes.

    python benchmarks/scale.py                  # N in {1e5, 1e6}: the numbers quoted in docs/scaling.md
    python benchmarks/scale.py --quick          # N in {1e4, 1e5}, smaller oracle set: a smoke run

Tables printed:
1. **build**: rows/s writing safetensors shards (``store.write_store``), keys/s building each
   FAISS index (training, adding, calibrating nprobe / efSearch for recall 0.95), and images/s
   through ``steersample index build --images`` with the tiny SD3 VAE (32x32 RGB, CPU).
2. **search** at N in {1e5, 1e6}, D = 256 keys (= the latents, ``pool=1``), k = 10, Q = 1000
   fresh queries in one batch: ms/query of ``ShardedReferenceSet.nearest(approximate=True)``
   (index + exact float64 re-ranking on the latents) and of exact FAISS brute force
   (``faiss.knn``, the BLAS GEMM path) on the same batch; recall@10 of the index against it.
3. **oracle** at N = 1e6, latents (1, 8, 8) (the embedded default's shape): ms per call of
   ``EmpiricalOracle(ref, top_k=64).evaluate(x, sigma)`` (the index chosen automatically: N is
   above ``AUTO_INDEX_MIN``; rows gathered from the memory-mapped shards) on B = 64 queries
   x = (1 - sigma) x0 + sigma eps (x0 fresh draws), with the default ``max_dropped=1e-4``
   (K grows until the dropped-mass bound holds, exact pass beyond N/8) and with fixed K
   (``max_dropped=None``); against one forward pass of the default model's transformer on the
   same batch (``load_default()``; its architecture from scripts/train_default.py with random
   weights when the trained default is not installed; the cost does not depend on the weights).
4. **memory**: peak resident set (VmHWM) of this process.
5. **processes**: ``steersample audit --grid quick`` with 1 process and with 2 processes
   (``accelerate launch``): wall time including start-up, the audit's own ``seconds_total``,
   and whether audit.json (less its wall clock) and the PNGs are identical.

Data ("structured synthetic"): images of smooth random fields. A rank-r basis of low-resolution
(side/4 x side/4) Gaussian patterns upsampled bilinearly; N/100 cluster centres 3·g in that
basis; members = centre + g' (unit spread inside the cluster) plus 0.05 per-pixel noise. So the
data lie near an r-dimensional smooth subspace with 1e4 clusters at N = 1e6, like image latents
and unlike i.i.d. Gaussians (for which nearest neighbours are meaningless). Queries are fresh
draws (not in the set). Seeded; generated in chunks.

Threads: ``--threads`` (default 1) for torch and FAISS, the same for every contender; the
machine is shared, and multi-threaded small kernels mostly measure contention.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- data
class Structured:
    """Seeded smooth-field images (see the module docstring), ``(n, 1, side, side)`` float32."""

    def __init__(self, n: int, side: int, rank: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        low = torch.randn(rank, 1, max(2, side // 4), max(2, side // 4), generator=g)
        basis = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
        self.basis = (basis.reshape(rank, -1) / basis.reshape(rank, -1).norm(dim=1, keepdim=True)) * math.sqrt(side)
        self.centres = 3.0 * torch.randn(max(1, n // 100), rank, generator=g)
        self.side, self.rank, self.seed = side, rank, seed

    def draw(self, n: int, stream: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream + 1)
        which = torch.randint(0, self.centres.shape[0], (n,), generator=g)
        z = self.centres[which] + torch.randn(n, self.rank, generator=g)
        x = z @ self.basis / math.sqrt(self.rank) + 0.05 * torch.randn(n, self.side * self.side, generator=g)
        return x.reshape(n, 1, self.side, self.side)


def make_store(folder: Path, n: int, side: int, shard: int = 65_536) -> tuple[Structured, float]:
    """Write n structured rows as a store; returns the generator and the seconds spent writing."""
    from steersample.reference.index import SearchKey
    from steersample.reference.store import StoreWriter

    data = Structured(n, side)
    sizes = [min(shard, n - i) for i in range(0, n, shard)]
    writer = StoreWriter(folder, sample_shape=(1, side, side), dtype="float32",
                         key=SearchKey(),
                         labelled=False, shard_sizes=sizes, plan={"source": "benchmark", "n": n})
    spent = 0.0
    for i, size in enumerate(sizes):
        if writer.done(i):  # a re-run with --work reuses the shards
            continue
        rows = data.draw(size, i)
        t0 = time.perf_counter()
        writer.write(i, rows)
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.finish({"data": "structured synthetic"})
    return data, spent + time.perf_counter() - t0


# ----------------------------------------------------------------------------- helpers
def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def timed(fn, repeats: int = 3):
    """Best wall time of ``repeats`` calls (one call when it takes over 2 s) and the last output."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if best > 2.0:
            break
    return best, out


# ----------------------------------------------------------------------------- sections
def search_section(work: Path, sizes: list[int], queries: int, build_rows: list) -> list[list]:
    import faiss

    from steersample.reference.index import exact_knn
    from steersample.reference.sharded import ShardedReferenceSet

    rows = []
    for n in sizes:
        folder = work / f"search-{n}"
        data, write_s = make_store(folder, n, 16)
        ref = ShardedReferenceSet.open(folder)
        t0 = time.perf_counter()
        index = ref.build_index(progress=False)
        build_s = time.perf_counter() - t0
        build_rows.append([f"store N={n:.0e} D=256", f"{n / write_s:,.0f} rows/s", f"{write_s:.1f} s"])
        build_rows.append([f"index {index.spec.factory(256)}", f"{n / build_s:,.0f} keys/s",
                           f"{build_s:.1f} s (breadth {index.spec.nprobe or index.spec.ef_search})"])
        q = data.draw(queries, 10_000)
        chunks = ref.key_chunks()
        exact_s, (_, truth) = timed(lambda: exact_knn(q.reshape(queries, -1).numpy(), chunks, 10), 2)
        flat = np.concatenate(chunks) if n <= 2_000_000 else None
        knn_s, _ = timed(lambda: faiss.knn(q.reshape(queries, -1).numpy(), flat, 10), 2)
        exact_s = min(exact_s, knn_s)
        del flat
        index_s, (_, found) = timed(lambda: ref.nearest(q, k=10, approximate=True), 3)
        raw_s, _ = timed(lambda: index.search(ref.key(q).numpy(), 10), 3)
        recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))
        rows.append([f"{n:.0e}", index.spec.factory(256), 1e3 * exact_s / queries,
                     1e3 * raw_s / queries, 1e3 * index_s / queries, f"{exact_s / index_s:.1f}x",
                     f"{recall:.3f}"])
        del ref, index, chunks
        gc.collect()
    return rows


def default_transformer():
    """(transformer, note): the trained default when installed, else its architecture."""
    try:
        from steersample.default import load_default

        pipe, _ = load_default()
        return pipe.transformer, "trained default (load_default)"
    except Exception as err:  # not built yet
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1,
                                      out_channels=1, num_layers=2, sample_size=8, patch_size=2,
                                      num_embeds_ada_norm=10, norm_num_groups=1, dropout=0.0).eval()
        return model, f"default architecture, random weights ({type(err).__name__}: default not installed)"


def oracle_section(work: Path, n: int, batch: int) -> tuple[list[list], str]:
    import steersample as ss
    from steersample.reference.sharded import ShardedReferenceSet

    folder = work / f"oracle-{n}"
    data, _ = make_store(folder, n, 8)
    ref = ShardedReferenceSet.open(folder)
    if ref.index is None:
        ref.build_index(progress=False)
    model, note = default_transformer()
    x0 = data.draw(batch, 20_000)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(batch) % 10
    t_model = torch.full((batch,), 500.0)

    def forward():
        with torch.no_grad():
            return model(x0, timestep=t_model, class_labels=labels)

    rows = []
    for sigma in (0.9, 0.6, 0.3, 0.1, 0.03):
        x = (1 - sigma) * x0 + sigma * eps
        # approximate=None (the default): the store's index, since N > AUTO_INDEX_MIN
        oracles = [ss.EmpiricalOracle(ref, top_k=64, max_dropped=m) for m in (1e-4, None)]
        for oracle in oracles:
            oracle.evaluate(x, sigma)  # warm caches (squared norms, index pages)
        # interleaved rounds: the model and both oracles see the same machine load
        best, out = [math.inf, math.inf, math.inf], None
        for _ in range(3):
            for j, fn in enumerate([forward] + [lambda o=o: o.evaluate(x, sigma) for o in oracles]):
                if j and 2.0 < best[j] < math.inf:
                    continue  # slow (exact-pass) calls: once is enough
                t0 = time.perf_counter()
                result = fn()
                best[j] = min(best[j], time.perf_counter() - t0)
                out = result if j == 2 else out
        rows.append([sigma, 1e3 * best[1], f"{best[1] / best[0]:.2f}", 1e3 * best[2],
                     f"{best[2] / best[0]:.2f}", 1e3 * best[0], f"{float(out.posterior.top1.mean()):.2f}"])
    return rows, note


def encode_section(work: Path, count: int) -> list:
    from PIL import Image

    from steersample.cli import main
    from steersample.testing import tiny_vae

    images = work / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    tiny_vae().save_pretrained(work / "vae")
    t0 = time.perf_counter()
    main(["index", "build", str(work / "encoded"), "--images", str(images), "--vae", str(work / "vae"),
          "--shard-size", "256", "--batch-size", "32", "--pool", "2", "--no-progress"])
    spent = time.perf_counter() - t0
    return [f"encode {count} imgs 32x32 (tiny VAE)", f"{count / spent:,.0f} img/s", f"{spent:.1f} s"]


def process_section(work: Path, quick: bool) -> tuple[list[list], str]:
    """``steersample audit --grid quick`` with 1 and 2 processes: wall time (with start-up),
    the audit's own time (``seconds_total``), and whether audit.json and the PNGs agree."""
    from steersample.distributed import launch_command

    model, note = [], "the embedded default model"
    try:
        from steersample.default import load_default

        load_default()
    except Exception as err:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_distributed import tiny_model_folder

        model = ["--model", str(tiny_model_folder(work / "tiny-model"))]
        note = f"a tiny random DiT folder (default not installed: {type(err).__name__})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["audit", *model, "--grid", "quick", "--rare-samples", "8" if quick else "32",
            "--frequent-samples", "4" if quick else "16", "--steps", "10" if quick else "30",
            "--timing-repeats", "0", "--batch-size", "16", "--no-progress"]
    rows, reports = [], []
    for procs in (1, 2):
        out = work / f"audit{procs}"
        cmd = [sys.executable, "-m", "steersample.cli", *args, "--out", str(out)]
        if procs == 2:
            cmd = launch_command(2, "-m", "steersample.cli", *args, "--out", str(out),
                                 port=29_000 + os.getpid() % 1000)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        report = json.loads((out / "audit.json").read_text())
        rows.append([procs, f"{wall:.1f} s", f"{report.pop('seconds_total'):.1f} s"])
        reports.append((report, (out / "sheet.png").read_bytes(), (out / "pareto.png").read_bytes()))
    same = "identical" if reports[0] == reports[1] else "DIFFERENT"
    for r in rows:
        r.append(same)
    return rows, note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N in {1e4, 1e5}: a smoke run")
    p.add_argument("--sizes", type=float, nargs="+", default=None, help="override the N values")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--skip", nargs="*", default=[], choices=["search", "oracle", "encode", "processes"])
    args = p.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [10_000, 100_000] if args.quick else [100_000, 1_000_000]
    sizes = [int(v) for v in args.sizes] if args.sizes else sizes
    work = args.work or Path(tempfile.mkdtemp(prefix="steersample-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"steersample scale benchmark: threads={args.threads}, torch {torch.__version__}, "
          f"faiss {faiss.__version__}, {os.cpu_count()} CPUs, scratch {work}")
    build_rows: list = []
    if "encode" not in args.skip:
        build_rows.append(encode_section(work, 256 if args.quick else 1024))
    if "search" not in args.skip:
        rows = search_section(work, sizes, args.queries, build_rows)
        table(f"search: k=10, D=256 keys, Q={args.queries} fresh queries in one batch (ms per query)",
              ["N", "index", "exact ms", "index raw ms", "index+rerank ms", "speed-up", "recall@10"], rows)
    if build_rows:
        table("build throughput", ["what", "rate", "time"], build_rows)
    if "oracle" not in args.skip:
        rows, note = oracle_section(work, sizes[-1], 64)
        table(f"top-k oracle at N={sizes[-1]:.0e}, latents (1, 8, 8), B=64, K=64 (ms per call, best of 3 "
              f"interleaved rounds; x model = oracle / one forward of the default model on the same "
              f"batch, timed in the same rounds)\n"
              f"model: {note}",
              ["sigma", "adaptive K ms", "x model", "fixed K ms", "x model", "model fwd ms",
               "mean top-1"], rows)
    if "processes" not in args.skip:
        rows, note = process_section(work, args.quick)
        table(f"steersample audit --grid quick, 1 vs 2 processes (accelerate launch, 1 thread each), "
              f"model: {note}", ["processes", "wall incl. start-up", "audit seconds_total",
                                 "audit.json + PNGs"], rows)
    table("memory", ["peak resident set (VmHWM)"], [[f"{peak_rss_gib():.2f} GiB"]])


if __name__ == "__main__":
    main()
