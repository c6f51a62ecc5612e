"""The deploy templates (``templates/``, package data): ``{{name}}`` placeholders, nothing else is special, so
the shell scripts and Python files stay plain bash and Python."""
from __future__ import annotations

import re
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
_VAR = re.compile(r"\{\{(\w+)\}\}")


def fill_template(name: str, **values) -> str:
    """``templates/<name>`` with every ``{{key}}`` replaced; a placeholder without a value, or a value without
    a placeholder, is a bug in the caller and raises."""
    path = TEMPLATES_DIR / name
    text = path.read_text()
    used = set(_VAR.findall(text))
    if used != set(values):
        raise KeyError(f"{path}: placeholders {sorted(used)} but values for {sorted(values)}")
    return _VAR.sub(lambda m: str(values[m.group(1)]), text)
