"""Per-tensor alpha rules: an ordered list of name patterns, the first match decides (pure code).

    alpha_rules:
      - {match: "model.embed_tokens.weight", alpha: 0}          # glob (fnmatch) pattern: fixed alpha
      - {regex: 'model\\.layers\\.(0|1)\\..*', alpha: 0}        # regular expression (whole name)
      - {match: "*mlp*", scale: 0.5}                             # a multiple of the run's alpha

A tensor no rule matches takes the run's alpha. With a sweep (several alphas), `alpha` rules are the
same in every output and `scale` rules scale each output's alpha.

Also here, below the planner's users (spec, verify): check_number / parse_alpha read one alpha, and show_value /
kind_of put any config value into an error line.
"""

from __future__ import annotations

import fnmatch
import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ExpoError


@dataclass(frozen=True)
class Rule:
    kind: str  # "match" (glob) or "regex"
    pattern: str
    alpha: float | None
    scale: float | None

    def matches(self, name: str) -> bool:
        if self.kind == "match":
            return fnmatch.fnmatchcase(name, self.pattern)
        return re.fullmatch(self.pattern, name) is not None

    def apply(self, alpha: float) -> float:
        return self.alpha if self.alpha is not None else alpha * self.scale

    def describe(self) -> dict:
        out = {self.kind: self.pattern}
        out.update({"alpha": self.alpha} if self.alpha is not None else {"scale": self.scale})
        return out


def parse_rules(raw, label: str = "alpha_rules") -> list[Rule]:
    """Check and read the rules; anything else than the documented form is one ExpoError line naming the rule."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ExpoError(f"{label} must be a list of {{match|regex: PATTERN, alpha|scale: NUMBER}}, got "
                        f"{kind_of(raw)}")
    rules = []
    for i, item in enumerate(raw):
        where = f"{label}[{i}]"
        if not isinstance(item, dict):
            raise ExpoError(f"{where}: must be a mapping like {{match: 'model.embed_tokens.*', alpha: 0}}, "
                            f"got {kind_of(item)}")
        if not all(isinstance(k, str) for k in item):
            raise ExpoError(f"{where}: keys must be match/regex and alpha/scale, got a key that is "
                            f"{kind_of(next(k for k in item if not isinstance(k, str)))}")
        keys = set(item)
        kinds = keys & {"match", "regex"}
        values = keys & {"alpha", "scale"}
        if len(kinds) != 1 or len(values) != 1 or keys - {"match", "regex", "alpha", "scale"}:
            shown = sorted(keys)[:6]
            raise ExpoError(f"{where}: give exactly one of match/regex and one of alpha/scale "
                            f"(got {[k[:40] for k in shown]})")
        kind, vkey = kinds.pop(), values.pop()
        pattern = item[kind]
        if not isinstance(pattern, str) or not pattern:
            raise ExpoError(f"{where}: {kind} must be a non-empty string, got {kind_of(pattern)}")
        if kind == "regex":
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as e:
                raise ExpoError(f"{where}: bad regex {pattern[:60]!r} ({str(e)[:80]})") from None
        try:
            value = as_number(item[vkey])
        except TypeError:
            raise ExpoError(f"{where}: {vkey} must be a number, got {kind_of(item[vkey])}") from None
        except ValueError:
            raise ExpoError(f"{where}: {vkey} must be a number, got {item[vkey][:40]!r}") from None
        if not math.isfinite(value):
            raise ExpoError(f"{where}: {vkey} must be a finite number")
        rules.append(Rule(kind, pattern, value if vkey == "alpha" else None, value if vkey == "scale" else None))
    return rules


def kind_of(value) -> str:
    """What a config value is, in words, for error lines."""
    if isinstance(value, bool):
        return "a boolean"
    for t, name in ((int, "an integer"), (float, "a number"), (str, "a string"), ((list, tuple), "a list"),
                    (dict, "a mapping")):
        if isinstance(value, t):
            return name
    return "null" if value is None else f"a {type(value).__name__}"


def alphas_for(alphas: tuple[float, ...], rules: list[Rule]) -> Callable[[str], tuple[float, ...]]:
    """name -> the alpha of each output, by the first matching rule."""

    def f(name: str) -> tuple[float, ...]:
        for rule in rules:
            if rule.matches(name):
                return tuple(rule.apply(a) for a in alphas)
        return alphas

    return f


def unused(rules: list[Rule], names) -> list[Rule]:
    """Rules that match no tensor: almost always a typo, so the plan warns."""
    names = list(names)
    return [r for r in rules if not any(r.matches(n) for n in names)]


# ---- one alpha, and config values in error lines (spec checks every field with these too) ----------------

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 4, 50, 50


def show_value(value) -> str:
    """A short one-line repr that never fails or blows up (huge integers, deep nesting, YAML aliases that share
    one list thousands of times, long strings), with what kind of value it is."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):
        text = "..."
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind_of(value)})"


def as_number(value) -> float:
    """An int or float (never a boolean), or a string that reads as one (the CLI gives strings), as a float; inf
    where it is too large for one. TypeError for anything else, ValueError for a string that is no number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(type(value).__name__)
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except OverflowError:
        return math.inf


def check_number(label: str, value) -> float:
    """A finite number: an int or float (never a boolean), or a string that reads as one (the CLI gives strings)."""
    try:
        a = as_number(value)
    except (TypeError, ValueError):
        raise ExpoError(f"{label} must be a number, got {show_value(value)}") from None
    if not math.isfinite(a):
        raise ExpoError(f"{label} must be a finite number, got {show_value(value)}")
    return a


def parse_alpha(value, label: str = "--alpha") -> float:
    """A finite alpha, or one line saying what is wrong."""
    return check_number(label, value)
