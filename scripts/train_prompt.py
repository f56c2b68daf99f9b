#!/usr/bin/env python
"""Train steersample's prompt testbed: a tiny StableDiffusion3Pipeline that memorises some prompts.

What it builds (``--out``, default ``steersample/assets/prompt``)
    A complete diffusers ``StableDiffusion3Pipeline`` folder, loadable offline with
    ``StableDiffusion3Pipeline.from_pretrained(out)``:

    - ``vae/``: a real ``AutoencoderKL`` (2 blocks, scale factor 2, 4 latent channels) fitted by
      this script to all 1,797 scikit-learn digits upscaled to 16x16 RGB (grey in 3 channels),
      as a generic codec is trained on far more data than any fine-tune. Its ``shift_factor`` and
      ``scaling_factor`` are set so the training latents have mean 0 and standard deviation 1.
    - ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``: the two tiny CLIP
      text encoders and character tokenizers of ``steersample.testing`` (random weights from a
      seed, frozen; CLIP context 16 tokens). No T5 (``text_encoder_3=None``).
    - ``transformer/``: a real ``SD3Transformer2DModel`` (width 64, 3 joint blocks, patch 2 on
      8x8x4 latents) trained here by flow matching (``SCIENCE.md``), with prompt dropout for CFG.
    - ``scheduler/``: the stock ``FlowMatchEulerDiscreteScheduler`` config.

    Beside the pipeline: ``reference/`` (a steersample store of the training latents, labels =
    prompt ids, its metadata names the prompts and the rare/frequent groups), ``heldout/`` (the
    same for the held-out digits), ``prompts.txt`` (one ``prompt<TAB>group`` a line) and
    ``metadata.json`` (split, training config, commit, wall time, evaluation).

    Without T5 the pipeline fills the T5 part of the text sequence with ``max_sequence_length``
    zero tokens (diffusers' default 256). The model is trained with none: call it with
    ``max_sequence_length=0`` (``steersample compare``/``audit`` read it from ``metadata.json``'s
    ``call`` entry). 256 zero tokens would make every step ~10x dearer on a CPU.

The prompts and the imbalanced split
    Prompt c is ``"a digit <name of c>"``. As for the digits default (``scripts/train_default.py``,
    whose split and git helpers this script reuses), the *rare* prompts (2, 4, 8) keep
    ``--rare-count`` training images, the *frequent* ones ``--frequent-count``; everything else
    is held out. Batches draw a prompt first (rare weight ``--rare-weight``), then one of its
    images: the model copies the rare prompts' few images and generalises on the others.

Determinism
    All randomness comes from ``--seed``; one thread (``--threads``) is the fastest and the
    bit-reproducible setting on the shared 2-core machine.

Example (the shipped testbed)::

    python scripts/train_prompt.py --out steersample/assets/prompt
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default as td  # noqa: E402  (the shared split and git helpers)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "steersample" / "assets" / "prompt"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a digit {name}" for name in NAMES)
CLIP_LENGTH = 16      # CLIP context of the tokenizers: "a digit seven" is 13 character tokens
IMAGE_SIZE = 16       # pixels; latents are 4 x 8 x 8
CALL = {"max_sequence_length": 0, "height": IMAGE_SIZE, "width": IMAGE_SIZE}


# ----------------------------------------------------------------------------- data
def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All scikit-learn digits as ``(1797, 3, 16, 16)`` RGB in [-1, 1] (bilinear x2), labels."""
    from steersample.data import load_digits

    x, y = load_digits()
    x = F.interpolate(x, scale_factor=IMAGE_SIZE // 8, mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).expand(-1, 3, -1, -1).contiguous(), y


# ----------------------------------------------------------------------------- VAE
def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, sample_size=IMAGE_SIZE, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        shift_factor=0.0, scaling_factor=1.0,
    )


