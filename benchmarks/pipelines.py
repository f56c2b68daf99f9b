"""Steered pipelines versus stock diffusers on tiny random SD3 and Flux models (CPU, offline).

Measures, in one process with the runs interleaved (round robin, rotating the start order, so
that load from other processes hits every arm alike):

1. overhead of the shared loop: steered pipeline at neutral settings versus the stock pipeline
   (same seed, outputs checked equal), median wall-time ratio; target <= 1.03. Reported as the
   median of per-round ratios (the two arms of a round run back to back, so shared-machine load
   cancels best), the ratio of medians and the ratio of minima;
2. savings of a CFG window: ``GuidanceSchedule(scale=w, window=(0.25, 0.75))`` (half the sigma
   range) versus full CFG on the same steered SD3 pipeline; target >= 20 % less wall time;
3. model evaluations counted by a forward pre-hook on the transformer (a call on k*B rows counts
   k, so SD3's batched CFG pass counts 2 and each Flux pass 1);
4. a diffusers cache hook (PyramidAttentionBroadcast, FirstBlockCache) together with a CFG
   window, against the stock Flux pipeline with the same hook (true CFG): the hook makes each
   transformer call cheaper, the window makes fewer calls, so the savings multiply. Each hook
   gets its own copy of the transformer (same seed, same weights), shared by its stock and
   steered pipelines; the timestep callback reads whichever of the two is running.

The models are random but wide enough that the transformer dominates the run time (the text
encoders and the VAE are the tiny test ones). Run: ``python benchmarks/pipelines.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from steersample.sampling.guidance import GuidanceSchedule
from steersample.pipelines import SteeredFluxPipeline, SteeredStableDiffusion3Pipeline
from steersample.testing import tiny_flux_pipeline, tiny_sd3_pipeline

__all__ = ["main"]


class EvalCounter:
    """Forward pre-hook on a transformer: evaluations = rows of each call / batch size."""

    def __init__(self, module: torch.nn.Module, batch: int):
        self.evals, self.batch = 0, batch
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.evals += kwargs["hidden_states"].shape[0] // self.batch

    def close(self) -> None:
        self._handle.remove()


def interleaved(arms: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Wall times of ``runs`` calls per arm, round robin with a rotating start (after 1 warm-up)."""
    names = list(arms)
    for name in names:
        arms[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    return times


def evals(pipe, call: Callable[[], object], batch: int) -> int:
    counter = EvalCounter(pipe.transformer, batch)
    try:
        call()
    finally:
        counter.close()
    return counter.evals


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per arm (after one warm-up)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per run")
    parser.add_argument("--batch", type=int, default=2, help="prompts per run")
    parser.add_argument("--width", type=int, default=256, help="transformer hidden size")
    parser.add_argument("--layers", type=int, default=2, help="transformer depth")
    parser.add_argument("--size", type=int, default=16,
                        help="SD3 latent side = Flux packed-token side (Flux images are 2x larger)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--cache-runs", type=int, default=None,
                        help="timed runs per arm of the cache-hook table (default: --runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompts = ["a red cat on a mat", "two dogs in the snow", "a blue house", "a tree"][: args.batch]
    prompts = (prompts * args.batch)[: args.batch]

    sd3 = tiny_sd3_pipeline(width=args.width, num_layers=args.layers, sample_size=args.size, head_dim=64)
    sd3_steered = SteeredStableDiffusion3Pipeline.from_pipe(sd3)
    flux = tiny_flux_pipeline(width=args.width, num_layers=args.layers, head_dim=64)
    flux_steered = SteeredFluxPipeline.from_pipe(flux)
    for pipe in (sd3_steered, flux_steered):
        pipe.set_progress_bar_config(disable=True)

    w = 5.0
    half = GuidanceSchedule(scale=w, window=(0.25, 0.75))
    sd3_kw = dict(prompt=prompts, height=args.size, width=args.size, num_inference_steps=args.steps,
                  output_type="latent", max_sequence_length=32)
    flux_kw = dict(prompt=prompts, negative_prompt="blurry", height=2 * args.size, width=2 * args.size,
                   num_inference_steps=args.steps, output_type="latent", max_sequence_length=32)

    def gen():
        return torch.Generator().manual_seed(0)

    def sd3_call(pipe, **kw):
        return lambda: pipe(**sd3_kw, **kw, generator=gen()).images

    def flux_call(pipe, **kw):
        return lambda: pipe(**flux_kw, **kw, generator=gen()).images

    calls = {
        "sd3 stock (CFG w=5)": (sd3, sd3_call(sd3, guidance_scale=w)),
        "sd3 steered neutral": (sd3_steered, sd3_call(sd3_steered, guidance_scale=w)),
        "sd3 steered window (0.25, 0.75]": (sd3_steered, sd3_call(sd3_steered, guidance=half)),
        "flux stock (true CFG w=5)": (flux, flux_call(flux, true_cfg_scale=w)),
        "flux steered neutral": (flux_steered, flux_call(flux_steered, true_cfg_scale=w)),
        "flux steered window (0.25, 0.75]": (flux_steered, flux_call(flux_steered, guidance=half)),
    }

    # parity check before timing: neutral steered output equals stock output
    def diff(a: str, b: str) -> float:
        return (calls[a][1]() - calls[b][1]()).abs().max().item()

    sd3_diff = diff("sd3 stock (CFG w=5)", "sd3 steered neutral")
    flux_diff = diff("flux stock (true CFG w=5)", "flux steered neutral")

    print(f"# steered vs stock pipelines (CPU, torch threads = {torch.get_num_threads()})\n")
    print(f"SD3: width {args.width}, {args.layers} layers, {args.size}x{args.size} latents; "
          f"Flux: width {args.width}, {args.layers}+{args.layers} layers, "
          f"{args.size}x{args.size} packed tokens; batch {args.batch}, {args.steps} steps, "
          f"{args.runs} timed runs per arm, interleaved\n")
    print(f"parity (max abs diff, latents): sd3 {sd3_diff:.2e}, flux {flux_diff:.2e}\n")

    print(row(["arm", "model evals (hook)", "median s", "min s", "max s"]))
    print(row(["---"] * 5))
    sd3_times = interleaved({k: c for k, (_, c) in calls.items() if k.startswith("sd3")}, args.runs)
    flux_times = interleaved({k: c for k, (_, c) in calls.items() if k.startswith("flux")}, args.runs)
    times = {**sd3_times, **flux_times}
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, (pipe, call) in calls.items():
        n = evals(pipe, call, args.batch)
        t = times[name]
        print(row([name, n, f"{medians[name]:.3f}", f"{min(t):.3f}", f"{max(t):.3f}"]))

    def ratio_of_medians(a: str, b: str) -> float:
        return medians[a] / medians[b]

    def median_of_ratios(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print()
    print(row(["ratio", "median of per-run ratios", "ratio of medians", "ratio of minima", "target"]))
    print(row(["---"] * 5))
    for label, a, b, target in [
        ("sd3 steered neutral / stock", "sd3 steered neutral", "sd3 stock (CFG w=5)", "<= 1.03"),
        ("flux steered neutral / stock", "flux steered neutral", "flux stock (true CFG w=5)", "<= 1.03"),
        ("sd3 half window / full CFG", "sd3 steered window (0.25, 0.75]", "sd3 steered neutral", "<= 0.80"),
        ("flux half window / full CFG", "flux steered window (0.25, 0.75]", "flux steered neutral", "(info)"),
    ]:
        minima = min(times[a]) / min(times[b])
        print(row([label, f"{median_of_ratios(a, b):.3f}", f"{ratio_of_medians(a, b):.3f}",
                   f"{minima:.3f}", target]))
    print()
    cache_table(args, flux_kw, flux, flux_call, w, half)
    return 0


def cache_table(args, flux_kw, flux, flux_call, w: float, window: GuidanceSchedule) -> None:
    """Table 4: a cache hook with and without a CFG window, against stock with the same hook."""
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    def running(pipes):
        return lambda: next((p.current_timestep for p in pipes if p.current_timestep is not None), None)

    hooks = {
        "PAB": lambda timestep: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=["transformer_blocks", "single_transformer_blocks"],
            current_timestep_callback=timestep),
        "FirstBlockCache": lambda timestep: FirstBlockCacheConfig(threshold=0.8),
    }
    calls = {"flux stock, no hook": (flux, flux_call(flux, true_cfg_scale=w))}
    for hook, config in hooks.items():
        stock = tiny_flux_pipeline(width=args.width, num_layers=args.layers, head_dim=64)
        steered = SteeredFluxPipeline.from_pipe(stock)
        steered.set_progress_bar_config(disable=True)
        stock.transformer.enable_cache(config(running([stock, steered])))
        calls[f"flux stock + {hook}"] = (stock, flux_call(stock, true_cfg_scale=w))
        calls[f"flux steered + {hook}, neutral"] = (steered, flux_call(steered, true_cfg_scale=w))
        calls[f"flux steered + {hook} + window (0.25, 0.75]"] = (steered, flux_call(steered, guidance=window))
    parity = {
        hook: (calls[f"flux stock + {hook}"][1]() - calls[f"flux steered + {hook}, neutral"][1]()).abs().max().item()
        for hook in hooks
    }
    runs = args.cache_runs or args.runs
    times = interleaved({k: c for k, (_, c) in calls.items()}, runs)
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = "flux stock, no hook"
    print(f"## cache hook x CFG window (Flux, true CFG w={w:g}, {runs} timed runs per arm, interleaved)\n")
    print("parity with the same hook (max abs diff, latents): "
          + ", ".join(f"{h} {d:.2e}" for h, d in parity.items()) + "\n")
    print(row(["arm", "model evals (hook)", "median s", "vs stock no hook", "vs stock + same hook"]))
    print(row(["---"] * 5))
    for name, (pipe, call) in calls.items():
        hook = next((h for h in hooks if f"+ {h}" in name), None)
        same = f"flux stock + {hook}" if hook else base
        print(row([name, evals(pipe, call, args.batch), f"{medians[name]:.3f}",
                   f"{medians[name] / medians[base]:.3f}", f"{medians[name] / medians[same]:.3f}"]))


if __name__ == "__main__":
    raise SystemExit(main())
