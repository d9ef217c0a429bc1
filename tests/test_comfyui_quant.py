"""Quantized models in a real ComfyUI 0.3.64, in-process (tests/comfy_quant_checks.py run with ComfyUI's python):
load-time quantization, accounting, partial (lowvram) loading, LoRA, Quantize Model clones alternating with the
original, pre-quantized files, bad files, no graph breaks. Needs COMFYUI_PATH (and COMFYUI_PYTHON)."""

from __future__ import annotations

import os

import pytest
from comfy_env import check_dirs, require_comfyui, run_check

pytestmark = pytest.mark.comfyui
require_comfyui()


@pytest.fixture(scope="session")
def quant_env(tmp_path_factory):
    return check_dirs(tmp_path_factory, "QSCHED_QUANT_MODELS", "quant_models")


def check(quant_env, name: str) -> dict:
    return run_check("comfy_quant_checks.py", quant_env, name)


def test_flux_quantized_while_loading(quant_env):
    r = check(quant_env, "load_time")
    assert r["size_ratio"] < 0.3  # vs the same model loaded by core (float32 on CPU)
    assert r["rel_err"] < 0.15
    # anonymous memory while loading: quantized model + a few float32 layer temporaries, never the float model
    assert r["anon_growth"] < r["size"] + 4 * r["largest_layer_fp32"] + 200 * 2**20, r


def test_accounting_and_error_of_each_format(quant_env):
    r = check(quant_env, "formats")
    for key, v in r.items():
        assert v["rel_err"] < (0.35 if key.startswith("sd/") else 0.15), (key, v)


def test_partial_lowvram_loading_streams_quantized_layers(quant_env):
    r = check(quant_env, "lowvram")
    assert r["streamed_layers"] > 0


def test_lora_on_quantized_layers(quant_env):
    r = check(quant_env, "lora")
    assert r["lora_effect"] > 0.01


def test_quantize_model_clones_alternate_with_the_original(quant_env):
    r = check(quant_env, "clones")
    assert r["size_ratio_w4a8"] < r["size_ratio_w8a8"] < 1


def test_prequantized_file_loads_without_quantizing(quant_env):
    r = check(quant_env, "prequant")
    assert r["model_size"] <= r["file_bytes"]
    # the codes stay memory-mapped: the load's own memory is the file's 16-bit tensors (which core's loader copies
    # too) plus little; a load that copied the codes would add them
    sixteen_bit = r["file_bytes"] - r["code_bytes"]
    assert r["anon_growth"] <= sixteen_bit + 0.3 * r["code_bytes"] + 64 * 2**20, r


def test_bad_files_name_the_file_and_what_to_do(quant_env):
    r = check(quant_env, "bad_input")
    assert set(r) == {"truncated", "garbage", "arch", "shape", "checkpoint_loader", "no_fp8"}


def test_no_graph_breaks_from_quantized_layers(quant_env):
    check(quant_env, "compile")


def test_w4a8_fp8_loads_saves_and_runs_in_comfyui(quant_env):
    r = check(quant_env, "w4a8_fp8")
    assert r["flux"]["size_ratio"] < 0.3 and r["flux"]["rel_err"] < 0.15 and r["sd"]["rel_err"] < 0.35, r
    assert r["prequant"]["model_size"] <= r["prequant"]["file_bytes"]


def test_cuda_graph_node_is_a_noop_on_the_cpu(quant_env):
    r = check(quant_env, "fastpath")
    assert set(r) == {"sd", "flux"}


def test_sage_attention_option_is_wired_into_comfyui(quant_env):
    r = check(quant_env, "attention")
    assert 0 < r["flux"]["sage"] and 0 < r["sd"]["sage"] < r["sd"]["seen"], r


@pytest.mark.skipif(not os.environ.get("QSCHED_GGUF_NODES"), reason="QSCHED_GGUF_NODES (a checkout of "
                    "city96/ComfyUI-GGUF, folder name a Python identifier) not set; needs the gguf package")
def test_qsched_nodes_on_a_gguf_model(quant_env):
    r = check(quant_env, "gguf")
    assert set(r) == {"Q8_0", "Q4_0"}


def test_quantized_layers_follow_the_newer_core_casting_contract(quant_env):
    """0.38.1's cast_bias_weight(offloadable=True)/uncast_bias_weight, Dynamic VRAM's per-layer LoRA and the new
    LowVramPatch semantics, as stand-ins on 0.3.64 (tests/comfy_quant_checks.py: check_newer_core_contract)."""
    r = check(quant_env, "newer_core_contract")
    assert r["layers"] > 0 and r["dynamic_plain_vs_full_load"] == 0.0


def test_comfyui_native_files_both_ways_through_comfy_kitchen(quant_env):
    pytest.importorskip("comfy_kitchen")
    r = check(quant_env, "native")
    assert r["w8a8"]["worst_weight_rel_err"] == 0.0 and r["w8a8"]["output_rel_err_reloaded"] == 0.0
    assert r["w8a8-fp8"]["worst_weight_rel_err"] < 0.05 and r["w4a8"]["worst_weight_rel_err"] < 0.15
    assert r["core_asym_w4a8_int8_header"] > 0  # only the _quantization_metadata header declares the layers
    assert all(r[f"core_{f}_markers"] > 0 for f in ("nvfp4", "float8_e4m3fn", "int8_tensorwise"))
