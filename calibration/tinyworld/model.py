"""The tiny world's text-conditioned rectified-flow generator (FLUX-like in miniature, pixel space 1x16x16).

* ``TextEncoder``: word embeddings of the prompt (fixed 21-word vocabulary, ``data.VOCAB``), mean-pooled over
  the words, then a 2-layer MLP -> a 128-d pooled text vector. Trained jointly with the generator; stays in full
  precision (like CLIP/T5 in the paper, only the denoiser is quantized).
* ``TinyFlowNet``: the flattened image (256 values) -> ``x_embedder`` -> ``depth`` residual MLP blocks with
  adaLN modulation (shift, scale, gate) from ``time_text_embed(sigma) + context_embedder(text)`` -> ``norm_out``
  -> ``proj_out``. It predicts the velocity ``v = noise − x0`` of ``x = (1 − sigma)·x0 + sigma·noise``.
  Every ``nn.Linear`` has in_features a multiple of 64 (256, 512, 128), so 4-bit group-64 quantization applies
  everywhere. Layer names follow diffusers' FLUX transformer, so ``QUANT_SKIP`` (= qsched.quant's
  ``diffusers_flux`` skip list) keeps the embedders and the output projection in full precision; the quantized
  layers are the blocks' ``fc1``/``fc2`` and adaLN ``norm.linear``.
* ``FlowDenoiser``: the k-diffusion view, ``denoised = x − sigma·v`` for ``qsched.samplers`` with
  ``parameterization="flow"``. Model space is ``x0 = 2·pixels − 1`` (paper background = −1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data import IMAGE_SIZE, VOCAB, tokenize

QUANT_SKIP = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


@dataclass(frozen=True)
class FlowConfig:
    image_size: int = IMAGE_SIZE
    hidden: int = 256
    mlp_ratio: int = 2
    depth: int = 2
    cond_dim: int = 128
    text_dim: int = 128
    word_dim: int = 64
    freq_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


class TextEncoder(nn.Module):
    def __init__(self, word_dim: int = 64, text_dim: int = 128, vocab_size: int = len(VOCAB)):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(word_dim, text_dim), nn.SiLU(), nn.Linear(text_dim, text_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).float()[..., None]
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.mlp(pooled)

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        return self(tokenize(prompts).to(self.embed.weight.device))


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000·sigma (FLUX embeds t = 1000·sigma the same way)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = 1000.0 * sigma.float().reshape(-1, 1) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNBlock(nn.Module):
    def __init__(self, hidden: int, mlp_ratio: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm_linear = nn.Linear(cond_dim, 3 * hidden)
        self.fc1 = nn.Linear(hidden, hidden * mlp_ratio)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden * mlp_ratio, hidden)
        nn.init.zeros_(self.norm_linear.weight)
        nn.init.zeros_(self.norm_linear.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.norm_linear(c).chunk(3, dim=-1)
        return h + gate * self.fc2(self.act(self.fc1(self.norm(h) * (1 + scale) + shift)))


class TinyFlowNet(nn.Module):
    """``net(x [B,1,S,S], sigma [B], text [B, text_dim]) -> velocity [B,1,S,S]``."""

    def __init__(self, config: FlowConfig = FlowConfig()):
        super().__init__()
        self.config = config
        p, h, c = config.image_size ** 2, config.hidden, config.cond_dim
        self.x_embedder = nn.Linear(p, h)
        self.time_text_embed = nn.Sequential(nn.Linear(config.freq_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.context_embedder = nn.Linear(config.text_dim, c)
        self.blocks = nn.ModuleList(AdaLNBlock(h, config.mlp_ratio, c) for _ in range(config.depth))
        self.norm_out = nn.Linear(c, 2 * h)
        self.proj_out = nn.Linear(h, p)
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.act = nn.SiLU()
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        c = self.act(self.time_text_embed(timestep_embedding(sigma, self.config.freq_dim).to(x.dtype))
                     + self.context_embedder(text))
        h = self.x_embedder(x.reshape(b, -1))
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.norm_out(c).chunk(2, dim=-1)
        return self.proj_out(self.final_norm(h) * (1 + scale) + shift).reshape_as(x)


class FlowDenoiser:
    """k-diffusion denoiser for ``qsched.samplers`` (``parameterization="flow"``): ``model(x, sigma) = x − sigma·v``.

    ``text`` is the encoded prompt batch [B, text_dim] (``TextEncoder.encode``); extra sampler arguments (``seed``)
    are ignored. ``net`` may be the full-precision or a quantized copy of ``TinyFlowNet``."""

    def __init__(self, net: nn.Module, text: torch.Tensor):
        self.net, self.text = net, text

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_):
        if x.shape[0] != self.text.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} latents but {self.text.shape[0]} encoded prompts")
        sigma = sigma.reshape(-1).to(x.dtype)
        v = self.net(x, sigma, self.text)
        return x - sigma.reshape(-1, 1, 1, 1) * v


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    return pixels * 2.0 - 1.0


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
