"""A small data-parallel sampling job for tests/test_distributed.py (run under accelerate launch).

    python tests/distributed_job.py OUT [--samples N] [--batch B] [--steps S]

Generates samples of the tiny class-conditional flow pipeline (seeds 0..N-1, labels k % 10),
sharded over processes by steersample.distributed, and on the main process writes
OUT/samples.safetensors and OUT/report.json (per-sample nearest reference and ratio test).
"""

import argparse
import json
from pathlib import Path

import torch

from steersample.distributed import Distributed, seeded_generators


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from safetensors.torch import save_file

    import steersample as ss
    from steersample.testing import tiny_flow_pipeline

    world = Distributed()
    pipe = tiny_flow_pipeline().to(world.device)
    reference = ss.ReferenceSet(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(args.samples) % 10

    def unit(items: range) -> dict[str, torch.Tensor]:
        out = pipe(class_labels=labels[items.start:items.stop].tolist(), guidance_scale=2.0,
                   num_inference_steps=args.steps, output_type="latent",
                   generator=seeded_generators(list(items), world.device))
        return {"samples": out.images.float(), "rank": torch.full((len(items),), world.rank)}

    merged = world.map(unit, args.samples, args.batch)
    if world.is_main:
        samples = merged["samples"]
        dist, idx = reference.nearest(samples, k=2)
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({"samples": samples.contiguous()}, str(args.out / "samples.safetensors"))
        report = {"world_size": world.world_size, "ranks": merged["rank"].tolist(),
                  "nearest": idx[:, 0].tolist(), "ratio": (dist[:, 0] / dist[:, 1]).tolist()}
        (args.out / "report.json").write_text(json.dumps(report, indent=1))
    world.wait()
    world.leave()   # helpers end here
    world.close()


if __name__ == "__main__":
    main()
