"""Per-tensor alpha rules: an ordered list of name patterns, the first match decides (pure code).

    alpha_rules:
      - {match: "model.embed_tokens.weight", alpha: 0}          # glob (fnmatch) pattern: fixed alpha
      - {regex: 'model\\.layers\\.(0|1)\\..*', alpha: 0}        # regular expression (whole name)
      - {match: "*mlp*", scale: 0.5}                             # a multiple of the run's alpha

A tensor no rule matches takes the run's alpha. With a sweep (several alphas), `alpha` rules are the
same in every output and `scale` rules scale each output's alpha.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable

from .errors import ExpoError


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
        value = item[vkey]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ExpoError(f"{where}: {vkey} must be a number, got {kind_of(value)}")
        try:
            value = float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            raise ExpoError(f"{where}: {vkey} must be a number, got {item[vkey][:40]!r}") from None
        except OverflowError:
            value = math.inf
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
