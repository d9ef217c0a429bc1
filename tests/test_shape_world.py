"""The shape world (docs/shape_world.md): renderer and captions, the shipped weights (tiny CLIP loaded by the pack's
own CLIPScore / CLIP-IQA loaders, generators, reference), quantization loss on the reference, and the whole pipeline
(train -> assemble -> experiment) on a reduced CPU setting. ``qsched demo``: tests/test_demo.py."""

import json
import os
import time

import pytest
import torch

pytest.importorskip("open_clip", reason="the JAQ metrics need open_clip_torch")

from qsched_pack.calibration.metrics.clipiqa import CLIPIQA  # noqa: E402
from qsched_pack.calibration.metrics.clipscore import CLIPScore  # noqa: E402
from qsched_pack.calibration.shapeworld import data as D  # noqa: E402
from qsched_pack.calibration.shapeworld import experiment as E  # noqa: E402
from qsched_pack.calibration.shapeworld import report as R  # noqa: E402
from qsched_pack.calibration.shapeworld import train as T  # noqa: E402
from qsched_pack.calibration.runner import calibrate  # noqa: E402
from qsched_pack.calibration.search import SearchSpace  # noqa: E402
from qsched_pack.calibration.shapeworld.world import (CLIP_FILE, PACKAGED, WEIGHTS, PointBatched,  # noqa: E402
                                                      ShapeWorld, assemble)
from qsched_pack.qsched.ptqd import PTQDCorrection  # noqa: E402


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return ShapeWorld.load()


# ---------------------------------------------------------------------------------------------- data
def test_every_caption_parses_back_to_its_factors_and_bad_captions_are_named():
    caps = D.all_captions()
    assert len(caps) == len(set(caps)) == 576
    for c in caps:
        assert D.caption(D.parse_caption(c)) == c
    with pytest.raises(ValueError, match="not a shape-world caption: 'three red circles above a blue square'"):
        D.parse_caption("three red circles above a blue square")
    with pytest.raises(ValueError, match="not a shape-world caption"):
        D.parse_caption("a red circles above a blue square")  # singular count, plural noun
    calib, held = D.prompt_sets()
    assert len(calib) == len(held) == 20 and not set(calib) & set(held)


def test_renders_are_seeded_in_range_and_follow_their_captions():
    caps = D.calibration_prompts()[:6]
    a, b = D.make_scenes(6, 5, captions=caps), D.make_scenes(6, 5, captions=caps)
    assert torch.equal(a.images, b.images) and a.captions == caps
    assert a.images.shape == (6, 3, 32, 32) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert not torch.equal(a.images, D.make_scenes(6, 6, captions=caps).images)
    # a "red" object puts red-dominant pixels in the image, a scene without red has none
    red = [i for i, c in enumerate(caps) if "red" in c]
    no_red = [i for i, c in enumerate(caps) if "red" not in c]
    x = a.images
    reddish = ((x[:, 0] > 0.6) & (x[:, 1] < 0.35) & (x[:, 2] < 0.35)).flatten(1).sum(1)
    assert all(reddish[i] > 10 for i in red) and all(reddish[i] == 0 for i in no_red)


def test_degradations_blur_and_noise_what_they_say():
    x = D.make_scenes(64, 3).images
    y, words = D.degrade(x, torch.Generator().manual_seed(0))
    assert set(words) == {"good", "blurry", "noisy"}
    for i, w in enumerate(words):
        hf = lambda im: (im[:, 1:] - im[:, :-1]).abs().mean()  # noqa: E731  high-frequency energy
        if w == "good":
            assert torch.equal(y[i], x[i])
        elif w == "blurry":
            assert hf(y[i]) < hf(x[i])
        else:
            assert hf(y[i]) > hf(x[i])


