"""Local dimension: exact (JVP / VJP) versus randomised SVD, accuracy and cost.

    python benchmarks/geometry.py [--dim-side 16] [--channels 4] [--threads 2]

Two denoisers at D = channels * side^2:
* the empirical oracle of 2,000 points on a random 6-dim plane (fast spectral decay: 6 values
  near 1, the rest 0), at sigma = 0.3;
* a random-initialised tiny DiT (flat spectrum: every value near 1 - sigma), at sigma = 0.3.
For each: the exact spectrum (timed with forward and reverse AD), then the randomised estimate
for several ranks and power iterations: max |error| over the top-`rank` singular values, the
dimension count, products spent and wall seconds. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import time

import torch


def _row(name, res, exact, seconds):
    k = res.singular_values.numel()
    err = float((res.singular_values - exact.singular_values[:k]).abs().max())
    return (f"| {name} | {k} | {res.num_products} | {err:.2e} | {res.dimension} | "
            f"{'yes' if res.complete else 'no'} | {seconds:.2f} |")


def bench(label, denoise, x, sigma, configs):
    from steersample.geometry import local_dimension

    print(f"\n### {label} (D = {x[0].numel()}, sigma = {sigma})\n")
    exact = None
    for ad in ("forward", "reverse"):
        start = time.perf_counter()
        res = local_dimension(denoise, x, sigma, method="exact", ad=ad)
        print(f"exact ({ad} AD): {time.perf_counter() - start:.2f} s, {res.num_products} products, "
              f"dimension {res.dimension}, top values {res.singular_values[:4].tolist()}")
        exact = exact or res
    print("\n| randomised | rank | products | max abs error (top rank) | dimension | complete | seconds |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for rank, power in configs:
        start = time.perf_counter()
        res = local_dimension(denoise, x, sigma, method="randomized", rank=rank, power_iters=power,
                              generator=torch.Generator().manual_seed(0))
        print(_row(f"power_iters={power}", res, exact, time.perf_counter() - start))
    start = time.perf_counter()
    res = local_dimension(denoise, x, sigma, method="randomized", generator=torch.Generator().manual_seed(0))
    print(_row("adaptive (rank=None, power_iters=2)", res, exact, time.perf_counter() - start))
    print(f"\nexact dimension: {exact.dimension}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim-side", type=int, default=16)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from steersample.geometry import as_denoiser
    from steersample.reference.reference_set import ReferenceSet
    from steersample.testing import tiny_dit_transformer

    shape = (args.channels, args.dim_side, args.dim_side)
    D = args.channels * args.dim_side ** 2
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, 6, generator=g, dtype=torch.float64))[0]
    points = (torch.randn(2000, 6, generator=g, dtype=torch.float64) @ basis.T).reshape(2000, *shape)
    oracle = as_denoiser(ReferenceSet(points))
    x = 0.7 * points[:1] + 0.3 * torch.randn(1, *shape, generator=g, dtype=torch.float64)
    bench("oracle, 2,000 points on a 6-dim plane", oracle, x, 0.3,
          [(8, 0), (8, 1), (8, 2), (16, 2)])

    model = tiny_dit_transformer(in_channels=args.channels, sample_size=args.dim_side, width=64,
                                 num_layers=2)
    dit = as_denoiser(model, labels=3)
    x = torch.randn(1, *shape, generator=g)
    bench("tiny DiT, random init", dit, x, 0.3, [(32, 0), (32, 2), (128, 2), (256, 2)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
