"""Configuration errors and warnings, each with the field path it is about."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from gateway.config.models import Config, Policy, Upstream

__all__ = ["ConfigError", "Problem", "format_loc", "pydantic_problems"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One error or warning, with the field path it is about."""

    path: str
    message: str
    risky: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The config is invalid; ``problems`` lists every error with its field path."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names allowed at ``loc`` (for 'did you mean' hints)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            # dict-of-models (upstreams.NAME, policies.NAME): step into the value model
            if model is Upstream or model is Policy:
                continue
            return []
        ann = fields[part].annotation
        model = _model_in(ann)
        if model is None:
            return []
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _model_in(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def pydantic_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = format_loc(loc)
        if err["type"] == "extra_forbidden":
            hint = ""
            if loc and isinstance(loc[-1], str):
                close = difflib.get_close_matches(loc[-1], _known_fields(loc), n=1)
                if close:
                    hint = f" (did you mean '{close[0]}'?)"
            problems.append(Problem(path, f"unknown key{hint}"))
            continue
        msg = err["msg"]
        msg = msg.removeprefix("Value error, ")
        if (
            err["type"] != "missing"
            and "got " not in msg
            and "input" in err
            and not isinstance(err["input"], dict | list)
        ):
            msg = f"{msg} (got {err['input']!r})"
        problems.append(Problem(path, msg))
    return problems