# ---------------------------------------------------------------------------------------------- shipped weights
def test_shipped_weights_are_16_bit_and_within_the_size_budget():
    from safetensors import safe_open

    total = (PACKAGED / WEIGHTS).stat().st_size + (PACKAGED / CLIP_FILE).stat().st_size
    assert total <= 10 * 1000 * 1000, total
    for name in (WEIGHTS, CLIP_FILE):
        with safe_open(str(PACKAGED / name), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}, name
            if name == CLIP_FILE:  # CLIP's BPE vocabulary, as the pack's tokenizer needs
                assert f.get_slice("token_embedding.weight").get_shape()[0] == 49408


def test_tiny_clip_loads_through_the_packs_metric_loaders_and_scores_alignment_and_quality(world):
    caps = D.calibration_prompts()[:10]
    real = D.to_image(D.make_scenes(10, 11, captions=caps).images)
    cs, iq = CLIPScore(str(world.clip_path)), CLIPIQA(str(world.clip_path))  # the shipped loaders, unchanged
    right = cs(real, caps)
    wrong = cs(real, caps[1:] + caps[:1])
    assert float(right.mean()) > float(wrong.mean()) + 10, (right, wrong)
    blurry = D.to_image(D.gaussian_blur(D.make_scenes(10, 11, captions=caps).images, torch.full((10,), 1.2)))
    assert float(iq(real).mean()) > 0.9 > 0.2 > float(iq(blurry).mean())


def test_reference_recognises_real_renders_and_punishes_blur(world):
    ref = world.reference()
    caps = [c for c in D.calibration_prompts() for _ in range(5)]
    real = D.make_scenes(len(caps), 99, captions=caps).images
    blurred = D.gaussian_blur(real, torch.full((len(caps),), 1.0))
    good, bad = ref.evaluate(D.to_image(real), caps), ref.evaluate(D.to_image(blurred), caps)
    assert good["accuracy"] >= 0.95 and good["fd"] < bad["fd"] / 3, (good, bad)


def test_generators_are_deterministic_and_quantization_hurts_the_flow_model(world):
    prompts = [c for c in D.calibration_prompts() for _ in range(4)]
    seeds = E.eval_seeds(0, len(prompts))
    fp = world.generator("flow", 4)
    a = fp.generate(None, prompts, seeds)
    assert torch.equal(a, fp.generate(None, prompts, seeds)) and a.shape == (80, 32, 32, 3)
    net, report = world.quantized("flow", "w4a4")
    assert len(report.quantized) >= 15 and "conv_in" not in report.quantized
    q = world.generator("flow", 4, net=net, quant="w4a4").generate(None, prompts, seeds)
    ref = world.reference()
    fd_fp, fd_q = ref.fd(a), ref.fd(q)
    assert fd_q > 1.3 * fd_fp, (fd_fp, fd_q)  # the acceptance setting: FP measurably better than naive W4A4
    for fam in ("lcm", "tcd"):  # the distilled students run through the lcm / tcd samplers (EPS view)
        g = world.generator(fam, 2)
        img = g.generate(None, prompts[:4], seeds[:4])
        assert torch.equal(img, g.generate(None, prompts[:4], seeds[:4])) and 0 <= float(img.min())


