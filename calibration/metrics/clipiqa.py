"""CLIP-IQA (Wang et al., AAAI 2023), zero-shot, as the paper's objective uses it (torchmetrics
``CLIPImageQualityAssessment(prompts=("quality",))``):

    score = softmax(100 * [cos(f, t_good), cos(f, t_bad)])[0],  t = "Good photo." / "Bad photo."

with ``f`` the CLIP RN50 image feature computed the way the original does: the image at its own
resolution (no resize, no crop), and the attention-pool **without positional embedding** (so any size
works). Pixels are 0..1 before CLIP normalisation (the official Q-Sched code fed 0..255 here; we don't).

Backends: ``open_clip`` (default; OpenAI ``RN50.pt``) or ``pyiqa`` (optional, non-commercial licence; needs
``pip install pyiqa``; its model is built from the tensors of the RN50 file read without running it). With pyiqa the
same single antonym pair is used (pyiqa's own default averages five pairs).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import weights as W
from .common import check_images, chunks, default_device_dtype, load_openai_clip, normalize, open_clip_tokenize, unit

WHAT = W.SPECS["clipiqa"].what
ANTONYMS = ("Good photo.", "Bad photo.")
LOGIT_SCALE = 100.0
MIN_SIZE = 32  # RN50 downsamples by 32


def attnpool_no_pos(pool, feats: torch.Tensor) -> torch.Tensor:
    """CLIP's attention pool with the positional embedding left out (CLIP-IQA's handling)."""
    x = feats.flatten(2).permute(2, 0, 1)  # (HW, N, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


class CLIPIQA:
    name = "clipiqa"
    range = (0.0, 1.0)

    def __init__(self, weights: str | os.PathLike | None = None, *, backend: str = "open_clip", device=None,
                 dtype=None, batch_size: int = 32):
        self.device, self.dtype = default_device_dtype(device, dtype)
        self.batch_size = batch_size
        path = W.resolve("clipiqa", weights)
        if backend == "open_clip":
            self.model = load_openai_clip(path, self.device, self.dtype, expect="resnet", what=WHAT)
            with torch.inference_mode():
                tokens = open_clip_tokenize(list(ANTONYMS), self.model.context_length).to(self.device)
                self.anchors = unit(self.model.encode_text(tokens))
            self._run = self._open_clip
        elif backend == "pyiqa":
            self._pyiqa = _load_pyiqa(path, self.device)
            self._run = self._pyiqa_run
        else:
            raise ValueError(f"CLIP-IQA backend must be 'open_clip' or 'pyiqa', got {backend!r}")

    def image_features(self, x01: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = normalize(x01.to(self.device)).to(self.dtype)
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        return attnpool_no_pos(v.attnpool, x)

    def _open_clip(self, x01):
        logits = LOGIT_SCALE * unit(self.image_features(x01)) @ self.anchors.t()
        return logits.softmax(dim=-1)[:, 0]

    def _pyiqa_run(self, x01):
        return self._pyiqa(x01.to(self.device)).reshape(-1).float()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        x = check_images(images, self.device)
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"CLIP-IQA needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[-2:])}")
        return torch.cat([self._run(x[s]) for s in chunks(x.shape[0], self.batch_size)]).float().cpu()


def _load_pyiqa(path, device):
    from .common import cached_model, file_key

    def build():
        from .safe_load import read_weights, state_dict_of

        try:
            import pyiqa
            from clip import tokenize  # openai-clip, a pyiqa dependency
            from pyiqa.archs import clip_model, clipiqa_arch
        except ImportError as exc:
            raise ImportError("the pyiqa CLIP-IQA backend needs `pip install pyiqa` (non-commercial licence); "
                              "the default backend='open_clip' does not") from exc
        # pyiqa's own loader opens the file with torch.jit.load, which would run a TorchScript archive's code: while
        # its metric is built, that loader is replaced by pyiqa's build_model over the tensors read here (no code).
        state_dict = state_dict_of(read_weights(path, WHAT), path, WHAT)

        def safe_load(name, device="cpu", *args, **kwargs):
            model = clip_model.build_model(dict(state_dict)).to(device)
            return model.float() if str(device) == "cpu" else model

        original = clipiqa_arch.load
        clipiqa_arch.load = safe_load
        try:
            metric = pyiqa.create_metric("clipiqa", backbone=str(path), device=device, as_loss=False)
        except Exception as exc:
            raise W.WeightFileError(f"{WHAT}: pyiqa cannot build its CLIP-IQA from {path} "
                                    f"({type(exc).__name__}: {exc})") from None
        finally:
            clipiqa_arch.load = original
        metric.net.prompt_pairs = tokenize(list(ANTONYMS))
        return metric

    return cached_model(("pyiqa", file_key(path), str(device)), build)
