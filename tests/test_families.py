"""The family table (qsched/quant/families.py): layouts recognised from users' key names, one skip table per family
with a reason per entry, the flow check of the sampler nodes. No ComfyUI needed (tests/test_comfyui_families.py runs
every family in a real ComfyUI)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from qsched_pack.nodes.graph import safetensors_is_flow
from qsched_pack.qsched.quant import DEFAULT_SKIP, QuantSpec, quantize_
from qsched_pack.qsched.quant import families as F

# A few keys of each family's released files (ComfyUI / original layouts), as users have them.
USER_KEYS = {
    "qwen_image": ["img_in.weight", "txt_norm.weight", "transformer_blocks.0.img_mod.1.weight", "proj_out.weight"],
    "wan": ["patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight", "head.modulation"],
    "sd3": ["model.diffusion_model.x_embedder.proj.weight", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
            ".weight", "first_stage_model.decoder.conv_in.weight"],
    "chroma": ["img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale", "distilled_guidance_layer.in_proj"
               ".weight"],
    "flux": ["img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.weight"],
    "sd_unet": ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x.weight"],
}


@pytest.mark.parametrize("family", sorted(USER_KEYS))
def test_layout_of_users_files(family):
    assert F.family_of_keys(USER_KEYS[family]) is F.FAMILIES[family]


def test_unknown_layout_is_none():
    assert F.family_of_keys(["foo.weight", "bar.bias"]) is None


def test_every_skip_entry_says_why_and_tables_are_distinct():
    for f in F.FAMILIES.values():
        assert all(isinstance(why, str) and len(why) > 10 for why in f.skip.values()), f.name
        assert DEFAULT_SKIP[f.name] == tuple(f.skip)
    comfy = [F.FAMILIES[n] for n in F.COMFY_FAMILIES]
    assert len({f.patterns for f in comfy}) == len(comfy)
    assert F.get("comfy_flux") is F.FAMILIES["flux"] and F.get("comfy_unet") is F.FAMILIES["sd_unet"]
    with pytest.raises(ValueError, match="invalid family"):
        F.get("no_such_family")


def test_few_step_settings_use_comfy_names():
    for f in F.FAMILIES.values():
        for name, s in f.few_step.items():
            assert {"steps", "sampler", "scheduler", "cfg"} <= set(s), name
            assert s["sampler"] in ("euler", "euler_ancestral") and s["scheduler"] in ("simple", "sgm_uniform")


class _QwenLike(nn.Module):
    """Module names of ComfyUI's QwenImageTransformer2DModel (tiny widths)."""

    def __init__(self):
        super().__init__()
        self.img_in = nn.Linear(8, 16)
        self.txt_in = nn.Linear(8, 16)
        self.time_text_embed = nn.Sequential(nn.Linear(8, 16))
        self.transformer_blocks = nn.ModuleList([nn.ModuleDict({"img_mod": nn.Linear(16, 96),
                                                                "to_q": nn.Linear(16, 16)})])
        self.norm_out = nn.ModuleDict({"linear": nn.Linear(16, 32)})
        self.proj_out = nn.Linear(16, 8)


def test_quantize_with_a_family_table_reports_the_reason():
    m = _QwenLike()
    r = quantize_(m, QuantSpec.parse("w8a8"), "simulated", family="qwen_image")
    assert set(r.quantized) == {"transformer_blocks.0.img_mod", "transformer_blocks.0.to_q"}
    assert r.skipped["norm_out.linear"] == F.FAMILIES["qwen_image"].skip["norm_out"]
    assert r.skipped["img_in"].startswith("patch embedder")


def _header_file(tmp_path, keys):
    header = json.dumps({k: {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]} for k in keys}).encode()
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    return str(p)


@pytest.mark.parametrize("family,flow", [("qwen_image", True), ("wan", True), ("sd3", True), ("chroma", True),
                                         ("flux", True), ("sd_unet", False)])
def test_flow_check_reads_the_family_from_the_header(tmp_path, family, flow):
    assert safetensors_is_flow(_header_file(tmp_path, USER_KEYS[family])) is flow
    assert safetensors_is_flow(_header_file(tmp_path, ["foo.weight"])) is None


def test_weights_of_the_tiny_module_stay_where_they_were():
    m = _QwenLike()
    before = m.proj_out.weight.detach().clone()
    quantize_(m, "w4a8", "simulated", family="qwen_image")
    assert torch.equal(m.proj_out.weight, before)