# ---------------------------------------------------------------------------------------------- many points per call
@pytest.mark.parametrize("family", ["flow", "lcm", "tcd"])
def test_many_points_per_network_call_give_the_same_images_as_one_point_at_a_time(world, family):
    """``generate_points`` (the grid's fast path: K sampler runs share one network call per step) must give each
    point's images as ``generate`` does (same noise per image, same coefficients), up to float error; in chunks
    (``max_images``) and through a model wrapper (PTQD's), which each run applies to its own calls."""
    prompts = D.calibration_prompts()[:3]
    seeds = E.calib_seeds(0, 3)
    space = SearchSpace("start", 2)
    sets = [None] + [space.coefficients(p) for p in [(0.8, 1.2), (1.1, 0.9), (1.2, 1.2), (1.0, 0.85)]]
    corr = PTQDCorrection(gamma=(0.1, -0.05), delta=((0.01, 0.0, -0.02), (0.0,)))
    for wrapper in (None, corr.wrap):
        gen = world.generator(family, 2, model_wrapper=wrapper)
        one = torch.cat([gen.generate(c, prompts, seeds) for c in sets])
        many = gen.generate_points(sets, prompts, seeds, max_images=6)  # chunks of 2 sets and one of 1
        assert many.shape == one.shape == (15, 32, 32, 3)
        torch.testing.assert_close(many, one, atol=1e-5, rtol=0)
        assert not torch.equal(one[:3], one[3:6])  # the coefficients do act
    # quantized activations are rounded, so a float-level difference (another batch size picks other kernels)
    # can flip a code: images move a little, as they already do when the prompts are split into other batches
    gen = world.generator(family, 2, net=world.quantized(family, "w4a8")[0], quant="w4a8")
    one = torch.cat([gen.generate(c, prompts, seeds) for c in sets])
    assert float((gen.generate_points(sets, prompts, seeds) - one).abs().mean()) < 3e-3


def test_runner_evaluates_a_grid_in_batches_with_the_same_result_and_budget(world):
    gen = world.generator("flow", 2)
    jaq = world.jaq()
    prompts = D.calibration_prompts()[:4]
    kw = dict(space="start", strategy="grid", points=3, seeds=E.calib_seeds(0, 4))
    one = calibrate(gen, jaq, prompts, **kw)
    many = calibrate(PointBatched(gen, 64), jaq, prompts, **kw)
    assert [p.point for p in many.points] == [p.point for p in one.points] and len(one.points) == 9
    assert [p.score for p in many.points] == pytest.approx([p.score for p in one.points], abs=1e-5)
    assert many.best_point == one.best_point and many.images_spent == one.images_spent == 36
    # a budget that ends inside a batch (zoom: 25 coarse points, then a poll of >= 3 of which 2 fit): same stop
    kw.update(strategy="zoom", points=9, budget=110)
    cut, ref = calibrate(PointBatched(gen, 64), jaq, prompts, **kw), calibrate(gen, jaq, prompts, **kw)
    assert cut.stopped == ref.stopped == "budget" and cut.images_spent == ref.images_spent == 108
    assert [p.point for p in cut.points] == [p.point for p in ref.points]
    with pytest.raises(E.DeadlinePassed):  # the experiment's deadline stops a search between batches
        E._search(gen, jaq, 0, 3, "grid", None, batch=64, deadline=time.time() - 1)


def test_a_failing_run_in_a_batch_raises_its_own_error_and_stops_the_others(world):
    made = []

    def wrapper(model, sigmas):
        made.append(1)
        broken = len(made) == 2  # the second run of the batch fails at its first network call

        def call(x, sigma, **kw):
            if broken:
                raise ValueError("run 2 failed")
            return model(x, sigma, **kw)
        return call

    gen = world.generator("tcd", 2, model_wrapper=wrapper)
    space = SearchSpace("start", 2)
    with pytest.raises(ValueError, match="run 2 failed"):
        gen.generate_points([space.coefficients((0.9, 1.0)) for _ in range(4)], D.calibration_prompts()[:2],
                          [1, 2])


