"""The tiny world (issue 7): data, deterministic training, scorers, reference metric, sampling, quantization."""

import pytest
import torch

pytest.importorskip("sklearn", reason="the tiny world's data ships in scikit-learn (pip install scikit-learn)")

from qsched_pack.qsched import Coefficients, samplers  # noqa: E402
from qsched_pack.qsched.schedules import few_step_sigmas  # noqa: E402
from qsched_pack.calibration.tinyworld import data as D  # noqa: E402
from qsched_pack.calibration.tinyworld.metrics import frechet_distance  # noqa: E402
from qsched_pack.calibration.tinyworld.model import FlowDenoiser  # noqa: E402
from qsched_pack.calibration.tinyworld.checkpoint import PACKAGED  # noqa: E402
from qsched_pack.calibration.tinyworld.train import TrainConfig, save_world, train_world  # noqa: E402
from qsched_pack.calibration.tinyworld.world import TinyWorld  # noqa: E402


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reduced():
    return train_world(TrainConfig.reduced(), log=None)


@pytest.fixture(scope="module")
def world():
    """The committed, fully trained world (calibration/tinyworld/weights/tiny_world.safetensors)."""
    assert PACKAGED.is_file(), f"{PACKAGED} is missing: train it with python -m qsched_pack.calibration.tinyworld.train"
    return TinyWorld.from_file(PACKAGED)


@pytest.fixture(scope="module")
def heldout():
    return D.load_digit_set("heldout")


# ------------------------------------------------------------------------------------------------ data
def test_split_is_deterministic_disjoint_and_covers_everything():
    train, held, full = D.load_digit_set("train"), D.load_digit_set("heldout"), D.load_digit_set("all")
    assert len(train) + len(held) == len(full) == 1797
    assert set(train.index.tolist()).isdisjoint(held.index.tolist())
    assert (held.index % 5 == 0).all()
    assert train.images.shape[1:] == (1, 16, 16) and 0 <= float(train.images.min()) and float(train.images.max()) <= 1
    again = D.load_digit_set("train")
    assert torch.equal(again.images, train.images) and torch.equal(again.styles, train.styles)


def test_styles_split_each_digit_by_its_own_ink_median():
    full = D.load_digit_set("all")
    ink = full.images.reshape(len(full), -1).sum(1)
    for d in range(10):
        m = full.digits == d
        thick, thin = ink[m & (full.styles == 1)], ink[m & (full.styles == 0)]
        assert abs(len(thick) - len(thin)) <= len(thin) // 5  # roughly balanced per class
        assert thick.mean() > thin.mean()


def test_prompts_round_trip_and_bad_prompts_raise():
    prompts = D.all_prompts()
    assert len(set(prompts)) == 20 and prompts[15] == "a handwritten digit seven, thick stroke"
    assert [D.parse_prompt(p) for p in prompts] == [(d, s) for d in range(10) for s in range(2)]
    assert D.parse_prompt("a seven") == (7, None)
    with pytest.raises(ValueError, match="exactly one digit"):
        D.parse_prompt("a cat")
    with pytest.raises(ValueError, match="exactly one digit"):
        D.parse_prompt("one or two")
    ids = D.tokenize(["a handwritten digit seven, thick stroke", "zebra"])
    assert ids[0, :6].tolist() == [D.VOCAB.index(w) for w in "a handwritten digit seven thick stroke".split()]
    assert ids[1].tolist() == [1] + [0] * 11


def test_degradations_change_images_more_with_strength(heldout):
    x = heldout.images[:32]
    for kind in D.DEGRADATIONS:
        assert torch.equal(D.degrade(x, kind, 0.0, torch.Generator().manual_seed(0)), x)
        d1 = (D.degrade(x, kind, 0.3, torch.Generator().manual_seed(0)) - x).abs().mean()
        d2 = (D.degrade(x, kind, 0.9, torch.Generator().manual_seed(0)) - x).abs().mean()
        assert 0 < d1 < d2, kind


