"""The operator page's files, read as text: what its script may never do.

The page shows values clients chose (keys, ban evidence paths) and values the operator
wrote (route names, the config's source, reload errors): every one goes in as text. A
sink that parses HTML or runs code would turn one of them into script, so the script
uses none, and the page loads nothing from elsewhere.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest


def _ui(name: str) -> str:
    return resources.files("gateway.admin").joinpath("ui").joinpath(name).read_text()


@pytest.mark.parametrize(
    "sink",
    [
        r"\.innerHTML\b",
        r"\.outerHTML\b",
        r"insertAdjacentHTML",
        r"document\.write",
        r"\beval\s*\(",
        r"new\s+Function\b",
        r"createContextualFragment",
        r"DOMParser",
        r"setAttribute\(\s*[\"']on",
        r"\.on[a-z]+\s*=",
        r"\.(?:href|src|action|srcdoc)\s*=",
        r"setTimeout\(\s*[\"'`]",
        r"location\s*=|location\.(?:href|assign|replace)\s*[=(]",
    ],
)
def test_the_script_uses_no_html_or_code_sink(sink: str) -> None:
    assert re.search(sink, _ui("app.js")) is None


def test_the_page_loads_nothing_from_elsewhere_and_runs_no_inline_script() -> None:
    html = _ui("index.html")
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="ui/app.js">']
    assert re.search(r"\son[a-z]+\s*=", html) is None  # no inline handlers
    assert re.search(r"(?:src|href)=\"(?:https?:)?//", html) is None
    assert "url(" not in _ui("style.css")
    assert "@import" not in _ui("style.css")