def fit_vae(images: torch.Tensor, args: argparse.Namespace, g: torch.Generator):
    """Fit the autoencoder: ℓ2 reconstruction of a posterior sample + ``--vae-kl`` x KL; then set
    shift/scale so that the mode latents of ``images`` have mean 0 and standard deviation 1."""
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    start = time.time()
    for step in range(1, args.vae_steps + 1):
        x = images[torch.randint(len(images), (args.vae_batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + args.vae_kl * post.kl().mean() / z[0].numel()
        lr = args.vae_lr * (0.5 * (1 + math.cos(math.pi * step / args.vae_steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.vae_steps:
            print(f"vae step {step:5d}  loss {loss.item():.5f}  {time.time() - start:6.1f} s", flush=True)
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
        recon = torch.cat([vae.decode(z[i:i + 256]).sample for i in range(0, len(z), 256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    mse = float(F.mse_loss(recon.clamp(-1, 1), images))
    print(f"vae: round-trip MSE {mse:.5f} (pixels in [-1, 1]), shift {vae.config.shift_factor:.4f}, "
          f"scale {vae.config.scaling_factor:.4f}, {time.time() - start:.1f} s", flush=True)
    return vae, {"round_trip_mse": mse, "seconds": time.time() - start}


# ----------------------------------------------------------------------------- pipeline
def build_transformer(args: argparse.Namespace):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4,
        num_layers=args.layers, attention_head_dim=args.head_dim, num_attention_heads=args.heads,
        caption_projection_dim=args.heads * args.head_dim, joint_attention_dim=64,
        pooled_projection_dim=64,
    )


def build_pipeline(transformer, vae, seed: int):
    """StableDiffusion3Pipeline around ``transformer`` and ``vae`` with steersample.testing's
    tiny CLIP encoders (hidden 32 each: 64 = the transformer's joint_attention_dim)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from steersample.testing import clip_tokenizer, tiny_clip_text_encoder

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=tiny_clip_text_encoder(True, seed=seed), tokenizer=clip_tokenizer(CLIP_LENGTH),
        text_encoder_2=tiny_clip_text_encoder(True, seed=seed + 1),
        tokenizer_2=clip_tokenizer(CLIP_LENGTH), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def prompt_table(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the ten prompts and of "" (row 10, the CFG null): ``(11, L, 64)``, ``(11, 64)``,
    exactly as the pipeline computes them at sampling time."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=[*PROMPTS, ""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=CALL["max_sequence_length"], device=torch.device("cpu"))
    return embeds, pooled


def fit_transformer(model, args, latents: torch.Tensor, labels: torch.Tensor, embeds, pooled, rare):
    """Flow matching on ``latents`` (N, 4, 8, 8), prompt ids ``labels``; ``model`` ends with its
    EMA weights, in eval mode."""
    g = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    by_class = [torch.nonzero(labels == c).flatten() for c in range(10)]
    sizes = torch.tensor([len(b) for b in by_class])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    order = torch.cat(by_class)
    weights = torch.tensor([args.rare_weight if c in rare else 1.0 for c in range(10)])
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"transformer: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    start, running = time.time(), 0.0
    null = len(PROMPTS)
    for step in range(1, args.steps + 1):
        cls = torch.multinomial(weights, args.batch_size, replacement=True, generator=g)
        idx = order[offsets[cls] + (torch.rand(args.batch_size, generator=g) * sizes[cls]).long()]
        x0 = latents[idx]
        drop = torch.rand(args.batch_size, generator=g) < args.prompt_dropout
        y = torch.where(drop, torch.full_like(cls, null), cls)
        sigma = torch.rand(args.batch_size, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        x_s = (1.0 - s) * x0 + s * eps
        warm = min(1.0, step / args.warmup)
        lr = args.lr * warm * (0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        v = model(hidden_states=x_s, timestep=sigma * 1000.0, encoder_hidden_states=embeds[y],
                  pooled_projections=pooled[y]).sample
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:6d}  loss {running / args.log_every:.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:7.1f} s", flush=True)
            running = 0.0
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    return model.eval(), time.time() - start


@torch.no_grad()
def quick_eval(pipe, train_latents: torch.Tensor, rare, args) -> dict:
    """Copy rate per prompt (ratio test d1/d2 < 1/3 in latent space vs the training latents)."""
    prompts = [p for p in PROMPTS for _ in range(args.eval_samples)]
    x = pipe(prompt=prompts, guidance_scale=args.eval_guidance, num_inference_steps=args.eval_steps,
             generator=torch.Generator().manual_seed(args.seed + 2), output_type="latent",
             **CALL).images.float()
    d = torch.cdist(x.flatten(1).double(), train_latents.flatten(1).double()).topk(2, largest=False).values
    copy = (d[:, 0] / d[:, 1].clamp_min(1e-12) < 1 / 3).float().view(10, -1).mean(1)
    per = {PROMPTS[c]: round(float(copy[c]), 3) for c in range(10)}
    rare_m = torch.tensor([c in rare for c in range(10)])
    return {"copy_rate": per, "rare_copy_rate": float(copy[rare_m].mean()),
            "frequent_copy_rate": float(copy[~rare_m].mean())}


# ----------------------------------------------------------------------------- main
def train(args: argparse.Namespace) -> dict:
    from steersample.reference.encode import encode_pixels

    state = td.git_state()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    images, labels = digit_images()
    rare = tuple(sorted(args.rare_classes))
    train_idx, held_idx = td.imbalanced_split(labels, rare, args.rare_count, args.frequent_count, args.seed)
    print(f"train {len(train_idx)} images (rare {rare} x {args.rare_count}, frequent x "
          f"{args.frequent_count}), held out {len(held_idx)}", flush=True)
    torch.manual_seed(args.seed)
    vae, vae_result = fit_vae(images, args, torch.Generator().manual_seed(args.seed))
    latents = torch.cat([encode_pixels(vae, images[i:i + 256]) for i in range(0, len(images), 256)])
    torch.manual_seed(args.seed + 1)  # transformer initialisation only
    pipe = build_pipeline(build_transformer(args), vae, args.seed)
    embeds, pooled = prompt_table(pipe)
    _, seconds = fit_transformer(pipe.transformer, args, latents[train_idx], labels[train_idx],
                                 embeds, pooled, rare)
    result = {"vae": vae_result, "transformer_seconds": seconds, "threads": args.threads}
    if args.eval_samples > 0:
        result["eval"] = quick_eval(pipe, latents[train_idx], rare, args)
        print(json.dumps(result["eval"], indent=1), flush=True)
    result["wall_seconds"] = time.time() - t0
    if args.out is not None:
        save(pipe, args, latents, labels, train_idx, held_idx, rare, result, state)
    return result


def save(pipe, args, latents, labels, train_idx, held_idx, rare, result, state) -> None:
    from steersample.reference.store import write_store

    out = Path(args.out)
    for sub in ("reference", "heldout"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)   # a store is rewritten whole, not resumed
    pipe.save_pretrained(out, safe_serialization=True)
    groups = {"rare": [PROMPTS[c] for c in rare],
              "frequent": [PROMPTS[c] for c in range(10) if c not in rare]}
    meta = {"prompts": list(PROMPTS), "groups": groups}
    write_store(out / "reference", latents[train_idx], labels[train_idx],
                metadata={**meta, "description": "training latents of the steersample prompt testbed"})
    write_store(out / "heldout", latents[held_idx], labels[held_idx],
                metadata={**meta, "description": "held-out digit latents of the prompt testbed"})
    group_of = {p: g for g, members in groups.items() for p in members}
    (out / "prompts.txt").write_text("".join(f"{p}\t{group_of[p]}\n" for p in PROMPTS))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "metadata.json").write_text(json.dumps({
        "description": "steersample prompt testbed: StableDiffusion3Pipeline on scikit-learn digits "
                       "upscaled to 16x16, prompts 'a digit <name>', imbalanced split",
        "call": CALL, "prompts": list(PROMPTS), "groups": groups,
        "rare_classes": list(rare), "frequent_classes": [c for c in range(10) if c not in rare],
        "null_class": len(PROMPTS),   # row of "" in the training embedding table (CFG)
        "testbed": "prompt", "class_names": list(PROMPTS),
        "split": {"train_indices": train_idx.tolist(), "held_out_indices": held_idx.tolist()},
        "training_config": config,
        "command": "python scripts/train_prompt.py " + " ".join(sys.argv[1:]),
        **state, "torch_version": torch.__version__, "result": result,
    }, indent=1) + "\n")
    print(f"saved to {out}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package asset)")
    a("--no-save", dest="out", action="store_const", const=None, help="train and evaluate only")
    a("--seed", type=int, default=0, help="seed for everything")
    a("--threads", type=int, default=1, help="torch CPU threads")
    a("--rare-classes", type=int, nargs="+", default=[2, 4, 8], help="digits of the rare prompts")
    a("--rare-count", type=int, default=5, help="training images per rare prompt")
    a("--frequent-count", type=int, default=130, help="training images per frequent prompt")
    a("--rare-weight", type=float, default=4.0, help="batch weight of a rare prompt (frequent: 1)")
    a("--vae-batch-size", type=int, default=64, help="autoencoder batch size")
    a("--vae-steps", type=int, default=800, help="autoencoder optimiser steps")
    a("--vae-lr", type=float, default=2e-3, help="autoencoder peak learning rate")
    a("--vae-kl", type=float, default=1e-4, help="KL weight (per latent value) of the autoencoder")
    a("--heads", type=int, default=2, help="attention heads")
    a("--head-dim", type=int, default=32, help="channels per head")
    a("--layers", type=int, default=3, help="joint transformer blocks")
    a("--steps", type=int, default=7000, help="transformer optimiser steps")
    a("--batch-size", type=int, default=128, help="transformer batch size")
    a("--lr", type=float, default=1e-3, help="transformer peak AdamW learning rate")
    a("--warmup", type=int, default=200, help="linear warm-up steps")
    a("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    a("--prompt-dropout", type=float, default=0.1, help="probability of the empty prompt (CFG)")
    a("--log-every", type=int, default=250, help="print the loss every N steps")
    a("--eval-samples", type=int, default=16, help="samples per prompt for the final check (0: skip)")
    a("--eval-steps", type=int, default=30, help="sampling steps for the final check")
    a("--eval-guidance", type=float, default=4.0, help="CFG scale for the final check")
    args = p.parse_args(argv)
    if not 1 <= args.rare_count <= 10:
        p.error(f"--rare-count must be in 1..10, got {args.rare_count}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    train(args)
    print(f"wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