# ------------------------------------------------------------------------------------------------ training
def _state(world):
    return {f"{part}.{k}": v for part in ("generator", "text_encoder", "tc", "iq", "ref")
            for k, v in world[part].state_dict().items()}


def test_reduced_training_is_deterministic(reduced):
    again = train_world(TrainConfig.reduced(), log=None)
    a, b = _state(reduced), _state(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_gives_other_weights(reduced):
    cfg = TrainConfig.reduced()
    cfg.seed_gen, cfg.tc_epochs, cfg.iq_epochs, cfg.ref_epochs = 7, 0, 0, 0
    other = train_world(cfg, log=None)
    w0 = reduced["generator"].x_embedder.weight
    assert not torch.equal(other["generator"].x_embedder.weight, w0)


def test_weights_file_round_trips(reduced, tmp_path):
    path = save_world(reduced, tmp_path / "w.safetensors")
    loaded = TinyWorld.from_file(path)
    for name, net in (("generator", loaded.generator), ("tc", loaded.tc_net), ("ref", loaded.ref_net)):
        for k, v in reduced[name].state_dict().items():
            assert torch.equal(net.state_dict()[k], v)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        TinyWorld.from_file(tmp_path / "bad.safetensors")


def test_generator_layers_suit_group_quantization(world):
    from qsched_pack.calibration.tinyworld.model import QUANT_SKIP

    linears = {n: m for n, m in world.generator.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = [n for n in linears if not any(n == p or n.startswith(p + ".") for p in QUANT_SKIP)]
    assert quantized and all(linears[n].in_features % 64 == 0 for n in quantized)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_reduced_model_samples_through_qsched_samplers(reduced, steps):
    w = TinyWorld.from_training(reduced)
    prompts = D.all_prompts()[:4]
    den = FlowDenoiser(w.generator, w.text_encoder.encode(prompts))
    sigmas = few_step_sigmas("flux_schnell", steps).float()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in ("euler", "euler_ancestral", "lcm"):
        out = samplers.SAMPLERS[name](den, x.clone(), sigmas, {"seed": 0}, disable=True, parameterization="flow")
        assert out.shape == x.shape and torch.isfinite(out).all()
    images = w.sampler(steps).generate(Coefficients.identity(steps), prompts, [0, 1, 2, 3])
    assert images.shape == (4, 16, 16, 3) and 0 <= float(images.min()) and float(images.max()) <= 1


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_generator_uses_common_random_numbers(world, sampler):
    gen = world.sampler(4, sampler=sampler)
    prompts, seeds = D.all_prompts()[:6], [10, 11, 12, 13, 14, 15]
    batch = gen.generate(None, prompts, seeds)
    assert torch.equal(gen.generate(Coefficients.identity(4), prompts, seeds), batch)  # c = 1 is the stock sampler
    alone = gen.generate(None, prompts[2:3], seeds[2:3])
    torch.testing.assert_close(alone, batch[2:3], rtol=0, atol=1e-5)
    moved = gen.generate(Coefficients.ramp(4, 1.1, 1.0, 0.9, 1.0), prompts, seeds)
    assert (moved - batch).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_trained_model_draws_the_prompted_digits(world, steps):
    prompts = [p for p in D.all_prompts() for _ in range(4)]
    images = world.sampler(steps).generate(None, prompts, list(range(len(prompts))))
    acc = world.reference().accuracy(images, prompts)
    assert acc > 0.7, f"{steps} steps: reference accuracy {acc:.2f}"


# ------------------------------------------------------------------------------------------------ scorers
def _noisy_blurred(x):
    g = torch.Generator().manual_seed(0)
    return {"noise": D.degrade(x, "noise", 0.6, g), "blur": D.degrade(x, "blur", 0.6, g),
            "pure noise": torch.rand(x.shape, generator=g)}


def test_scorers_rank_real_heldout_digits_above_degraded(world, heldout):
    tc, iq = world.text_alignment(), world.image_quality()
    real = D.to_image(heldout.images)
    prompts = heldout.prompts
    tc_real, iq_real = tc(real, prompts), iq(real, prompts)
    assert tc_real.shape == iq_real.shape == (len(heldout),) and tc_real.dtype == torch.float32
    assert 0 <= float(tc_real.min()) and float(tc_real.max()) <= 100 and 0 <= float(iq_real.min()) <= 1
    for name, bad in _noisy_blurred(heldout.images).items():
        bad = D.to_image(bad)
        assert iq(bad, prompts).mean() < iq_real.mean() - 0.2, name
        assert tc(bad, prompts).mean() < tc_real.mean(), name
    # the alignment score reads the prompt: the right prompt beats a wrong digit
    wrong = [D.prompt_for((int(d) + 1) % 10, int(s)) for d, s in zip(heldout.digits, heldout.styles)]
    assert tc(real, wrong).mean() < tc_real.mean() / 4


def test_tc_without_style_marginalises(world, heldout):
    tc = world.text_alignment()
    real = D.to_image(heldout.images[:16])
    digit_only = [f"a handwritten digit {D.DIGIT_NAMES[int(d)]}" for d in heldout.digits[:16]]
    both = [D.prompt_for(int(d), s) for d in heldout.digits[:16] for s in (0, 1)]
    summed = tc(real.repeat_interleave(2, 0), both).reshape(16, 2).sum(1)
    torch.testing.assert_close(tc(real, digit_only), summed, rtol=1e-5, atol=1e-4)


def test_scorers_reject_wrong_layouts(world):
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        world.image_quality()(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="0..1"):
        world.image_quality()(torch.rand(2, 16, 16, 3) * 255)
    with pytest.raises(ValueError, match="one prompt string per image"):
        world.text_alignment()(torch.rand(3, 16, 16, 3), ["a one", "a two"])


def test_jaq_combines_the_tiny_scorers(world, heldout):
    jaq_mod = pytest.importorskip("qsched_pack.calibration.jaq")
    jaq = jaq_mod.JAQ(tc=world.text_alignment(), iq=world.image_quality(), k=2.0)
    real = D.to_image(heldout.images[:20])
    comps = jaq.components(real, heldout.prompts[:20])
    assert set(comps) >= {"tc", "iq", "tiny_tc", "tiny_iq"}
    torch.testing.assert_close(jaq.score(real, heldout.prompts[:20]), comps["tc"] + 2.0 * comps["iq"])


# ------------------------------------------------------------------------------------------------ reference metric
def test_frechet_distance_is_zero_for_identical_sets_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) < 1e-8
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # mean shift only
    b = torch.randn(500, 8, generator=g, dtype=torch.float64) * 2.0  # cov 4I vs ~I: tr = 8·(1 + 4 − 2·2) = 8
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.25)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :4])


