"""Calibration prompts: the shipped 20 and the user-file loaders (txt, sDCI-like YAML mapping, JSON)."""

import json

import pytest

from qsched_pack.calibration.prompts import DEFAULT_FILE, default_prompts, load_prompts


def test_default_prompts_are_20_long_multi_object_and_unique():
    p = default_prompts()
    assert len(p) == 20 and len(set(p)) == 20
    assert all(len(x.split()) >= 30 for x in p)  # long, descriptive (sDCI-like)
    assert all(x.count(",") >= 2 for x in p)  # several objects each
    assert DEFAULT_FILE.read_text().count("\n") == 20


def test_txt_yaml_json_loaders(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nfirst prompt\n\n  second prompt  \n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    # sDCI.yaml layout: image name -> caption, taken in file order
    (tmp_path / "s.yaml").write_text("sa_1.jpg: >-\n  A long caption\n  over two lines.\nsa_0.jpg: Another one.\n")
    assert load_prompts(tmp_path / "s.yaml") == ["A long caption over two lines.", "Another one."]
    (tmp_path / "l.yml").write_text("- one\n- two\n- three\n")
    assert load_prompts(tmp_path / "l.yml", limit=2) == ["one", "two"]
    (tmp_path / "p.json").write_text(json.dumps(["a", "b"]))
    assert load_prompts(tmp_path / "p.json") == ["a", "b"]


@pytest.mark.parametrize("name,text,msg", [
    ("e.txt", "\n# only a comment\n", "no prompts found"),
    ("e.json", "[]", "no prompts found"),
    ("b.json", "[1, 2]", "entry 0 must be a non-empty string"),
    ("b.yaml", "a: ''\n", "entry 'a' must be a non-empty string"),
    ("b2.yaml", "just text", "expected a list of prompts or a mapping"),
    ("x.csv", "a,b", "must end in one of .txt, .yaml, .yml, .json"),
    ("bad.json", "[", "not valid JSON"),
])
def test_bad_prompt_files_name_the_file(tmp_path, name, text, msg):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=msg) as e:
        load_prompts(tmp_path / name)
    assert name in str(e.value)


def test_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found: .*nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ValueError, match="limit must be an integer >= 1"):
        load_prompts(tmp_path / "p.txt", limit=0)