# ---------------------------------------------------------------------------------------------- reduced pipeline
@pytest.mark.slow  # 30-50 s on the 2-core CI machine
def test_reduced_pipeline_trains_assembles_and_runs_the_experiment(tmp_path):
    """CI's end-to-end run: every part trained a few steps on the CPU, the files written in the shipped format,
    loaded back, and the experiment's rows (naive, PTQD, Q-Sched with every guard, grid) computed and tabled."""
    parts = tmp_path / "parts"
    T.run_parts(str(parts), T.PARTS, T.REDUCED, torch.device("cpu"), log=None)
    files = assemble(str(parts), str(tmp_path / "w"), dict(T.REDUCED, reduced=True))
    assert os.path.getsize(files["weights"]) > 0 and os.path.getsize(files["clip"]) > 0
    steps = {p: json.loads((parts / f"{p}.steps.json").read_text())["steps"] for p in T.PARTS}
    assert steps == {"flow": 8, "lcm": 4, "tcd": 4, "clip": 10, "ref": 8}
    res = E.run(str(tmp_path / "exp"), families=("tcd",), steps_list=(2,), formats=("w4a4",), seeds=(0,),
                per_prompt=1, points=3, strategies=("zoom", "grid"), weights=str(tmp_path / "w"), device="cpu",
                log=None, batch=40)  # the GPU run's path: a search's points evaluated together
    methods = [x["method"] for x in res["rows"] if x["method"] != "qsched-reference-unchecked"]
    assert methods == ["fp", "fp+qsched-zoom", "naive", "ptqd", "qsched-reference", "qsched-reference-tf",
                       "qsched-reference-x0", "qsched-reference-search", "qsched-hybrid", "qsched-zoom",
                       "qsched-zoom+accept", "qsched-zoom+heldout", "qsched-zoom+trust", "qsched-grid"]
    for x in res["rows"]:
        if x["method"].startswith("qsched-reference") or x["method"] == "qsched-hybrid":
            assert all(k in x for k in E.METRICS), x["method"]
    grid = res["rows"][-1]
    assert grid["images"] == 9 * 20 and all(k in grid for k in E.METRICS)
    table = (tmp_path / "exp" / "table.md").read_text()
    assert "| tcd | 2 | W4A4 | qsched-grid |" in table
    merged = E.merge(str(tmp_path / "m"), [str(tmp_path / "exp" / "results.json")])
    assert merged["rows"] == res["rows"] and merged["config"]["missing"] == merged["config"]["grid_skipped"] == []
    # a worker whose deadline has passed computes nothing and says so; the merge and the report carry it
    late = E.run(str(tmp_path / "late"), families=("tcd",), steps_list=(2,), formats=("w4a4",), seeds=(1,),
                 per_prompt=1, points=3, weights=str(tmp_path / "w"), device="cpu", log=None, deadline=time.time() - 1)
    assert late["rows"] == [] and late["config"]["missing"] == [["tcd", 2, 1, "fp32"], ["tcd", 2, 1, "w4a4"]]
    merged = E.merge(str(tmp_path / "m"), [str(tmp_path / "exp" / "results.json"),
                                           str(tmp_path / "late" / "results.json")])
    assert merged["rows"] == res["rows"] and merged["config"]["grid_skipped"] == [["tcd", 2, 1, "w4a4"]]
    assert "Not computed (time limit): the rows of 2" in (tmp_path / "m" / "table.md").read_text()
    text = R.report(merged)
    assert "### TCD family: FD" in text and "| 2 | W4A4 |" in text and "1 grid searches [['tcd', 2, 1, 'w4a4']]" in text
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n{R.BEGIN}\nold\n{R.END}\ntail\n")
    R.insert(str(doc), text)
    assert doc.read_text() == f"# title\n{R.BEGIN}\n{text}{R.END}\ntail\n"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="needs exactly one <!-- shapeworld-report:begin -->"):
        R.insert(str(doc), text)


def test_training_is_seeded_by_its_config():
    """The same config seed gives the same network (initialisation and batches); another seed gives another
    initialisation (checked with zero training steps, so the batch generator cannot hide an ignored init seed)."""
    cpu = torch.device("cpu")
    scenes = T.pool(T.REDUCED, cpu)
    untrained = [T.train_flow(dict(T.REDUCED, seed=s, flow_steps=0), cpu, log=None, scenes=scenes)[0] for s in (0, 0, 1)]
    assert all(torch.equal(untrained[0][k], untrained[1][k]) for k in untrained[0])
    assert any(not torch.equal(untrained[0][k], untrained[2][k]) for k in untrained[0])
    trained = [T.train_flow(dict(T.REDUCED, seed=0, flow_steps=2), cpu, log=None, scenes=scenes)[0] for _ in range(2)]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
