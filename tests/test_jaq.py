"""JAQ and its metric backends on tiny random scorers saved in the users' formats and loaded back through
the product's loading code. Every metric is checked against an independent computation of its formula."""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jaq_fixtures import (TINY_HPS, planted_images, register_tiny_hps_config, save_hf_clip, save_open_clip_checkpoint,
                          save_openai_torchscript)
from qsched_pack.calibration.jaq import JAQ
from qsched_pack.calibration.metrics import WeightFileError, common
from qsched_pack.calibration.metrics.aqmap import AQMAP, TEMPLATES
from qsched_pack.calibration.metrics.clipiqa import CLIPIQA
from qsched_pack.calibration.metrics.clipscore import CLIPScore
from qsched_pack.calibration.metrics.hpsv2 import HPSv2
from qsched_pack.calibration.metrics.nouns import extract_nouns, rule_nouns

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red car on a street", "a cat sleeping on a sofa", "two dogs in the snow",
           "a bowl of fruit on a wooden table", "portrait of an old man with a hat", "a city skyline at night"]


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qsched_models")
    register_tiny_hps_config(d)
    return {
        "rn": save_openai_torchscript(d / "RN50.pt", "rn", seed=1),
        "vit": save_openai_torchscript(d / "ViT-B-16.pt", "vit", seed=2),
        "vitl": save_openai_torchscript(d / "ViT-L-14.pt", "vit", seed=3),
        "hps": save_open_clip_checkpoint(d / "HPS_v2.1_compressed.pt", TINY_HPS, seed=4),
        "hf": save_hf_clip(d / "clip-vit-large-patch14", seed=8),
        "dir": d,
    }


@pytest.fixture(scope="session")
def metrics(files):
    return {
        "clipscore": CLIPScore(files["vitl"], device="cpu"),
        "clipscore_hf": CLIPScore(files["hf"], device="cpu"),
        "clipiqa": CLIPIQA(files["rn"], device="cpu"),
        "hpsv2": HPSv2(files["hps"], model_name=TINY_HPS, device="cpu"),
        "aqmap": AQMAP(files["vit"], nouns="rules", device="cpu"),
    }


def images(n=6, h=64, w=64, seed=0):
    return planted_images(n, h, w, seed)


# ---------------------------------------------------------------- independent references
def tv_preprocess(img_bhwc, size):
    """torchvision's CLIP eval transform (Resize shortest side, bicubic, antialias; CenterCrop; Normalize)."""
    from torchvision.transforms import v2

    x = img_bhwc.permute(0, 3, 1, 2)
    x = v2.CenterCrop(size)(v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(x))
    return (x.clamp(0, 1) - OPENAI_MEAN) / OPENAI_STD