def test_reference_fd_grows_with_degradation(world, heldout):
    ref = world.reference()
    real = D.to_image(heldout.images)
    assert ref.fd(real) < 1e-6
    for kind in ("noise", "blur"):
        fds = [ref.fd(D.to_image(D.degrade(heldout.images, kind, s, torch.Generator().manual_seed(0))))
               for s in (0.2, 0.5, 0.9)]
        assert 0 < fds[0] < fds[1] < fds[2], (kind, fds)
    assert ref.accuracy(real, heldout.prompts) > 0.9


# ------------------------------------------------------------------------------------------------ quantization
def test_quantized_generators_are_worse_on_the_reference_metric(world):
    pytest.importorskip("qsched_pack.qsched.quant")
    prompts = [p for p in D.all_prompts() for _ in range(10)]
    seeds = list(range(len(prompts)))
    ref = world.reference()
    fp = ref.evaluate(world.sampler(4).generate(None, prompts, seeds), prompts)
    net, report = world.quantized_generator("w4a4")
    assert report.quantized and all(k == "simulated" for k in report.quantized.values())
    assert not any(p.requires_grad for p in world.generator.parameters())  # the FP model is untouched
    q = ref.evaluate(world.sampler(4, net=net, quant="w4a4").generate(None, prompts, seeds), prompts)
    assert q["fd"] > fp["fd"] * 1.2, (fp, q)
    assert all(type(m) is torch.nn.Linear for n, m in world.generator.named_modules() if n.endswith("fc1"))


