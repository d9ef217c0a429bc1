"""The tiny world (issue 7): a text-conditioned few-step rectified-flow model of scikit-learn's handwritten digits,
trained here, with stand-in JAQ scorers and a reference metric (docs/tiny_world.md).

``TinyWorld.load()`` -> networks (``train.load_or_train()`` trains them when missing); ``.sampler(steps)`` -> a
calibration generator; ``.text_alignment()`` / ``.image_quality()`` -> JAQ metric objects; ``.reference()`` ->
Fréchet distance and accuracy. Weights file format: ``checkpoint.py``.
"""

from .data import DIGIT_NAMES, STYLES, all_prompts, load_digit_set, parse_prompt, prompt_for
from .metrics import ReferenceMetric, frechet_distance
from .model import QUANT_SKIP, FlowConfig, FlowDenoiser, TextEncoder, TinyFlowNet
from .scorers import TinyImageQuality, TinyTextAlignment
from .world import TinyGenerator, TinyWorld

__all__ = ["DIGIT_NAMES", "STYLES", "QUANT_SKIP", "FlowConfig", "FlowDenoiser", "ReferenceMetric", "TextEncoder",
           "TinyFlowNet", "TinyGenerator", "TinyImageQuality", "TinyTextAlignment", "TinyWorld", "all_prompts",
           "frechet_distance", "load_digit_set", "parse_prompt", "prompt_for"]