def hps_letterbox_preprocess(img_bhwc, size):
    """HPSv2's eval transform written after its ResizeMaxSize (hpsv2/src/open_clip/transform.py) with torchvision:
    longest side to ``size`` (round), bicubic on the tensor, zero pad (left/top get the smaller half), Normalize."""
    from torchvision.transforms import v2

    out = []
    for img in img_bhwc.permute(0, 3, 1, 2):
        h, w = img.shape[1:]
        scale = size / float(max(h, w))
        new = [round(h * scale), round(w * scale)]
        img = v2.functional.resize(img, new, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        ph, pw = size - new[0], size - new[1]
        out.append(v2.functional.pad(img, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0))
    return (torch.stack(out) - OPENAI_MEAN) / OPENAI_STD


def ref_clipscore_openclip(model, imgs, prompts):
    import open_clip

    size = model.visual.image_size[0]
    f_img = model.encode_image(tv_preprocess(imgs, size))
    f_txt = model.encode_text(open_clip.tokenize(prompts))
    cos = F.cosine_similarity(f_img, f_txt, dim=-1)
    return 100 * torch.clamp(cos, min=0), cos


def ref_clipiqa(model, imgs):
    """softmax(100 cos) over ("Good photo.", "Bad photo."); RN attention pool written out by hand, no pos-emb."""
    import open_clip

    v = model.visual
    x = (imgs.permute(0, 3, 1, 2) - OPENAI_MEAN) / OPENAI_STD  # native resolution: no resize, no crop
    fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
    tokens = fmap.flatten(2).transpose(1, 2)  # [B, HW, C]
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1)  # mean token first; NO positional embedding
    p, h = v.attnpool, v.attnpool.num_heads
    b, n, c = tokens.shape
    q = p.q_proj(tokens[:, :1]).view(b, 1, h, c // h).transpose(1, 2)
    k = p.k_proj(tokens).view(b, n, h, c // h).transpose(1, 2)
    val = p.v_proj(tokens).view(b, n, h, c // h).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
    f = p.c_proj((att @ val).transpose(1, 2).reshape(b, c))
    t = model.encode_text(open_clip.tokenize(["Good photo.", "Bad photo."]))
    cos = F.normalize(f, dim=-1) @ F.normalize(t, dim=-1).T
    e = torch.exp(100 * cos)
    return e[:, 0] / e.sum(1)


def ref_surgery_tokens(visual, pixels):
    """CLIP Surgery written after the original code's structure: LND layout, an Attention module holding
    copies of the block's qkv/proj weights for the last 6 blocks, dual paths, CLS from the original path."""
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding).permute(1, 0, 2)  # LND
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-6]:
        xb = x.permute(1, 0, 2)
        xb = xb + blk.attn(blk.ln_1(xb), blk.ln_1(xb), blk.ln_1(xb), need_weights=False)[0]
        xb = xb + blk.mlp(blk.ln_2(xb))
        x = xb.permute(1, 0, 2)

    def attention(blk, y):  # y: LND
        y = y.transpose(0, 1)
        B, N, C = y.shape
        heads = blk.attn.num_heads
        qkv = (y @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).reshape(B, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scale = (C // heads) ** -0.5
        a_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
        a_new = ((v @ v.transpose(-2, -1)) * scale).softmax(-1)
        proj = lambda t: blk.attn.out_proj(t)  # noqa: E731
        x_new = proj((a_new @ v).transpose(1, 2).reshape(B, N, C))
        x_ori = proj((a_ori @ v).transpose(1, 2).reshape(B, N, C))
        return x_new.transpose(0, 1), x_ori.transpose(0, 1)

    x_ori = None
    for blk in blocks[-6:]:
        if x_ori is None:  # start of the dual path
            x_res, x_ori_res = attention(blk, blk.ln_1(x))
            x_ori = x + x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x = x + x_res
        else:
            x_res, x_ori_res = attention(blk, blk.ln_1(x_ori))
            x_ori = x_ori + x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x = x + x_res
    x = x.clone()
    x[0] = x_ori[0]
    return visual.ln_post(x.permute(1, 0, 2)) @ visual.proj


def ref_aqmap(model, img_bhwc, nouns):
    import open_clip

    from torchvision.transforms import v2

    size = model.visual.image_size
    x = v2.Resize(list(size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(img_bhwc.permute(0, 3, 1, 2))
    feats = ref_surgery_tokens(model.visual, (x.clamp(0, 1) - OPENAI_MEAN) / OPENAI_STD)
    feats = feats / feats.norm(dim=1, keepdim=True)

    def ensemble(word):
        e = model.encode_text(open_clip.tokenize([t.format(word) for t in TEMPLATES]))
        e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
        return e / e.norm()

    text = torch.stack([ensemble(w) for w in nouns]) - ensemble("")
    sim = feats[0] @ text.T  # [1+P, J]
    return (1 / (1 + torch.exp(-10 * sim[0]))).mean()


# ---------------------------------------------------------------- metric == formula
@torch.no_grad()
def test_clipscore_openai_file_matches_explicit_cosine(metrics):
    m = metrics["clipscore"]
    imgs = images(6, 80, 64)  # not square: shortest-side resize + centre crop
    prompts = PROMPTS
    got = m(imgs, prompts)
    want, cos = ref_clipscore_openclip(m.encoder.model, imgs, prompts)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (cos > 0).any() and (cos < 0).any(), "fixture must exercise both branches of max(cos, 0)"
    assert ((got >= 0) & (got <= 100)).all()
    assert (got[cos < 0] == 0).all()


@torch.no_grad()
def test_clipscore_transformers_folder_matches_explicit_cosine(metrics, files):
    from transformers import AutoTokenizer, CLIPModel

    m = metrics["clipscore_hf"]
    imgs = images(6, 64, 96)
    got = m(imgs, PROMPTS)
    model = CLIPModel.from_pretrained(str(files["hf"]), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(files["hf"]), local_files_only=True)
    t = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=tv_preprocess(imgs, 48))
    cos = torch.diagonal(out.image_embeds @ out.text_embeds.T)  # HF returns unit-normed projections
    torch.testing.assert_close(got, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    assert (cos > 0).any() and (cos < 0).any()


@torch.no_grad()
def test_long_prompt_truncated_keeping_end_token(metrics):
    import open_clip

    long_prompt = "a very detailed photo of " + " and ".join(f"object number {i}" for i in range(60))
    tokens = common.open_clip_tokenize([long_prompt], 77)
    assert tokens.shape == (1, 77) and tokens[0, -1].item() == 49407 and tokens[0, 0].item() == 49406
    m = metrics["clipscore"]
    imgs = images(1)
    cut = open_clip.tokenize([long_prompt])  # open_clip keeps EOT as the last token too
    f_txt = m.encoder.model.encode_text(cut)
    f_img = m.encoder.model.encode_image(tv_preprocess(imgs, 64))
    want = 100 * F.cosine_similarity(f_img, f_txt).clamp(min=0)
    torch.testing.assert_close(m(imgs, [long_prompt]), want, atol=1e-4, rtol=1e-4)
    hf = metrics["clipscore_hf"]
    ids = hf.encoder.tokenizer([long_prompt], truncation=True, max_length=77)["input_ids"][0]
    assert len(ids) == 77 and ids[-1] == 49407
    assert torch.isfinite(hf(imgs, [long_prompt])).all()


@torch.no_grad()
@pytest.mark.parametrize("hw", [(64, 64), (96, 64), (128, 160)])
def test_clipiqa_matches_explicit_antonym_softmax_at_native_resolution(metrics, hw):
    m = metrics["clipiqa"]
    imgs = images(5, *hw)
    got = m(imgs)
    torch.testing.assert_close(got, ref_clipiqa(m.model, imgs), atol=1e-5, rtol=1e-4)
    assert ((got > 0) & (got < 1)).all()
    assert got.std() > 0  # the scores depend on the image


@torch.no_grad()
def test_hpsv2_open_clip_checkpoint_matches_explicit_dot(metrics):
    import open_clip

    m = metrics["hpsv2"]
    imgs = images(6, 72, 56)  # not square: HPSv2 letterboxes (the official preprocess_val), it does not crop
    got = m(imgs, PROMPTS)
    model = m.encoder.model
    f_img = F.normalize(model.encode_image(hps_letterbox_preprocess(imgs, 56)), dim=-1)
    cropped = F.normalize(model.encode_image(tv_preprocess(imgs, 56)), dim=-1)
    assert (got - torch.diagonal(cropped @ F.normalize(model.encode_text(open_clip.get_tokenizer(TINY_HPS)(
        PROMPTS)), dim=-1).T)).abs().max() > 1e-3  # the geometry matters: a crop would give other scores
    f_txt = F.normalize(model.encode_text(open_clip.get_tokenizer(TINY_HPS)(PROMPTS)), dim=-1)
    torch.testing.assert_close(got, torch.diagonal(f_img @ f_txt.T), atol=1e-5, rtol=1e-4)
    assert ((got >= -1) & (got <= 1)).all()


def test_hpsv2_checkpoint_loaded_strictly_into_fresh_architecture(files):
    """The HPS weights in the file are the ones used (not the random init of the architecture)."""
    import open_clip

    sd = torch.load(files["hps"], map_location="cpu")["state_dict"]
    m = HPSv2(files["hps"], model_name=TINY_HPS, device="cpu")
    for k, v in m.encoder.model.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    fresh = open_clip.create_model(TINY_HPS, pretrained=None)
    assert not torch.equal(fresh.visual.conv1.weight, sd["visual.conv1.weight"])


@torch.no_grad()
def test_aqmap_matches_reference_clip_surgery(metrics):
    m = metrics["aqmap"]
    prompts = ["Mr. Beans wearing sun glasses with blue doctor suit and stripe tie", "a cat on a sofa",
               "sunset"]
    imgs = images(3, 96, 80)
    got = m(imgs, prompts)
    want = torch.stack([ref_aqmap(m.model, imgs[i:i + 1], rule_nouns(p)) for i, p in enumerate(prompts)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert ((got > 0) & (got < 1)).all()


@torch.no_grad()
def test_aqmap_no_noun_scores_one_half(metrics):
    got = metrics["aqmap"](images(2), ["of the and", "very much"])
    torch.testing.assert_close(got, torch.full((2,), 0.5))


def test_rule_noun_extractor():
    assert rule_nouns("Mr. Beans wearing sun glasses with blue doctor suit and stripe tie") == \
        ["Beans", "glasses", "suit", "tie"]
    assert rule_nouns("a painting of a dog running in the park") == ["painting", "dog", "park"]
    assert rule_nouns("of the") == [""]
    assert extract_nouns("a red car", "rules") == ("car",)
    with pytest.raises(ValueError, match="noun extractor"):
        extract_nouns("a car", "nltk")


# ---------------------------------------------------------------- batching, order, caching
@torch.no_grad()
@pytest.mark.parametrize("name", ["clipscore", "clipscore_hf", "clipiqa", "hpsv2", "aqmap"])
def test_batch_equals_one_by_one_and_order_invariant(metrics, name):
    m = metrics[name]
    imgs, prompts = images(6), PROMPTS
    batch = m(imgs, prompts)
    single = torch.cat([m(imgs[i:i + 1], [prompts[i]]) for i in range(6)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = m(imgs[perm], [prompts[i] for i in perm])
    torch.testing.assert_close(shuffled, batch[perm], atol=1e-5, rtol=1e-5)
    m.batch_size, old = 4, m.batch_size  # chunking across a ragged last batch changes nothing
    try:
        torch.testing.assert_close(m(imgs, prompts), batch, atol=1e-5, rtol=1e-5)
    finally:
        m.batch_size = old


def test_models_loaded_once_and_cached(files, metrics):
    again = CLIPScore(files["vitl"], device="cpu")
    assert again.encoder.model is metrics["clipscore"].encoder.model
    assert not any(p.requires_grad for p in again.encoder.model.parameters())


# ---------------------------------------------------------------- JAQ and k
@torch.no_grad()
@pytest.mark.parametrize("preset", ["clip", "preference"])
def test_jaq_presets_equal_tc_plus_k_iq(files, preset):
    weights = {"clipscore": files["vitl"], "clipiqa": files["rn"], "aqmap": files["vit"], "hpsv2": files["hps"]}
    opts = {"hpsv2": {"model_name": TINY_HPS}, "aqmap": {"nouns": "rules"}}
    tc_name, iq_name = {"clip": ("clipscore", "clipiqa"), "preference": ("aqmap", "hpsv2")}[preset]
    jaq = JAQ(preset=preset, k=2.0, weights=weights, device="cpu", tc_options=opts.get(tc_name),
              iq_options=opts.get(iq_name))
    imgs = images(4)
    c = jaq.components(imgs, PROMPTS[:4])
    assert set(c) == {"tc", "iq", tc_name, iq_name}
    s = jaq.score(imgs, PROMPTS[:4])
    assert s.shape == (4,) and s.dtype == torch.float32
    torch.testing.assert_close(s, c["tc"] + 2.0 * c["iq"])
    jaq.k_on = "tc"
    torch.testing.assert_close(jaq.score(imgs, PROMPTS[:4]), c["iq"] + 2.0 * c["tc"])


class Fixed:
    """A metric returning planted values, to test how JAQ combines them."""

    def __init__(self, name, values):
        self.name, self.values = name, torch.tensor(values)

    def __call__(self, images, prompts):
        common.check_images(images)
        return self.values[: images.shape[0]]


def test_k_weights_iq_and_flips_ranking_of_planted_pair():
    # image A aligns better (TC 30 vs 29), image B looks better (IQ 0.9 vs 0.2): break-even k = 1/0.7
    tc, iq = Fixed("clipscore", [30.0, 29.0]), Fixed("clipiqa", [0.2, 0.9])
    imgs = images(2)
    low, high = JAQ(tc, iq, k=1.0), JAQ(tc, iq, k=2.0)
    torch.testing.assert_close(low.score(imgs, "p"), torch.tensor([30.2, 29.9]))
    torch.testing.assert_close(high.score(imgs, "p"), torch.tensor([30.4, 30.8]))
    assert low.score(imgs, "p").argmax() == 0 and high.score(imgs, "p").argmax() == 1
    # Table-3 convention puts k on TC: then a larger k favours the better-aligned image
    assert JAQ(tc, iq, k=2.0, k_on="tc").score(imgs, "p").argmax() == 0
    # official `new` criterion: ln(CLIPScore) + k * CLIP-IQA
    torch.testing.assert_close(JAQ(tc, iq, k=2.0, tc_transform="log").score(imgs, "p"),
                               torch.log(torch.tensor([30.0, 29.0])) + 2 * torch.tensor([0.2, 0.9]))


@torch.no_grad()
def test_k_flips_ranking_with_real_tiny_metrics(metrics):
    """Among planted images find A (higher AQ-MAP, lower HPS) and B; k below the break-even ranks A first,
    above it B, exactly at the k predicted from the components."""
    jaq = JAQ(metrics["aqmap"], metrics["hpsv2"], k=0.0)
    imgs, prompts = images(6, seed=3), ["a red car on a street"] * 6
    c = jaq.components(imgs, prompts)
    tc, iq = c["tc"], c["iq"]
    pairs = [(a, b) for a in range(6) for b in range(6) if tc[a] > tc[b] and iq[a] < iq[b]]
    assert pairs, "planted set must contain a trade-off pair"
    a, b = pairs[0]
    k_star = float((tc[a] - tc[b]) / (iq[b] - iq[a]))
    for k, winner in [(0.5 * k_star, a), (2.0 * k_star, b)]:
        jaq.k = k
        s = jaq.score(imgs[[a, b]], prompts[:2])
        assert [a, b][int(s.argmax())] == winner


def test_jaq_rejects_bad_arguments():
    tc, iq = Fixed("clipscore", [1.0]), Fixed("clipiqa", [0.5])
    with pytest.raises(ValueError, match="preset"):
        JAQ(preset="fancy")
    with pytest.raises(ValueError, match="k_on"):
        JAQ(tc, iq, k_on="both")
    with pytest.raises(ValueError, match="finite"):
        JAQ(tc, iq, k=float("nan"))
    with pytest.raises(ValueError, match="one prompt"):
        common.check_prompts(["a", "b"], 3)


# ---------------------------------------------------------------- image validation
@pytest.mark.parametrize("bad, exc, msg", [
    (torch.rand(2, 3, 64, 64), ValueError, "channels-first"),
    (torch.rand(64, 64, 3), ValueError, r"images\[None\]"),
    (torch.rand(2, 64, 64, 4), ValueError, r"\[B,H,W,3\]"),
    (torch.rand(2, 64, 64, 3) * 255, ValueError, "0..255"),
    (torch.rand(2, 64, 64, 3) * 2 - 1, ValueError, "-1..1"),
    (torch.full((1, 64, 64, 3), float("nan")), ValueError, "NaN"),
    (torch.randint(0, 2, (1, 64, 64, 3), dtype=torch.int64), TypeError, "dtype"),
    ([[0.5]], TypeError, "torch.Tensor"),
])
def test_bad_images_rejected_with_clear_message(metrics, bad, exc, msg):
    for name in ("clipscore", "clipiqa"):
        with pytest.raises(exc, match=msg):
            metrics[name](bad, ["a photo"] * 2)


def test_uint8_images_converted_with_warning(metrics):
    imgs = (images(2) * 255).round().to(torch.uint8)
    with pytest.warns(UserWarning, match="uint8"):
        got = metrics["clipiqa"](imgs)
    torch.testing.assert_close(got, metrics["clipiqa"](imgs.float() / 255))


def test_half_precision_input_accepted(metrics):
    imgs = images(2)
    torch.testing.assert_close(metrics["hpsv2"](imgs.half(), PROMPTS[:2]),
                               metrics["hpsv2"](imgs.half().float(), PROMPTS[:2]))


# ---------------------------------------------------------------- weight files
def test_missing_weight_file_error_names_file_folders_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("QSCHED_MODELS_DIR", str(tmp_path))
    with pytest.raises(WeightFileError) as e:
        CLIPIQA(device="cpu")
    text = str(e.value)
    assert "RN50.pt" in text and str(tmp_path) in text and "github.com/openai/CLIP" in text
    monkeypatch.delenv("QSCHED_MODELS_DIR")
    with pytest.raises(WeightFileError, match="QSCHED_MODELS_DIR"):
        HPSv2(device="cpu")
    with pytest.raises(WeightFileError, match="huggingface.co/xswu/HPSv2"):
        HPSv2(tmp_path / "HPS_v2.1_compressed.pt", device="cpu")


def test_weights_found_through_env_var(files, monkeypatch, metrics):
    monkeypatch.setenv("QSCHED_MODELS_DIR", f"/nonexistent{__import__('os').pathsep}{files['dir']}")
    m = CLIPIQA(device="cpu")
    assert m.model is metrics["clipiqa"].model


def test_comfyui_folders_are_passed_in_never_looked_up(files, monkeypatch, tmp_path):
    """The library never reaches into ComfyUI's ``folder_paths`` module: the nodes pass their folders in."""
    from qsched_pack.calibration.metrics import weights as W

    registered = {}
    fake = types.SimpleNamespace(
        folder_names_and_paths={}, models_dir=str(tmp_path / "models"),
        add_model_folder_path=lambda key, path: registered.setdefault(key, []).append(path),
        get_folder_paths=lambda key: registered.get(key, []) + [str(files["dir"])])
    W.register_comfy_folder(fake)
    assert registered == {"qsched": [str(tmp_path / "models" / "qsched")]}
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    monkeypatch.delenv("QSCHED_MODELS_DIR", raising=False)
    with pytest.raises(WeightFileError, match="Searched: none"):
        AQMAP(device="cpu", nouns="rules")
    path = W.resolve("aqmap", folders=fake.get_folder_paths("qsched"))
    assert path == Path(os.path.realpath(files["dir"] / "ViT-B-16.pt"))
    assert AQMAP(path, device="cpu", nouns="rules").model.visual.image_size == (64, 64)


def test_corrupt_and_mismatched_weight_files(files, tmp_path):
    bad = tmp_path / "RN50.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightFileError, match="cannot read .*RN50.pt"):
        CLIPIQA(bad, device="cpu")
    truncated = tmp_path / "ViT-B-16.pt"
    truncated.write_bytes(files["vit"].read_bytes()[:100_000])
    with pytest.raises(WeightFileError, match="ViT-B-16.pt"):
        AQMAP(truncated, device="cpu")
    with pytest.raises(WeightFileError, match="ViT CLIP, but this metric needs a ResNet"):
        CLIPIQA(files["vit"], device="cpu")
    with pytest.raises(WeightFileError, match="ResNet CLIP, but this metric needs a ViT"):
        AQMAP(files["rn"], device="cpu")
    with pytest.raises(WeightFileError, match=f"not a loadable {TINY_HPS} open_clip checkpoint"):
        HPSv2(files["vitl"], model_name=TINY_HPS, device="cpu")
    with pytest.raises(WeightFileError, match="transformers CLIP folder"):
        CLIPScore(tmp_path, device="cpu")


@pytest.mark.slow
def test_hpsv2_default_architecture_is_vit_h_14_and_rejects_other_checkpoints(files):
    """Builds the real ViT-H-14 (about 1 B parameters, no download) and refuses a checkpoint of another shape."""
    with pytest.raises(WeightFileError, match="not a loadable ViT-H-14 open_clip checkpoint"):
        HPSv2(files["hps"], device="cpu")


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_close_to_fp32(files, dtype):
    imgs = images(4)
    for cls, path, kw in [(CLIPScore, files["vitl"], {}), (CLIPIQA, files["rn"], {}),
                          (HPSv2, files["hps"], {"model_name": TINY_HPS}), (AQMAP, files["vit"], {"nouns": "rules"})]:
        ref = cls(path, device="cpu", **kw)(imgs, PROMPTS[:4])
        got = cls(path, device="cuda", dtype=dtype, **kw)(imgs, PROMPTS[:4])
        scale = 100.0 if cls is CLIPScore else 1.0
        torch.testing.assert_close(got, ref, atol=0.05 * scale, rtol=0.05)


# ---------------------------------------------------------------- reference fidelity
@pytest.mark.parametrize("hw", [(100, 334), (334, 100), (64, 201), (97, 131), (57, 57), (300, 64)])
def test_clip_resize_rounds_like_torchvision(hw):
    """Shortest side to the model size, long side int(size*long/short) (torchvision Resize(int), CLIP's
    _transform, CLIPImageProcessor), centre crop: equal to torchvision on the same tensor."""
    from torchvision.transforms import v2

    x = images(2, *hw).permute(0, 3, 1, 2)
    want = v2.CenterCrop(64)(v2.Resize(64, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(x).clamp(0, 1))
    torch.testing.assert_close(common.resize_center_crop(x, 64), want, atol=1e-6, rtol=0)


def test_clip_resize_long_side_is_truncated_not_rounded():
    """100x334 -> 64 x int(213.76) = 213 (round() would give 214 and shift the crop by one pixel)."""
    seen = {}
    real = common.resize
    common_resize = lambda x, size, clamp=True: seen.setdefault("size", size) and real(x, size, clamp)  # noqa: E731
    try:
        common.resize = common_resize
        common.resize_center_crop(images(1, 100, 334).permute(0, 3, 1, 2), 64)
    finally:
        common.resize = real
    assert seen["size"] == (64, 213)


@pytest.mark.parametrize("hw", [(72, 56), (56, 90), (30, 200), (56, 56), (201, 57)])
def test_hps_letterbox_equals_the_official_geometry(hw):
    x = images(2, *hw)
    want = hps_letterbox_preprocess(x, 56) * OPENAI_STD + OPENAI_MEAN
    torch.testing.assert_close(common.letterbox(x.permute(0, 3, 1, 2), 56), want, atol=1e-6, rtol=0)


def test_letterbox_pads_an_image_whose_long_side_already_fits():
    """The original leaves a 56x30 image unpadded when the model size is 56 (its ViT then fails): we pad it."""
    out = common.letterbox(images(1, 56, 30).permute(0, 3, 1, 2), 56)
    assert out.shape[-2:] == (56, 56) and out[..., :, :13].abs().max() == 0 and out[..., :, 43:].abs().max() == 0


class _FixedMetric:
    def __init__(self, name, values):
        self.name, self.values = name, torch.tensor(values)

    def __call__(self, images, prompts=None):
        return self.values


def test_log_jaq_is_ln_of_the_mean_like_the_official_criterion():
    """Official ``new``: torch.log(CLIPScore().compute()) + k*mean(CLIP-IQA); compute() is the mean over images.
    Two sets where ln-of-mean and mean-of-ln disagree on the ranking."""
    k = 2.0
    a_tc, a_iq = [10.0, 40.0], [0.50, 0.50]  # uneven alignment
    b_tc, b_iq = [21.0, 21.0], [0.52, 0.52]  # even
    jaq = lambda tc, iq, t: JAQ(_FixedMetric("clipscore", tc), _FixedMetric("clipiqa", iq), k=k, tc_transform=t)  # noqa: E731
    official = lambda tc, iq: math.log(sum(tc) / len(tc)) + k * sum(iq) / len(iq)  # noqa: E731
    per_image = lambda tc, iq: sum(math.log(t) + k * q for t, q in zip(tc, iq)) / len(tc)  # noqa: E731
    for tc, iq in ((a_tc, a_iq), (b_tc, b_iq)):
        assert jaq(tc, iq, "log").aggregate(torch.tensor(tc), torch.tensor(iq)) == pytest.approx(official(tc, iq))
        assert jaq(tc, iq, "log_per_image").aggregate(torch.tensor(tc), torch.tensor(iq)) == pytest.approx(
            per_image(tc, iq))
        assert jaq(tc, iq, "identity").aggregate(torch.tensor(tc), torch.tensor(iq)) == pytest.approx(
            sum(t + k * q for t, q in zip(tc, iq)) / 2)
    assert official(a_tc, a_iq) > official(b_tc, b_iq) and per_image(a_tc, a_iq) < per_image(b_tc, b_iq)
    j = jaq(a_tc, a_iq, "log")
    assert j.score_rule == "ln(mean TC) + k*mean(IQ)" and jaq(a_tc, a_iq, "identity").score_rule == "mean(JAQ_i)"
    # per image, combine() is still ln(TC_i) + k*IQ_i
    torch.testing.assert_close(j.score(None, ["p", "p"]), torch.tensor([math.log(10) + 1.0, math.log(40) + 1.0]))
    with pytest.raises(ValueError, match="tc_transform must be one of"):
        JAQ(_FixedMetric("clipscore", [1.0]), _FixedMetric("clipiqa", [1.0]), tc_transform="ln")


def test_runner_ranks_points_by_the_aggregate():
    from qsched_pack.calibration.runner import point_score

    j = JAQ(_FixedMetric("clipscore", [10.0, 40.0]), _FixedMetric("clipiqa", [0.5, 0.5]), tc_transform="log")
    comps = {"tc": [10.0, 40.0], "iq": [0.5, 0.5]}
    per_image = [math.log(10.0) + 1.0, math.log(40.0) + 1.0]
    assert point_score(j, per_image, comps) == pytest.approx(math.log(25.0) + 1.0)
    assert point_score(object(), per_image, comps) == pytest.approx(sum(per_image) / 2)


class _Tok:
    def __init__(self, text, pos):
        self.text, self.pos_, self.is_punct = text, pos, pos == "PUNCT"
        self.is_stop = text.lower() in {"front", "side", "top", "the", "of", "a", "on"}  # spaCy's list has these


class _Doc(list):
    def __init__(self, toks, chunk_starts):
        super().__init__(toks)
        self.noun_chunks = [types.SimpleNamespace(start=s) for s in chunk_starts]


def test_spacy_nouns_filter_with_function_words_only(monkeypatch):
    """The official AQ-MAP drops NLTK stop words (function words); spaCy's is_stop would drop 'front' and 'top'."""
    from qsched_pack.calibration.metrics import nouns

    doc = _Doc([_Tok("the", "DET"), _Tok("front", "NOUN"), _Tok("of", "ADP"), _Tok("a", "DET"), _Tok("car", "NOUN"),
                _Tok("on", "ADP"), _Tok("the", "DET"), _Tok("top", "NOUN")], [0, 3, 6])
    monkeypatch.setattr(nouns, "_spacy", lambda: (lambda prompt: doc))
    assert nouns.spacy_nouns("the front of a car on the top") == ["front", "car", "top"]
    assert {"the", "of", "a", "on", "not", "nor", "wouldn't"} <= nouns.NLTK_STOPWORDS
    assert not {"front", "side", "top", "bottom", "name", "back", "part"} & nouns.NLTK_STOPWORDS
    assert len(nouns.NLTK_STOPWORDS) == 179


def test_rule_nouns_handle_non_ascii_prompts():
    assert rule_nouns("a café in Zürich next to the old Straße") == ["café", "Zürich", "Straße"]
    assert rule_nouns("the front of a house") == ["front", "house"]
    assert rule_nouns("東京 tower at night") == ["tower", "night"]
    assert rule_nouns("ÉCOLE, naïve façade") == ["ÉCOLE", "façade"]


def test_prompt_errors_are_clear():
    with pytest.raises(ValueError, match="prompts are missing"):
        common.check_prompts(None, 2)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        common.check_prompts(["a", 3], 2)
    with pytest.raises(TypeError, match="must be a string or a list of strings"):
        common.check_prompts(5, 1)
    with pytest.raises(TypeError, match="must be a string or a list of strings"):
        common.check_prompts(b"bytes", 1)


def test_overshoot_messages_tell_the_real_cause():
    x = images(1)
    with pytest.raises(ValueError, match=r"max is 1.01\. The values overshoot 1 slightly.*clamp"):
        common.check_images(x * 1.01)
    with pytest.raises(ValueError, match="0..255 pixels: divide by 255"):
        common.check_images(x * 200)
    with pytest.raises(ValueError, match="dip below 0 slightly"):
        common.check_images(x - x.min() - 0.02)
    with pytest.raises(ValueError, match="-1..1"):
        common.check_images(x * 2 - 1)