# ------------------------------------------------------------------------------------------------ experiment
def test_reduced_experiment_runs_end_to_end_and_reproduces(world, tmp_path):
    pytest.importorskip("qsched_pack.calibration.search")
    from qsched_pack.calibration.tinyworld.experiment import run

    kw = dict(steps_list=(2,), formats=("w4a4",), seeds=(0,), per_prompt=2, points=5, strategies=("zoom",),
              weights=str(PACKAGED), log=None)
    a = run(str(tmp_path / "a"), **kw)
    b = run(str(tmp_path / "b"), **kw)
    methods = [x["method"] for x in a["rows"]]
    assert methods == ["fp32", "naive", "ptqd", "qsched-zoom"]
    qs = a["rows"][-1]
    assert qs["images"] > 0 and len(qs["c_x"]) == 2 and qs["calib_jaq"] >= qs["calib_jaq_identity"]
    strip = lambda rows: [{k: v for k, v in x.items() if k != "search_seconds"} for x in rows]  # noqa: E731
    assert strip(a["rows"]) == strip(b["rows"])
    table = (tmp_path / "a" / "table.md").read_text()
    assert "| 2 | W4A4 | qsched-zoom |" in table and "| 2 | FP32 | fp32 |" in table


def test_reduced_experiment_table_is_byte_identical_and_guard_rows_copy_the_chosen_method(world, tmp_path):
    pytest.importorskip("qsched_pack.calibration.search")
    from qsched_pack.calibration.tinyworld.experiment import METRICS, run

    kw = dict(steps_list=(4,), formats=("w8a8", "w4a4"), seeds=(0, 1), per_prompt=1, points=5, strategies=("zoom",),
              weights=str(PACKAGED), guard=True, log=None)
    a = run(str(tmp_path / "a"), **kw)
    run(str(tmp_path / "b"), **kw)
    assert (tmp_path / "a" / "table.md").read_bytes() == (tmp_path / "b" / "table.md").read_bytes()
    rows = a["rows"]
    guarded = [x for x in rows if x["method"] == "qsched-zoom+guard"]
    assert len(guarded) == 4
    for g in guarded:
        same = lambda m: next(x for x in rows if x["method"] == m and x["format"] == g["format"]  # noqa: E731
                              and x["seed"] == g["seed"])
        src = same("qsched-zoom") if g["accepted"] else same("naive")
        assert all(g[k] == src[k] for k in METRICS)
        assert g["accepted"] == (not g["guard"]["reasons"])
        if not g["accepted"]:
            assert g["c_x"] == [1.0] * 4 and g["c_eps"] == [1.0] * 4
    # W8A8 loses (next to) nothing on this model, yet the search gains JAQ: the FP-anchored checks reject it
    for g in (g for g in guarded if g["format"] == "w8a8"):
        assert not g["accepted"] and g["guard"]["gain"] > 0
        assert any(r.startswith(("nothing to recover", "overshoot")) for r in g["guard"]["reasons"])
    assert "qsched-zoom+guard (accepted" in (tmp_path / "a" / "table.md").read_text()


# ------------------------------------------------------------------------------------------------ guard
def _synthetic_result(fn, points=5):
    from qsched_pack.calibration.runner import calibrate
    from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator

    gen = SyntheticGenerator(fn, steps=2, name="guard")
    return calibrate(gen, ImageStatScorer(k=0.0), [f"p{i}" for i in range(20)], space="start", strategy="grid",
                     points=points, seed=0)


def _scores(result, point):
    return next(list(p.per_prompt) for p in result.points if tuple(p.point) == tuple(point))


