"""The real-ComfyUI GPU benchmark's pure-Python parts: config selection (--part/--only/--skip), the kernel-time
classification and the report (ratios against the core baseline of the same part, earlier runs kept and marked)."""

import importlib.util
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name: str):
    """A benchmark's pure-Python module, loaded from its file (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCHMARKS, name + ".py"))
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


parts = _load("comfyui_parts")
kb = _load("kernel_breakdown")
rep = _load("report_comfyui")


# ------------------------------------------------------------------------------------------------ selection
def test_parts_are_valid_and_each_family_starts_with_its_baseline():
    """A part may be cut short by the device call's limit: the core baseline every ratio is taken against must be
    the first config of its family in the part (for the compiled modes: the first compiled one), or be absent."""
    for name, keys in parts.PARTS.items():
        assert len(set(keys)) == len(keys), name
        for k in keys:
            parts.parse(k)
        for fam, base in parts.BASELINE.items():
            mine = [k for k in keys if k.startswith(f"{fam}/")]
            if not any(k.startswith(f"{fam}/{base}/") for k in mine):
                continue
            assert mine[0].startswith(f"{fam}/{base}/"), (name, fam, mine[0])
            comp = [k for k in mine if "/compiled" in k]
            if comp and any(k.startswith(f"{fam}/{base}/compiled") for k in comp):
                assert comp[0].startswith(f"{fam}/{base}/"), (name, fam, comp[0])


def test_skip_removes_families_modes_formats_and_keys():
    b = parts.select("B", None, {"flux"})
    assert b and all(k.startswith("sdxl/") for k in b)
    assert not any("compiled" in k for k in parts.select("A", None, {"compile"}))
    assert not any(k.endswith("graph") for k in parts.select("B", None, {"fastpath"}))
    assert "sdxl/w4a8/eager" not in parts.select("B", None, {"w4a8"})
    assert "sdxl/w4a8-fp8/eager" in parts.select("B", None, {"w4a8"})
    assert parts.select("A", None, {"flux/bf16/compiled+graph"})[0] == "flux/w8a8-fp8/compiled+graph"
    assert parts.select(None, "sdxl/w8a8/eager, flux/w4a8-fp8/compiled,sdxl/w8a8/eager", set()) == [
        "sdxl/w8a8/eager", "flux/w4a8-fp8/compiled"]
    assert parts.select(None, None, set()) == []


@pytest.mark.parametrize("bad,msg", [("flux/w8a8", "family/format/mode"), ("sd3/w8a8/eager", "family"),
                                     ("flux/int4/eager", "format"), ("flux/fp16/eager", "core flux model is bf16"),
                                     ("sdxl/w8a8/fast", "mode")])
def test_bad_keys_name_the_option(bad, msg):
    with pytest.raises(parts.ConfigError, match=msg) as e:
        parts.select(None, bad, set())
    assert "--only" in str(e.value)


def test_part_errors():
    with pytest.raises(parts.ConfigError, match="--part 'C'"):
        parts.select("C", None, set())
    with pytest.raises(parts.ConfigError, match="one of them"):
        parts.select("A", "flux/bf16/eager", set())


def test_need_s_adds_the_file_write_once():
    assert parts.need_s("flux/bf16/compiled", set()) == parts.NEED_S[("flux", "compiled")] + parts.WRITE_S["flux"]
    assert parts.need_s("flux/bf16/compiled", {"flux"}) == parts.NEED_S[("flux", "compiled")]


def test_sage_suffix_is_an_attention_variant_of_a_format():
    assert parts.parse("flux/w8a8-fp8+sage/compiled") == ("flux", "w8a8-fp8+sage", "compiled")
    assert parts.split_attention("w8a8-fp8+sage") == ("w8a8-fp8", True)
    assert parts.split_attention("bf16") == ("bf16", False)
    assert parts.display_name("bf16+sage") == "core bf16 + sage attention"
    assert parts.need_s("sdxl/fp16+sage/eager", {"sdxl"}) == 2 * parts.NEED_S[("sdxl", "eager")]
    for bad in ("flux/w8a8-fp8+sag/eager", "flux/fp16+sage/eager", "flux/+sage/eager"):
        with pytest.raises(parts.ConfigError):
            parts.parse(bad)


# ------------------------------------------------------------------------------------------------ breakdown
@pytest.mark.parametrize("name,cat", [
    ("nvjet_qqtst_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm_bf16_256x128_32x3_tn_align8>(Params)", "gemm"),
    ("_w4a8_gemm_kernel", "gemm"), ("_fp8w4_gemm_kernel", "gemm"), ("_int_epilogue_kernel", "gemm"),
    ("triton_tem_fused_mm_0", "gemm"), ("aten::addmm", "gemm"), ("aten::_int_mm", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(Flash_fwd_params)", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("_attn_fwd", "attention"), ("quant_per_block_int8_kernel", "attention"),  # sageattention
    ("_act_quant_kernel", "quantize"), ("_dequant_int4_kernel", "quantize"),
    ("triton_red_fused__to_copy_abs_amax_clamp_div_native_layer_norm_0", "quantize"),
    ("triton_poi_fused_add_mul_native_layer_norm_3", "other"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
    ("aten::mkldnn_convolution", "conv"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("Memcpy HtoD (Pageable -> Device)", "other")])
def test_classify(name, cat):
    assert kb.classify(name) == cat


def test_busy_is_the_union_of_intervals():
    assert kb.busy_us([(0, 10), (5, 10), (20, 5), (21, 1)]) == 20
    assert kb.busy_us([]) == 0


def test_summarize_cuda_shares_busy_and_overhead():
    items = [("nvjet_a", 0, 600), ("flash_fwd_kernel", 600, 200), ("_act_quant_kernel", 800, 100),
             ("elementwise_kernel", 950, 100), ("nvjet_a", 1050, 0)]
    s = kb.summarize(items, steps=2, wall_step_s=0.001, profiled_s=0.01, device="cuda")
    assert s["shares"] == {"gemm": 0.6, "attention": 0.2, "quantize": 0.1, "conv": 0.0, "other": 0.1}
    assert s["gpu_busy_per_step_s"] == pytest.approx(500e-6)
    assert s["launch_overhead_per_step_s"] == pytest.approx(500e-6)
    assert s["top"]["gemm"] == [["nvjet_a", 0.3]]
    cpu = kb.summarize(items, steps=2, wall_step_s=None, profiled_s=0.01, device="cpu")
    assert "gpu_busy_per_step_s" not in cpu and cpu["shares"]["gemm"] == 0.6


# ------------------------------------------------------------------------------------------------ report
def _rec(name, fam, key, **kw):
    r = {"name": name, "family": fam, "key": key, "mode": key.split("/")[2], "load_s": 1.0, "comfy_size": 2e9,
         "allocated": 2.1e9, "s_per_step": 0.1}
    r.update(kw)
    return r


def _write(tmp_path, name, d):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return str(p)


def test_report_ratios_use_the_same_part_and_mark_other_parts(tmp_path):
    bd = kb.summarize([("nvjet", 0, 3e5), ("flash", 3e5, 1e5)], steps=4, wall_step_s=0.2, profiled_s=1,
                      device="cuda")
    a = {"gpu": "H200", "torch": "2.11", "run": "r1", "part": "A", "configs": [
        _rec("core bf16", "flux", "flux/bf16/compiled+graph", s_per_step=0.2, s_per_step_compiled=0.1,
             s_per_step_compiled_graph=0.08, graph_equal_compiled=True, graph_vs_compiled=0.0,
             graph_stats={"captures": 1, "replays": 7, "eager_calls": 0}, breakdown_compiled=bd),
        _rec("pack w8a8-fp8", "flux", "flux/w8a8-fp8/compiled", s_per_step=0.15, s_per_step_compiled=0.06)],
         "errors": [], "skipped": ["config flux/w8a8/eager (10 s left, needs 25)"]}
    b = {"gpu": "H200", "torch": "2.11", "run": "r2", "part": "B", "configs": [
        _rec("core fp16", "sdxl", "sdxl/fp16/graph", s_per_step=0.05, s_per_step_graph=0.02,
             graph_equal_eager=False, graph_vs_eager=1e-3, graph_stats={}),
        _rec("pack w4a8", "flux", "flux/w4a8/compiled", s_per_step=0.3, s_per_step_compiled=0.12,
             stage_errors={"profile compiled": "RuntimeError: x"})], "errors": [], "skipped": []}
    old = {"gpu": "H200", "torch": "2.11", "configs": [
        {"name": "core bf16", "family": "flux", "s_per_step": 0.17, "load_s": 2, "comfy_size": 1, "allocated": 1},
        {"name": "GGUF Q4_0", "family": "flux", "s_per_step": 0.34, "load_s": 2, "comfy_size": 1, "allocated": 1}],
        "cards": [{"name": "pack w4a8", "family": "flux", "card_gib": 12, "s_per_step": 0.19}],
        "scenarios": {}, "files": {}, "errors": [], "skipped": []}
    out = str(tmp_path / "r.md")
    rep.main([_write(tmp_path, "a.json", a), _write(tmp_path, "b.json", b), "--earlier",
              _write(tmp_path, "old.json", old) + "=first run (04:00)", "--out", out])
    text = open(out).read()
    assert "| pack w8a8-fp8 | compiled | A | 1.0 | 2.00 | 2.10 | 0.150 (0.75×) | 0.060 (0.60×) |" in text
    assert "| core bf16 compiled + CUDA graph | A | 0.320 | 0.80 | 1 / 7 / 0 |" in text
    assert "0.120 (1.20×†)" in text and "† baseline from another part" in text  # part B's FLUX row: A's core
    assert "rel. err 1.0e-03" in text and "bit-exact" in text
    assert "| core bf16 | compiled | A | 200.0 | 100.0 | 100.0 | 100.0 | 75 | 25 | 0 | 0 | 0 |" in text
    # earlier run: core bf16 was measured again (dropped), GGUF kept with its own run's ratio, cards kept
    assert "run: first run (04:00)" in text and "| GGUF Q4_0 | 2.0 |" in text and "0.340 (2.00×)" in text
    assert "| core bf16 | 2.0 |" not in text and "Simulated 12 GiB card" in text
    assert "not run (part A, r1): config flux/w8a8/eager" in text
    assert "flux/w4a8/compiled: profile compiled: RuntimeError: x" in text


def test_report_marks_uncaptured_graphs_unfinished_stages_and_unreached_configs(tmp_path):
    """A graph stage that replayed nothing is no CUDA-graph time; a compile cut by the device call's limit is not a
    failure; configs of the part never started are listed; an earlier 'not run' that a new part measured is gone."""
    a = {"gpu": "H200", "torch": "2.11", "run": "r1", "part": "A",
         "keys": ["flux/bf16/compiled+graph", "flux/w4a8-fp8/compiled+graph", "flux/w8a8/eager"], "configs": [
             _rec("core bf16", "flux", "flux/bf16/compiled+graph", s_per_step=0.2, s_per_step_compiled=0.1,
                  s_per_step_compiled_graph=0.1, graph_equal_compiled=True, graph_vs_compiled=0.0,
                  graph_stats={"captures": 0, "replays": 0, "eager_calls": 8, "eager_reason": "host tensor"}),
             _rec("pack w4a8-fp8", "flux", "flux/w4a8-fp8/compiled+graph", s_per_step=0.25)],
         "errors": [], "skipped": []}
    old = {"gpu": "H200", "torch": "2.11", "configs": [], "cards": [], "scenarios": {}, "files": {}, "errors": [],
           "skipped": ["compile flux core bf16 (3 s left, needs 110)", "compile flux pack w8a8 (3 s left, needs 110)"]}
    out = str(tmp_path / "r.md")
    rep.main([_write(tmp_path, "a.json", a), "--earlier", _write(tmp_path, "old.json", old) + "=first",
              "--out", out, "--note", "graphs fixed later"])
    text = open(out).read()
    assert "Note: graphs fixed later" in text
    assert "not captured (0.100 (1.00×)) | no graph ran |" in text and "(no graph: host tensor)" in text
    assert "| pack w4a8-fp8 | compiled+graph | A |" in text and "not finished (the device call ended" in text
    assert "not reached (part A, r1): flux/w8a8/eager" in text
    assert "compile flux core bf16" not in text and "compile flux pack w8a8 (3 s left" in text


def test_report_shows_attention_and_format_errors_side_by_side(tmp_path):
    """+sage configs: 16-bit then 8-bit attention s/step of the same load, the attention error and the format
    error; a plain config with only a format error gets its row too; configs with neither get none."""
    a = {"gpu": "H200", "torch": "2.11", "run": "r1", "part": "S", "configs": [
        _rec("core bf16 + sage attention", "flux", "flux/bf16+sage/eager", s_per_step=0.15,
             s_per_step_16bit_attention=0.2, err_attention=0.0123),
        _rec("pack w4a8-fp8 + sage attention", "flux", "flux/w4a8-fp8+sage/eager", s_per_step=0.16,
             s_per_step_16bit_attention=0.2, err_attention=0.02, err_vs_core=0.0456),
        _rec("pack w8a8-fp8", "flux", "flux/w8a8-fp8/eager", err_vs_core=0.03),
        _rec("pack w8a8", "flux", "flux/w8a8/eager")], "errors": [], "skipped": []}
    out = str(tmp_path / "r.md")
    rep.main([_write(tmp_path, "a.json", a), "--out", out])
    text = open(out).read()
    assert "| core bf16 + sage attention | S | 0.200 | 0.150 (0.75×) | 0.0123 | – |" in text
    assert "| pack w4a8-fp8 + sage attention | S | 0.200 | 0.160 (0.80×) | 0.0200 | 0.0456 |" in text
    assert "| pack w8a8-fp8 | S | 0.100 | – | – | 0.0300 |" in text
    assert "| pack w8a8 | S | 0.100 | – |" not in text
