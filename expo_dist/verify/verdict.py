"""What `expo-dist verify` found: the Report that the structure checks (check.py) and the recomputation
(recompute.py) fill in, and its one verdict line."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Report:
    out: str
    problems: list[str] = field(default_factory=list)
    files: int = 0
    tensors: int = 0
    total_size: int = 0
    hashed: int = 0  # weight files whose checksums (and size) matched the manifest
    kinds: set[str] = field(default_factory=set)  # which checksums: "sha256" (local outputs), "CRC-32" (s3://)
    s3_checked: int = 0  # objects whose checksum stored by S3 matched
    recomputed: int = 0  # tensors whose extrapolated elements were recomputed
    copies: int = 0  # tensors with copied elements checked
    elements: int = 0
    nonfinite_in: int = 0  # NaN/Inf elements in the inputs of the checked ranges
    nonfinite_out: int = 0  # NaN/Inf elements in the output of the checked ranges
    with_inputs: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if not self.ok:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return printable(f"verify: FAILED {self.out}: {self.problems[0]}{more}")
        sums = " and ".join(k for k in ("sha256", "CRC-32") if k in self.kinds) or "checksums"
        msg = (f"verify: OK {self.out}: {self.files} file(s), {self.tensors} tensors, {self.total_size} bytes, "
               f"{sums} of {self.hashed} file(s) match the manifest")
        if self.s3_checked:
            msg += f" (and S3's stored checksum of {self.s3_checked})"
        if self.with_inputs:
            msg += (f"; {self.recomputed} extrapolated tensor(s) recomputed and {self.copies} copied tensor(s) "
                    f"compared, {self.elements} elements, all exact")
            if self.nonfinite_in or self.nonfinite_out:
                msg += f"; NaN/Inf: {self.nonfinite_in} in the inputs, {self.nonfinite_out} in the output"
        else:
            msg += "; values not recomputed (give --sft and --aligned)"
        return printable(msg)


def printable(text: str) -> str:
    """One printable line: names and values from a damaged file (newlines, control characters, lone surrogates
    that no terminal encoding can write) appear escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
