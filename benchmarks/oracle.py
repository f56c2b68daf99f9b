"""Speed, memory and top-k accuracy of the exact empirical oracle (issue 2).

    python benchmarks/oracle.py            # N in {1e3, 1e4, 1e5} x D in {64, 1024, 4096}
    python benchmarks/oracle.py --quick    # N in {1e3, 1e4} x D in {64, 1024}, top-k at N = 1e4
    python benchmarks/oracle.py --top-k-only   # only the top-k table (N = 1e5)

What is measured (batch B = 16, float32 reference, CPU):
- ``ceiling``: the two same-shaped float32 matmuls no oracle can avoid, x @ R.T (B, N) and
  W @ R (B, D), each over the whole reference, timed in the same run as the oracle.
- ``exact@σ``: ``EmpiricalOracle(ref).evaluate(x, σ)`` (posterior, x̂₀*, v*) for forward-noised
  reference queries x = (1 - σ) x_k + σ ε at several σ. The work depends on σ: where the
  posterior is spread the exact weights are computed in float64 on every sample, where it is
  sharp only on the candidates.
- ``ratio``: the worst exact@σ / ceiling over the σ column set.
- ``peak extra``: the largest (VmHWM - VmRSS before the call) over the exact calls, where
  VmHWM (peak resident set) is reset via /proc/self/clear_refs before each call and
  malloc_trim(0) first returns freed heap to the OS. It counts every allocation the call
  makes (torch, FAISS, NumPy), including the one-time caches of a cold reference set (these
  calls run first and are not timed), and is compared with the reference's N * D * 4 bytes.
- top-k (largest N): ``EmpiricalOracle(ref, top_k=K, approximate=True)`` (FAISS IVF-Flat over
  a 128-d PCA projection, nlist = sqrt(N)), with K fixed, with K adaptive
  (``max_dropped=1e-4``) and adaptive with the tail estimate (``tail=True``), against exact at σ = σ* x {1, 0.9, 0.75, 0.5, 0.25}, σ* the measured
  ``PhaseProfile`` boundary (16 queries, 25 σ): time, speed-up, and the largest relative
  velocity error ||v_topk - v_exact|| / ||v_exact|| over the batch. The index build (once per
  reference set) is reported separately.

Data: a synthetic stand-in for image latents (i.i.d. Gaussian vectors make nearest-neighbour
search and the posterior degenerate): N / 100 cluster centres 0.8·U g in a random rank-32
subspace, members = centre + 0.5·V h (a shared rank-16 within-cluster subspace) + 0.2·ε, so the
per-coordinate variance is about 0.93. Seeded; generated in blocks.

Timing: each configuration is repeated ``--repeats`` times with ceiling, exact and top-k calls
interleaved, and the median wall-clock time is reported. ``--threads`` (default 1) sets torch
and FAISS threads: on a small machine shared with other jobs, multi-threaded small kernels
mostly measure contention.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import steersample as ss  # noqa: E402

BATCH = 16
SIGMAS = (0.95, 0.8, 0.5, 0.2, 0.05)
TOP_K_FACTORS = (1.0, 0.9, 0.75, 0.5, 0.25)   # σ = σ* x factor for the top-k comparison


def make_latents(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Clustered low-rank synthetic latents (see module docstring), float32 (n, dim)."""
    g = torch.Generator().manual_seed(seed)
    clusters = max(1, n // 100)
    basis = torch.randn(dim, 32, generator=g) / math.sqrt(32)
    within = torch.randn(dim, 16, generator=g) / math.sqrt(16)
    centres = 0.8 * torch.randn(clusters, 32, generator=g) @ basis.T
    out = torch.empty(n, dim)
    for start in range(0, n, 4096):
        stop = min(n, start + 4096)
        member = torch.arange(start, stop) % clusters
        out[start:stop] = (centres[member] + 0.5 * torch.randn(stop - start, 16, generator=g) @ within.T
                           + 0.2 * torch.randn(stop - start, dim, generator=g))
    return out


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def measure(fn):
    """Run ``fn()``; return (result, seconds, peak bytes above the resident set before it)."""
    peak = None
    if _LIBC is not None and Path("/proc/self/clear_refs").exists():
        _LIBC.malloc_trim(0)
        before = _status()["VmRSS"]
        Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    if _LIBC is not None and Path("/proc/self/clear_refs").exists():
        peak = _status()["VmHWM"] - before
    return result, seconds, peak


def queries(latents: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, latents.shape[0], (BATCH,), generator=g)
    eps = torch.randn(BATCH, latents.shape[1], generator=g)
    return (1 - sigma) * latents[k] + sigma * eps


def bench_exact(latents: torch.Tensor, repeats: int) -> dict:
    ref = ss.ReferenceSet(latents)
    oracle = ss.EmpiricalOracle(ref)
    xs = {s: queries(latents, s) for s in SIGMAS}
    # memory first, from a cold reference set: one-time caches (||x_i||^2, the float64 copy of
    # small sets) count as extra memory too
    peak = 0
    for s in SIGMAS:
        _, _, extra = measure(lambda s=s: oracle.evaluate(xs[s], s))
        peak = max(peak, extra or 0)
    w = torch.softmax(xs[0.5] @ latents.T, dim=1)
    times: dict[str, list[float]] = {"ceiling": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = xs[0.5] @ latents.T
        _ = w @ latents
        times["ceiling"].append(time.perf_counter() - t0)
        for s in SIGMAS:
            t0 = time.perf_counter()
            oracle.evaluate(xs[s], s)
            times.setdefault(s, []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median": med, "peak": peak, "ratio": max(med[s] for s in SIGMAS) / med["ceiling"]}


def bench_top_k(latents: torch.Tensor, repeats: int, top_k: int, nprobe: int | None) -> dict:
    ref = ss.ReferenceSet(latents)
    exact = ss.EmpiricalOracle(ref)
    profile = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(0), num_queries=BATCH,
                                       sigmas=torch.linspace(0.98, 0.02, 25))
    t0 = time.perf_counter()
    ref.build_ivf(nprobe=nprobe)
    build = time.perf_counter() - t0
    modes = {"fixed": ss.EmpiricalOracle(ref, top_k=top_k, approximate=True, max_dropped=None),
             "adaptive": ss.EmpiricalOracle(ref, top_k=top_k, approximate=True, max_dropped=1e-4),
             "tail": ss.EmpiricalOracle(ref, top_k=top_k, approximate=True, max_dropped=1e-4,
                                        tail=True)}
    from steersample.oracle._tail import tail_model

    t0 = time.perf_counter()
    tail_model(ref)                      # the rank-128 projection, once per reference set
    tail_build = time.perf_counter() - t0
    sigma_star = profile.boundary_sigma
    rows = []
    for factor in TOP_K_FACTORS:
        s = sigma_star * factor
        x = queries(latents, s, seed=2)
        times: dict[str, list[float]] = {}
        out: dict[str, torch.Tensor] = {}
        for _ in range(repeats):
            for name, oracle in [("exact", exact), *modes.items()]:
                t0 = time.perf_counter()
                out[name] = oracle.velocity(x, s)
                times.setdefault(name, []).append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        v = out["exact"]
        errors = {name: float(((out[name] - v).norm(dim=1) / v.norm(dim=1)).max()) for name in modes}
        rows.append((s, med, errors))
    index = ref.approximate_index
    return {"sigma_star": sigma_star, "build": build, "tail_build": tail_build, "rows": rows,
            "nlist": index.nlist,
            "nprobe": index.nprobe, "index_bytes": index.memory_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (about a minute)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default nlist // 8)")
    parser.add_argument("--top-k-only", action="store_true", help="skip the exact-oracle table")
    args = parser.parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [1000, 10000] if args.quick else [1000, 10000, 100000]
    dims = [64, 1024] if args.quick else [64, 1024, 4096]
    print(f"# oracle benchmark: batch {BATCH}, float32 reference, {args.threads} thread(s), "
          f"median of {args.repeats}, torch {torch.__version__}")
    head = (f"{'N':>7} {'D':>5} {'ref MB':>7} {'ceiling ms':>10} "
            + " ".join(f"{'exact@' + str(s):>11}" for s in SIGMAS)
            + f" {'ratio':>6} {'peak extra MB':>13} {'% of ref':>8}")
    print(head)
    for n in [] if args.top_k_only else sizes:
        for d in dims:
            latents = make_latents(n, d)
            r = bench_exact(latents, args.repeats)
            mb = latents.numel() * 4 / 2**20
            med = r["median"]
            print(f"{n:>7} {d:>5} {mb:>7.1f} {1e3 * med['ceiling']:>10.1f} "
                  + " ".join(f"{1e3 * med[s]:>11.1f}" for s in SIGMAS)
                  + f" {r['ratio']:>6.2f} {r['peak'] / 2**20:>13.1f} {100 * r['peak'] / (mb * 2**20):>7.1f}%",
                  flush=True)
            del latents
    n = sizes[-1]
    print(f"\n# top-k mode at N = {n}: K = {args.top_k} FAISS candidates (IVF-Flat over a 128-d PCA "
          f"projection), exact float64 weights on them; 'fixed' keeps K, 'adaptive' grows K until "
          f"the dropped-mass bound <= 1e-4 (exact pass beyond N/8); 'tail' is adaptive with "
          f"tail=True: queries over the bound get exact weights on 8K samples and an estimate of "
          f"the rest instead")
    print(f"{'D':>5} {'sigma*':>7} {'sigma':>7} {'exact ms':>9} {'fixed ms':>9} {'speed-up':>8} "
          f"{'max rel v err':>13} {'adaptive ms':>11} {'speed-up':>8} {'max rel v err':>13} "
          f"{'tail ms':>8} {'speed-up':>8} {'max rel v err':>13}")
    for d in dims:
        latents = make_latents(n, d)
        r = bench_top_k(latents, args.repeats, args.top_k, args.nprobe)
        for s, med, err in r["rows"]:
            print(f"{d:>5} {r['sigma_star']:>7.3f} {s:>7.3f} {1e3 * med['exact']:>9.1f} "
                  f"{1e3 * med['fixed']:>9.1f} {med['exact'] / med['fixed']:>8.1f} {err['fixed']:>13.2e} "
                  f"{1e3 * med['adaptive']:>11.1f} {med['exact'] / med['adaptive']:>8.1f} "
                  f"{err['adaptive']:>13.2e} {1e3 * med['tail']:>8.1f} "
                  f"{med['exact'] / med['tail']:>8.1f} {err['tail']:>13.2e}", flush=True)
        print(f"      (tail projection {r['tail_build']:.1f} s; "
              f"index: nlist={r['nlist']}, nprobe={r['nprobe']}, build {r['build']:.1f} s, "
              f"{r['index_bytes'] / 2**20:.0f} MB = {100 * r['index_bytes'] / (latents.numel() * 4):.1f}% "
              f"of the reference)")
        del latents
    return 0


if __name__ == "__main__":
    sys.exit(main())
