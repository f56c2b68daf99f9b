"""Tiny offline model builders for tests and benchmarks (random weights, nothing downloaded).

diffusers' own fast tests fetch tokenizers and a T5 config from the Hub
(``hf-internal-testing/tiny-random-*``); these builders do not. Every model is built from an
inline config after ``torch.manual_seed(seed)``, so two calls with the same arguments give the
same weights, and tokenizers are built from a small in-memory vocabulary (lower-case letters,
digits and punctuation; CLIP lower-cases, T5 maps upper-case letters to ``<unk>``).

    pipe = tiny_sd3_pipeline()                      # StableDiffusion3Pipeline, text_encoder_3=None
    pipe = tiny_sd3_pipeline(pipeline_class=SteeredStableDiffusion3Pipeline)
    pipe = tiny_flux_pipeline(scheduler=MyScheduler())
    dit = tiny_dit_transformer()                    # class-conditional DiT, 10 classes + null id 10

Sizes: ``width`` is the transformer's hidden size, ``num_layers`` its depth and ``sample_size``
the latent side (the VAE has a scale factor of 1, so images are ``sample_size`` pixels wide).
Benchmarks raise ``width``/``num_layers`` so that the transformer dominates the run time.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "VOCAB_CHARS",
    "clip_tokenizer",
    "t5_tokenizer",
    "tiny_clip_text_encoder",
    "tiny_t5_encoder",
    "tiny_vae",
    "tiny_sd3_transformer",
    "tiny_flux_transformer",
    "tiny_dit_transformer",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_flow_pipeline",
]

VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
_CLIP_HIDDEN = 32
_CLIP_PROJECTION = 32
_T5_DIM = 32


def clip_tokenizer(model_max_length: int = 77):
    """CLIP BPE tokenizer over single characters (no merges), ids ``0`` = BOS, ``1`` = EOS/pad.

    ``model_max_length`` must be set explicitly: SD3 and Flux pad CLIP input to it.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in VOCAB_CHARS:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512):
    """T5 (unigram) tokenizer over single characters, ids ``0`` = pad, ``1`` = EOS, ``2`` = unk."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in VOCAB_CHARS] + [("\u2581" + c, -3.5) for c in VOCAB_CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_clip_text_encoder(with_projection: bool = True, seed: int = 0):
    """CLIP text encoder (hidden 32, 2 layers, vocab 128) with or without the projection head."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=128,
        hidden_act="gelu",
        projection_dim=_CLIP_PROJECTION,
    )
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def tiny_t5_encoder(seed: int = 0):
    """T5 encoder (d_model 32, 2 layers, vocab 128), config inline (no Hub)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        d_ff=37,
        d_kv=8,
        d_model=_T5_DIM,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        vocab_size=128,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    """``AutoencoderKL`` with one block (scale factor 1), 3 image channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def tiny_sd3_transformer(
    width: int = 32, num_layers: int = 1, sample_size: int = 8, head_dim: int = 8, seed: int = 0
):
    """``SD3Transformer2DModel`` with hidden size ``width`` (heads of ``head_dim``), patch 1."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        caption_projection_dim=width,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=2 * _CLIP_PROJECTION,
        out_channels=4,
    ).eval()


def tiny_flux_transformer(
    width: int = 32,
    num_layers: int = 1,
    guidance_embeds: bool = False,
    head_dim: int = 16,
    seed: int = 0,
):
    """``FluxTransformer2DModel`` with hidden size ``width`` (heads of ``head_dim``, a multiple
    of 8), 4 packed channels, ``num_layers`` double- and ``num_layers`` single-stream blocks."""
    axes = [4, 4, 8] if head_dim == 16 else [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        num_single_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_CLIP_PROJECTION,
        axes_dims_rope=axes,
        guidance_embeds=guidance_embeds,
    ).eval()


def tiny_dit_transformer(
    num_classes: int = 10,
    sample_size: int = 8,
    in_channels: int = 1,
    width: int = 32,
    num_layers: int = 1,
    patch_size: int = 2,
    seed: int = 0,
):
    """Class-conditional ``DiTTransformer2DModel`` (pixel space by default).

    Label ids ``0 .. num_classes - 1`` are classes and ``num_classes`` is the null (CFG) class,
    the convention of diffusers' ``LabelEmbedding`` (table of ``num_classes + 1`` rows).
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=max(1, width // 16),
        attention_head_dim=16 if width >= 16 else width,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=1,
    )
    # freshly initialised adaLN-zero layers output zeros; perturb so tests see a real function
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def tiny_sd3_pipeline(
    scheduler: Any = None,
    *,
    pipeline_class: Any = None,
    width: int = 32,
    num_layers: int = 1,
    sample_size: int = 8,
    head_dim: int = 8,
    seed: int = 0,
):
    """A CPU SD3 pipeline: tiny transformer, two CLIP encoders, ``text_encoder_3=None``, tiny VAE.

    ``scheduler`` defaults to a stock ``FlowMatchEulerDiscreteScheduler()``; ``pipeline_class``
    defaults to ``StableDiffusion3Pipeline`` (pass a subclass to build it directly). Call it with
    ``height=width=sample_size``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipeline_class = pipeline_class or StableDiffusion3Pipeline
    pipe = pipeline_class(
        transformer=tiny_sd3_transformer(width, num_layers, sample_size, head_dim, seed=seed),
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=4, seed=seed),
        text_encoder=tiny_clip_text_encoder(True, seed=seed),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(True, seed=seed + 1),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(
    scheduler: Any = None,
    *,
    pipeline_class: Any = None,
    width: int = 32,
    num_layers: int = 1,
    guidance_embeds: bool = False,
    head_dim: int = 16,
    seed: int = 0,
):
    """A CPU Flux pipeline: tiny transformer, CLIP + T5 encoders, tiny VAE (1 latent channel).

    Images must have an even side (latents are packed in 2x2 patches), e.g. ``height=width=16``.
    ``guidance_embeds=True`` gives a guidance-distilled transformer (Flux-dev style).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipeline_class = pipeline_class or FluxPipeline
    pipe = pipeline_class(
        transformer=tiny_flux_transformer(width, num_layers, guidance_embeds, head_dim, seed=seed),
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=1, seed=seed),
        text_encoder=tiny_clip_text_encoder(False, seed=seed),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed=seed),
        tokenizer_2=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flow_pipeline(
    scheduler: Any = None,
    *,
    num_classes: int = 10,
    sample_size: int = 8,
    width: int = 32,
    num_layers: int = 1,
    vae: bool = False,
    seed: int = 0,
):
    """A ``SteeredFlowPipeline`` around :func:`tiny_dit_transformer`.

    Pixel space (1 channel) by default; ``vae=True`` adds a tiny 4-channel latent VAE (scale
    factor 1) and a 4-channel DiT.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steersample.pipelines import SteeredFlowPipeline

    channels = 4 if vae else 1
    pipe = SteeredFlowPipeline(
        transformer=tiny_dit_transformer(
            num_classes, sample_size, channels, width, num_layers, seed=seed
        ),
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=4, seed=seed) if vae else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
