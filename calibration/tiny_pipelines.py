"""Tiny random SDXL-like, FLUX-schnell-like and SD1.5-like (LCM / PCM) diffusers pipelines, built offline
from configs.

Used by the demo, the tests and the benchmarks: no weight can be downloaded, so these stand in for the real
architectures (same component classes, same schedulers, tiny widths). Every Linear has in_features that is a
multiple of 64 so 4-bit group quantization applies. Random weights: the images they make are noise-like.
"""

from __future__ import annotations

import json

import torch

CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a watercolor painting of a dog in the snow",
    "portrait of an old man, highly detailed, dramatic lighting",
    "a futuristic city at night with neon lights",
    "a bowl of fruit on a wooden table, studio photo",
    "landscape with mountains, a lake and a blue sky",
    "a handwritten digit seven, thick stroke",
]


def clip_tokenizer(max_len: int = 77, vocab_size: int = 700):
    """A CLIP-style byte-level BPE (``</w>`` word ends) trained on CORPUS in a few ms."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    base = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}, merges=[])
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = base.backend_tokenizer.normalizer
    tok.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", special_tokens=[])
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
    for ch in sorted(alphabet):
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ")
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    for t in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(t, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_len)


def t5_tokenizer(max_len: int = 256):
    """A T5-style Unigram vocabulary: specials, CORPUS words, single characters."""
    import string

    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for w in sorted({w for s in CORPUS for w in s.replace(",", " ,").split()}):
        for p in ("\u2581" + w, w):
            if p not in seen:
                pieces.append((p, -4.0 - 0.1 * len(p)))
                seen.add(p)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        for p in (ch, "\u2581" + ch):
            if p not in seen:
                pieces.append((p, -10.0))
                seen.add(p)
    return T5TokenizerFast(vocab=pieces, extra_ids=8, model_max_length=max_len)


def _clip_text_config(tok, hidden=64, layers=2, heads=4, proj=64):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=tok.model_max_length, projection_dim=proj,
                          hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)


def tiny_vae(latent_channels: int = 4, flux: bool = False, scaling_factor: float | None = None):
    """4 levels -> vae_scale_factor 8, like the real SDXL / FLUX VAEs. ``scaling_factor`` overrides the
    SDXL value 0.13025 (SD1.5: 0.18215); ignored for ``flux``."""
    from diffusers import AutoencoderKL

    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
              latent_channels=latent_channels, norm_num_groups=8, sample_size=64)
    if flux:
        kw.update(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    else:
        kw.update(scaling_factor=0.13025 if scaling_factor is None else scaling_factor, force_upcast=False)
    return AutoencoderKL(**kw)


SDXL_TIME_DIM = 32  # 6·32 + 64 = 256


def tiny_sdxl_unet(cross_attention_dim: int = 128, pooled_dim: int = 64):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=cross_attention_dim, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM, projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + pooled_dim)


SD15_TIME_COND_DIM = 64  # LCM_Dreamshaper_v7: 256; a multiple of 64 keeps the cond_proj Linear quantizable


def tiny_sd15_unet(cross_attention_dim: int = 64, time_cond_proj_dim: int | None = None):
    """SD1.5 layout (cross-attention down blocks then a plain one, conv proj_in/out, no added embeddings);
    ``time_cond_proj_dim`` adds LCM's guidance w-embedding projection."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=8, use_linear_projection=False,
        norm_num_groups=8, cross_attention_dim=cross_attention_dim, time_cond_proj_dim=time_cond_proj_dim)


def _eval(pipe):
    # Models built from a config start in train mode (dropout); from_pretrained returns eval mode.
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl_pipeline(seed: int = 0):
    """Tiny SDXL-Turbo-like pipeline (EulerAncestral, trailing spacing, steps_offset 1 — sdxl-turbo's config)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1, tok2 = clip_tokenizer(), clip_tokenizer()
    te1 = CLIPTextModel(_clip_text_config(tok1))
    te2 = CLIPTextModelWithProjection(_clip_text_config(tok2))
    unet = tiny_sdxl_unet(te1.config.hidden_size + te2.config.hidden_size, te2.config.projection_dim)
    sched = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            timestep_spacing="trailing", steps_offset=1)
    return _eval(StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                           tokenizer_2=tok2, unet=unet, scheduler=sched))


def build_flux_pipeline(seed: int = 0):
    """Tiny FLUX.1[schnell]-like pipeline (FlowMatchEuler, shift 1, no dynamic shifting, no guidance embed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok1, tok2 = clip_tokenizer(), t5_tokenizer()
    te1 = CLIPTextModel(_clip_text_config(tok1))
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                  pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
                                  decoder_start_token_id=tok2.pad_token_id))
    latent = 16
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=latent * 4, num_layers=1, num_single_layers=2,
                                         attention_head_dim=32, num_attention_heads=2,
                                         joint_attention_dim=te2.config.d_model,
                                         pooled_projection_dim=te1.config.hidden_size, guidance_embeds=False,
                                         axes_dims_rope=(8, 12, 12))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return _eval(FluxPipeline(scheduler=sched, vae=tiny_vae(latent, flux=True), text_encoder=te1, tokenizer=tok1,
                              text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer))


def build_sd15_pipeline(seed: int = 0, lcm: bool = False):
    """Tiny SD1.5-layout pipeline (one CLIP text encoder, SD1.5 VAE scaling 0.18215, no safety checker), with
    the schedulers the official code ships for these families (scaled_linear 0.00085-0.012, eps, original_inference_steps 50; their
    4-step timesteps are 999, 759, 499, 259, whatever the spacing/offset fields say):

    * ``lcm=True``: SimianLuo/LCM_Dreamshaper_v7-like ``LatentConsistencyModelPipeline``: UNet with
      ``time_cond_proj_dim`` (guidance w-embedding, no CFG pass; run it at guidance 8 -> w = 7), LCMScheduler.
    * ``lcm=False``: PCM (SD1.5 + PCM LoRA)-like ``StableDiffusionPipeline`` with TCDScheduler (trailing spacing
      as in the PCM README; run it with guidance 0 and eta/gamma 0).
    """
    from ..qsched._compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # the SD pipelines import CLIPImageProcessor (as load_pipeline does)
    from diffusers import (LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline,
                           TCDScheduler)
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    te = CLIPTextModel(_clip_text_config(tok))
    unet = tiny_sd15_unet(te.config.hidden_size, SD15_TIME_COND_DIM if lcm else None)
    vae = tiny_vae(scaling_factor=0.18215)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                  original_inference_steps=50)
    if lcm:
        sched = LCMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
                             **common)
        cls = LatentConsistencyModelPipeline
    else:
        sched = TCDScheduler(timestep_spacing="trailing", steps_offset=1, **common)
        cls = StableDiffusionPipeline
    return _eval(cls(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False))
