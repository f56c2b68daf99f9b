"""Cost of the recommended steering against plain CFG, on rare-class batches (the worst case).

    python benchmarks/steering_cost.py [--model digits|letters|FOLDER] [--repeats 7] [--batch 192]

The audit times each method in 3 interleaved passes on a shared machine, and its "time vs
plain" column moves by 0.1-0.3 between runs. This benchmark times, interleaved ``--repeats``
times on one batch of rare-class samples (30 steps, CFG 4, no telemetry): plain CFG,
``NoveltySteering()`` with constant CFG, ``ss.recommended_steering`` (the same with CFG in
navigation only) and ``AttractorRepulsion(0.5)``, and prints min and median wall seconds and
their ratio to plain. Only scarce-class samples are steered, so a batch of them is the most a
steerer can cost; frequent-class samples cost what plain costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="'digits' (default), 'letters' or a model folder")
    p.add_argument("--repeats", type=int, default=7, help="interleaved passes (7)")
    p.add_argument("--batch", type=int, default=192, help="rare-class samples per call (192)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    args = p.parse_args()
    if args.repeats < 1 or args.batch < 1:
        p.error("--repeats and --batch must be positive")
    torch.set_num_threads(args.threads)

    import steersample as ss
    from steersample.default import load_default_info

    path = None if args.model == "digits" else args.model
    pipe, ref = ss.load_default(path)
    rare = list(load_default_info(path).rare_classes)
    labels = torch.tensor(rare).repeat(-(-args.batch // len(rare)))[:args.batch]
    recommended = ss.recommended_steering(ref, scale=4.0)
    arms = {
        "plain CFG 4": (ss.GuidanceSchedule.constant(4.0), None),
        "NoveltySteering(), constant CFG": (ss.GuidanceSchedule.constant(4.0), [ss.NoveltySteering()]),
        "recommended (CFG in navigation + NoveltySteering())": (recommended["guidance"],
                                                                 recommended["steering"]),
        "AttractorRepulsion(0.5)": (ss.GuidanceSchedule.constant(4.0), [ss.AttractorRepulsion(0.5)]),
    }

    def run(guidance, steering) -> float:
        gens = [torch.Generator().manual_seed(k) for k in range(len(labels))]
        start = time.perf_counter()
        pipe(class_labels=labels, num_inference_steps=30, guidance=guidance, steering=steering,
             reference=ref, generator=gens, output_type="latent", return_telemetry=False)
        return time.perf_counter() - start

    for guidance, steering in arms.values():   # warm-up: first-call allocations, lazy imports
        run(guidance, steering)
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, (guidance, steering) in arms.items():
            times[name].append(run(guidance, steering))
    base_min, base_med = min(times["plain CFG 4"]), statistics.median(times["plain CFG 4"])
    print(f"{args.model}: {args.batch} rare-class samples ({rare}), 30 steps, {args.repeats} interleaved "
          f"passes, {torch.get_num_threads()} threads")
    print("| arm | min s | median s | min vs plain | median vs plain |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        lo, med = min(values), statistics.median(values)
        print(f"| {name} | {lo:.2f} | {med:.2f} | {lo / base_min:.2f}x | {med / base_med:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
