import json
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsched_pack.qsched import Coefficients
from qsched_pack.qsched.coefficients import C_MAX

valid = st.floats(min_value=1e-6, max_value=C_MAX, allow_nan=False, allow_infinity=False)
invalid = st.one_of(st.floats(max_value=0.0), st.floats(min_value=C_MAX, exclude_min=True), st.just(float("nan")),
                    st.just(float("inf")), st.just(float("-inf")))


def test_identity_and_ramp_match_official_linspace():
    c = Coefficients.identity(4)
    assert c.is_identity and c.c_x == (1.0,) * 4 and c.steps == 4
    # scripts/collect_images.sh: c_eps = linspace(0.955, 1.099, 4), c_x = linspace(1.012, 0.967, 4)
    r = Coefficients.ramp(4, 1.012, 0.967, 0.955, 1.099)
    assert r.c_eps == pytest.approx([0.955, 1.003, 1.051, 1.099], abs=1e-12)
    assert r.c_x == pytest.approx([1.012, 0.997, 0.982, 0.967], abs=1e-12)
    assert Coefficients.ramp(1, 0.9, 1.0, 1.1, 1.0).c_x == (0.9,)  # linspace(s, 1, 1) == [s]
    assert not r.is_identity


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(valid, valid), min_size=1, max_size=16))
def test_json_round_trip_is_exact(pairs):
    c = Coefficients([p[0] for p in pairs], [p[1] for p in pairs], {"family": "sdxl_turbo"})
    back = Coefficients.from_json(c.to_json())
    assert back == c and back.metadata == c.metadata
    assert Coefficients.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@settings(max_examples=200, deadline=None)
@given(st.lists(valid, min_size=1, max_size=8), st.integers(0, 7), invalid)
def test_validator_rejects_every_bad_value_naming_the_field(values, pos, bad):
    pos = pos % len(values)
    vals = list(values)
    vals[pos] = bad
    with pytest.raises(ValueError, match=rf"value {pos + 1} of c_eps must be finite and in \(0, 10\]"):
        Coefficients([1.0] * len(vals), vals)
    with pytest.raises(ValueError, match=rf"value {pos + 1} of c_x"):
        Coefficients(vals, [1.0] * len(vals))


@settings(max_examples=200, deadline=None)
@given(st.lists(valid, min_size=1, max_size=8), st.sampled_from([", ", ",", " ", "; ", "\n"]))
def test_parse_list_reads_what_it_prints(values, sep):
    text = sep.join(repr(v) for v in values)
    assert Coefficients.parse_list(text, len(values)) == tuple(values)


@given(valid, st.integers(1, 12))
def test_parse_list_broadcasts_a_single_value(v, steps):
    assert Coefficients.parse_list(repr(v), steps) == (v,) * steps


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_parse_list_never_crashes_with_anything_but_valueerror(text):
    try:
        out = Coefficients.parse_list(text, 3, "c_x override")
    except ValueError as exc:
        assert "c_x override" in str(exc)
    else:
        assert len(out) == 3 and all(0 < v <= C_MAX for v in out)


def test_parse_list_errors():
    with pytest.raises(ValueError, match="c_x is empty"):
        Coefficients.parse_list("  ", 4, "c_x")
    with pytest.raises(ValueError, match=r"value 2 of c_x, 'abc', is not a number"):
        Coefficients.parse_list("1.0, abc", 2, "c_x")
    with pytest.raises(ValueError, match="has 3 values but steps = 4: give 1 value or 4 values"):
        Coefficients.parse_list("1, 1, 1", 4, "c_x")


@pytest.mark.parametrize("kwargs,match", [
    (dict(c_x=[1.0, 1.0], c_eps=[1.0]), "same length"),
    (dict(c_x=[], c_eps=[]), "must have 1..1000 values"),
    (dict(c_x="1,1", c_eps=[1.0, 1.0]), "c_x must be a list"),
    (dict(c_x=[True], c_eps=[1.0]), r"value 1 of c_x must be a number"),
    (dict(c_x=[1.0], c_eps=[1.0], metadata=[1]), "metadata must be a mapping"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Coefficients(**kwargs)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.0, True, "4"])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
        Coefficients.identity(steps)


@pytest.mark.parametrize("text,match", [
    ("{", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"c_x": [1.0]}', "missing c_eps"),
    ('{"c_x": [1.0], "c_eps": [NaN]}', "contains NaN"),
    ('{"c_x": [1.0], "c_eps": [Infinity]}', "contains Infinity"),
    ('{"c_x": [1.0], "c_eps": [1.0], "steps": 2}', "steps must equal the number of c_x values"),
    ('{"c_x": [1.0], "c_eps": [1.0], "format": "other"}', "format must be 'qsched-coefficients'"),
    ('{"c_x": [1.0], "c_eps": [1.0], "version": 2}', "version must be 1"),
    ('{"c_x": [1.0], "c_eps": [1.0], "cx": [1]}', r"unknown preset field\(s\) \['cx'\]"),
    ('{"c_x": [1.0], "c_eps": ["1.0"]}', r"value 1 of c_eps must be a number"),
    ('{"c_x": [0.0], "c_eps": [1.0]}', r"value 1 of c_x must be finite and in \(0, 10\]"),
])
def test_malformed_preset_json(text, match):
    with pytest.raises(ValueError, match=match):
        Coefficients.from_json(text)


def test_save_load_atomic_and_errors_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "presets" / "turbo_w4a8.json"
    c = Coefficients.ramp(4, 0.9, 1.0, 1.1, 1.0).with_metadata(quant="w4a8")
    c.save(path)
    assert Coefficients.load(path) == c
    assert Coefficients.load(path).metadata == {"quant": "w4a8"}
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: presets are shared
    # A crash during the write leaves the previous file intact and no temporary files behind.
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        Coefficients.identity(4).save(path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["turbo_w4a8.json"]
    (tmp_path / "bad.json").write_text('{"c_x": [1.0]}')
    with pytest.raises(ValueError, match=r"bad\.json: preset is missing c_eps"):
        Coefficients.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Coefficients.load(tmp_path / "nope.json")


def test_check_steps_message():
    with pytest.raises(ValueError, match="coefficients have 4 steps .* runs 2 steps"):
        Coefficients.identity(4).check_steps(2)
    assert math.isclose(Coefficients.ramp(3, 0.8, 1.2).c_x[1], 1.0)
