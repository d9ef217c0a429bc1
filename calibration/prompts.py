"""Calibration prompts: the project's own 20 and loaders for user files.

The paper calibrates on the first 20 prompts of sDCI (summarised Densely Captioned Images: long,
multi-sentence descriptions of scenes with several objects). Those captions are not ours to ship, so
``data/calibration_prompts.txt`` holds 20 original prompts written in the same spirit: one scene each, several
named objects with colours, materials, positions and lighting. Users can bring their own:

* ``.txt``  one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``.yaml`` / ``.yml`` a mapping ``name: prompt`` like ``sDCI.yaml`` (values in file order) or a list;
* ``.json`` a list of strings (or a mapping ``name: prompt``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..qsched._io import PROMPTS_MAX_BYTES, brief, check_nesting, read_text_capped

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_FILE = DATA / "calibration_prompts.txt"
FORMATS = (".txt", ".yaml", ".yml", ".json")


def default_prompts() -> list[str]:
    """The project's 20 calibration prompts."""
    return load_prompts(DEFAULT_FILE)


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Prompts from a user file (format by extension, see the module docstring); ``limit`` keeps the first N."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in FORMATS:
        raise ValueError(f"{p}: prompt file must end in one of {', '.join(FORMATS)} (got {p.suffix or 'no suffix'!r})")
    try:
        text = read_text_capped(p, PROMPTS_MAX_BYTES, "prompt file")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file not found: {p}") from None
    except IsADirectoryError:
        raise ValueError(f"{p}: is a folder, not a prompt file") from None
    suffix = p.suffix.lower()
    if suffix != ".txt":
        check_nesting(text, str(p))
    if suffix == ".txt":
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    elif suffix == ".json":
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{p}: not valid JSON ({str(exc) or 'nested too deeply'})") from None
        prompts = _from_data(data, p)
    else:
        import yaml

        try:
            data = yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 (SafeLoader, aliases refused)
        except (yaml.YAMLError, RecursionError) as exc:
            raise ValueError(f"{p}: not valid YAML ({str(exc)[:300] or 'nested too deeply'})") from None
        prompts = _from_data(data, p)
    if not prompts:
        raise ValueError(f"{p}: no prompts found (prompt list is empty)")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        prompts = prompts[:limit]
    return prompts


@functools.lru_cache(maxsize=1)
def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses aliases (``*name``): a few hundred bytes of nested aliases expand to
        billions of entries (an alias bomb); prompt files never need them."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a prompt file; "
                                                  "write each prompt out", event.start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


def _no_constant(name: str):
    raise ValueError(f"{name} is not a prompt")


def _from_data(data, path: Path) -> list[str]:
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = list(enumerate(data))
    else:
        raise ValueError(f"{path}: expected a list of prompts or a mapping name -> prompt, got "
                         f"{type(data).__name__}")
    out = []
    for key, value in items:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: entry {brief(key, 40)} must be a non-empty string, got {brief(value)}")
        out.append(" ".join(value.split()))
    return out