def test_guard_accepts_a_consistent_gain_and_rejects_noise_and_identity():
    from qsched_pack.calibration.tinyworld.guard import acceptance

    clear = _synthetic_result(lambda c, p, s: -(c.c_x[0] - 1.1) ** 2 + 0.01 * (s % 3))
    acc = acceptance(clear)
    assert clear.best_point == (1.1, 1.0) and acc.accept and acc.reasons == []
    assert acc.gain == pytest.approx(0.01) and acc.gain_se == pytest.approx(0.0, abs=1e-12)
    assert acc.choice(clear) == clear.best

    # the best point wins on the mean, but its gain is a few prompts' luck: within 2 SE of the spread
    noisy = _synthetic_result(lambda c, p, s: (c.c_x[0] - 1.0) * (1.0 if s < 11 else -1.0))
    acc = acceptance(noisy)
    assert noisy.best_point[0] == 1.2 and noisy.improvement > 0
    assert not acc.accept and acc.reasons == ["JAQ gain within 2 SE of the seed-to-seed spread"]
    assert acc.choice(noisy) == Coefficients.identity(2)
    assert acceptance(noisy, z=0.1).accept  # a looser threshold lets it through

    flat = _synthetic_result(lambda c, p, s: 1.0)
    assert acceptance(flat).reasons == ["best is identity"]


def test_guard_with_the_fp_model_rejects_nothing_to_recover_and_overshoot():
    from qsched_pack.calibration.tinyworld.guard import acceptance

    res = _synthetic_result(lambda c, p, s: -(c.c_x[0] - 1.1) ** 2 + 0.01 * (s % 3))
    ident = _scores(res, (1.0, 1.0))
    jitter = [1e-4 * ((i * 7) % 5 - 2) for i in range(20)]  # a small, nonzero spread

    none_lost = acceptance(res, [v + j for v, j in zip(ident, jitter)])
    assert not none_lost.accept and none_lost.loss == pytest.approx(0.0, abs=1e-4)
    assert none_lost.reasons == ["nothing to recover: the quantized model is within noise of FP on JAQ",
                                 "overshoot: best scores above the FP model (the scorers are being gamed)"]

    # FP32 was 0.005 above identity, the best is 0.01 above identity: it overshoots the FP model
    over = acceptance(res, [v + 0.005 + j for v, j in zip(ident, jitter)])
    assert over.loss == pytest.approx(0.005, abs=1e-4) and over.overshoot == pytest.approx(0.005, abs=1e-4)
    assert over.reasons == ["overshoot: best scores above the FP model (the scorers are being gamed)"]

    # FP32 0.02 above identity: a real loss, half of it recovered -> accepted
    ok = acceptance(res, [v + 0.02 + j for v, j in zip(ident, jitter)])
    assert ok.accept and ok.overshoot == pytest.approx(-0.01, abs=1e-4)
    assert "accept" in ok.line() and "loss vs FP +0.020" in ok.line()

    with pytest.raises(ValueError, match="fp_scores has 3 values for 20"):
        acceptance(res, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="z must be"):
        acceptance(res, z=-1)


def test_stored_results_table_matches_its_data_and_one_setting_recomputes(world, tmp_path):
    """benchmarks/results/tiny_experiment.{md,json} (the README/docs table) come from this code and these weights:
    the table is the formatting of the stored rows, and re-running one (steps, format, seed) gives the stored
    rows (same search path; metrics to float-noise tolerance, since another CPU may round differently)."""
    import json
    from pathlib import Path

    from qsched_pack.calibration.tinyworld.experiment import METRICS, format_table, run

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    stored = json.loads((results / "tiny_experiment.json").read_text())
    assert stored["config"]["model_hash"] == world.model_hash
    assert format_table(stored) == (results / "tiny_experiment.md").read_text()
    cfg = stored["config"]
    again = run(str(tmp_path / "one"), steps_list=(2,), formats=("w4a4",), seeds=(1,), per_prompt=cfg["per_prompt"],
                points=cfg["points"], strategies=("zoom",), guard=True, weights=str(PACKAGED), log=None)
    for row in again["rows"]:
        old = next(x for x in stored["rows"] if all(x[k] == row[k] for k in ("steps", "format", "method", "seed")))
        for k in ("images", "c_x", "c_eps", "accepted"):
            assert old.get(k) == row.get(k), (row["method"], k)
        for k in METRICS:
            assert row[k] == pytest.approx(old[k], rel=1e-4, abs=1e-6), (row["method"], k)
