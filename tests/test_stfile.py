"""formats.safetensors: laying out new safetensors files, and reading/validating headers of existing ones."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save, save_file

from expo_dist.errors import ExpoError
from expo_dist.formats.dtypes import DTYPES, itemsize
from expo_dist.formats.safetensors import alignment_order, layout, read_header

ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
      torch.int8: "I8", torch.float64: "F64", torch.bool: "BOOL", torch.int32: "I32", torch.uint8: "U8"}


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.10.mlp.up_proj.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "model.layers.2.mlp.up_proj.weight": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(7, generator=g),
        "lm_head.weight": torch.randn(3, 2, generator=g).to(torch.float16),
        "pos": torch.arange(5, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "q": torch.arange(-3, 4, dtype=torch.int8),
        "d": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
        "scalar": torch.tensor(1.5, dtype=torch.float32),
    }


def build(tensors: dict[str, torch.Tensor], metadata=None) -> tuple[bytes, object]:
    items = alignment_order([(n, ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    lay = layout(items, metadata)
    buf = bytearray(lay.size)
    buf[: len(lay.header)] = lay.header
    for name, entry in lay.tensors.items():
        raw = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert len(raw) == entry.nbytes
        buf[entry.begin:entry.end] = raw
    return bytes(buf), lay


def test_layout_matches_safetensors_save_file_byte_for_byte(tmp_path):
    tensors = sample_tensors()
    ours, lay = build(tensors)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    theirs = (tmp_path / "ref.safetensors").read_bytes()
    assert ours == theirs
    assert lay.size == len(theirs)


def test_layout_parses_with_safetensors_and_round_trips(tmp_path):
    tensors = sample_tensors()
    ours, lay = build(tensors)
    back = load(ours)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)
    p = tmp_path / "ours.safetensors"
    p.write_bytes(ours)
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
    # our own reader agrees about every tensor's place
    h = read_header(str(p))
    assert h.metadata == {"format": "pt"} and h.size == len(ours)
    assert h.data_start == len(lay.header)
    for name, entry in lay.tensors.items():
        assert h.tensors[name] == entry


def test_layout_header_padded_to_8_and_offsets_contiguous():
    for extra in range(9):  # names of every length mod 8 so the padding is exercised
        tensors = {"w" * (extra + 1): torch.zeros(3, dtype=torch.bfloat16), "b": torch.zeros(1)}
        _, lay = build(tensors)
        (n,) = struct.unpack("<Q", lay.header[:8])
        assert n == len(lay.header) - 8 and n % 8 == 0
        text = lay.header[8:].decode()
        assert text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" ")))
        doc = json.loads(text)
        assert doc["__metadata__"] == {"format": "pt"}
        # alignment order: the 4-byte float first, then the 2-byte one
        rel = sorted((v["data_offsets"], k) for k, v in doc.items() if k != "__metadata__")
        assert [k for _, k in rel] == ["b", "w" * (extra + 1)]
        assert rel[0][0] == [0, 4] and rel[1][0] == [4, 10]
        assert lay.size == len(lay.header) + 10
        assert lay.tensors["b"].begin == len(lay.header) and lay.tensors["w" * (extra + 1)].end == lay.size


TORCH_OF = {"F64": torch.float64, "I64": torch.int64, "U64": torch.uint64, "F32": torch.float32,
            "I32": torch.int32, "U32": torch.uint32, "BF16": torch.bfloat16, "F16": torch.float16,
            "I16": torch.int16, "U16": torch.uint16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def test_alignment_order_is_the_order_safetensors_writes():
    # every dtype we know, two names each, in a scrambled order; safetensors decides the reference order
    assert set(TORCH_OF) == set(DTYPES)
    names = {f"{k}_{dt}": dt for dt in TORCH_OF for k in ("b", "a")}
    tensors = {n: torch.zeros(2, dtype=TORCH_OF[dt]) for n, dt in sorted(names.items(), reverse=True)}
    raw = save(tensors)
    doc = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    doc.pop("__metadata__", None)
    theirs = [k for k, _ in sorted(doc.items(), key=lambda kv: kv[1]["data_offsets"])]
    ours = [n for n, _, _ in alignment_order([(n, dt, (2,)) for n, dt in names.items()])]
    assert ours == theirs
    sizes = [itemsize(names[n]) for n in ours]
    assert sizes == sorted(sizes, reverse=True)  # larger items first: every tensor stays aligned


def test_layout_custom_metadata():
    lay = layout([("x", "F32", (2,))], {"format": "pt", "note": "hi"})
    doc = json.loads(lay.header[8:])
    assert doc["__metadata__"] == {"format": "pt", "note": "hi"}


# ---- read_header errors ----

def write_st(path, header: dict | bytes | str, data: bytes = b"", length: int | None = None):
    if isinstance(header, dict):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    raw += b" " * (-len(raw) % 8)
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return str(path)


def expect_error(path: str, *words: str) -> str:
    with pytest.raises(ExpoError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert path in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


def good_header():
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]}}


def test_read_header_accepts_valid(tmp_path):
    p = write_st(tmp_path / "ok.safetensors", good_header(), b"\0" * 14)
    h = read_header(p)
    assert set(h.tensors) == {"a", "b"}
    assert h.tensors["b"].end == h.size and h.tensors["a"].begin == h.data_start
    assert h.tensors["b"].shape == (3,) and h.tensors["b"].numel == 3 and h.tensors["b"].nbytes == 6


def test_missing_file(tmp_path):
    expect_error(str(tmp_path / "nope.safetensors"), "not found")


def test_shorter_than_8_bytes(tmp_path):
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    expect_error(str(p), "shorter than 8 bytes")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    expect_error(str(p), "shorter than 8 bytes")


def test_header_length_beyond_file(tmp_path):
    p = write_st(tmp_path / "long.safetensors", good_header(), b"\0" * 14, length=10_000)
    expect_error(p, "header length 10000", "beyond")


def test_header_length_absurd(tmp_path):
    p = write_st(tmp_path / "huge.safetensors", good_header(), b"\0" * 14, length=1 << 62)
    expect_error(p, "header length", "beyond")


def test_header_not_json(tmp_path):
    p = write_st(tmp_path / "nojson.safetensors", b"{not json at all", b"")
    expect_error(p, "not valid JSON")


def test_header_not_utf8(tmp_path):
    p = write_st(tmp_path / "bin.safetensors", b"\xff\xfe\x00\x01\x02\x03\x04\x05", b"")
    expect_error(p, "not valid JSON")


def test_header_not_object(tmp_path):
    p = write_st(tmp_path / "list.safetensors", "[1, 2, 3]", b"")
    expect_error(p, "not a JSON object")


def test_unknown_dtype(tmp_path):
    h = good_header()
    h["a"]["dtype"] = "F31"
    expect_error(write_st(tmp_path / "dt.safetensors", h, b"\0" * 14), "'a'", "unknown dtype", "F31")


def test_missing_fields(tmp_path):
    h = good_header()
    del h["b"]["data_offsets"]
    expect_error(write_st(tmp_path / "nofield.safetensors", h, b"\0" * 14), "'b'", "data_offsets")


def test_bad_metadata(tmp_path):
    h = good_header()
    h["__metadata__"] = {"format": 1}
    expect_error(write_st(tmp_path / "meta.safetensors", h, b"\0" * 14), "__metadata__")


def test_shape_times_dtype_differs_from_span(tmp_path):
    h = good_header()
    h["b"]["shape"] = [4]  # 8 bytes of BF16, but the span is 6
    msg = expect_error(write_st(tmp_path / "span.safetensors", h, b"\0" * 14), "'b'", "needs 8 bytes", "span 6")
    assert "BF16" in msg


def test_invalid_shape(tmp_path):
    h = good_header()
    h["a"]["shape"] = [-2]
    expect_error(write_st(tmp_path / "neg.safetensors", h, b"\0" * 14), "'a'", "invalid shape")


def test_overlapping_offsets(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "BF16", "shape": [3], "data_offsets": [6, 12]}}
    expect_error(write_st(tmp_path / "overlap.safetensors", h, b"\0" * 12), "'b'", "overlaps")


def test_hole_between_tensors(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "BF16", "shape": [3], "data_offsets": [10, 16]}}
    expect_error(write_st(tmp_path / "hole.safetensors", h, b"\0" * 16), "hole of 2 bytes", "'b'")


def test_hole_at_start(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    expect_error(write_st(tmp_path / "hole0.safetensors", h, b"\0" * 12), "hole of 4 bytes", "'a'")


def test_trailing_bytes(tmp_path):
    p = write_st(tmp_path / "trail.safetensors", good_header(), b"\0" * 15)
    expect_error(p, "trailing bytes")


def test_truncated_data(tmp_path):
    p = write_st(tmp_path / "trunc.safetensors", good_header(), b"\0" * 13)
    expect_error(p, "truncated")


def test_negative_offsets(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [-4, -4]}}
    expect_error(write_st(tmp_path / "negoff.safetensors", h, b""), "'a'", "invalid data_offsets")


def test_reversed_offsets(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}
    expect_error(write_st(tmp_path / "rev.safetensors", h, b"\0" * 8), "'a'", "invalid data_offsets")


def test_errors_agree_with_safetensors_itself(tmp_path):
    """Every file read_header refuses, safetensors refuses too (and the valid one both accept)."""
    ok = write_st(tmp_path / "ok.safetensors", good_header(), b"\0" * 14)
    read_header(ok)
    with safe_open(ok, "pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
    bad = []
    h = good_header()
    h["b"]["shape"] = [4]
    bad.append(write_st(tmp_path / "b1.safetensors", h, b"\0" * 14))
    bad.append(write_st(tmp_path / "b2.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                     "b": {"dtype": "BF16", "shape": [3],
                                                           "data_offsets": [10, 16]}}, b"\0" * 16))
    bad.append(write_st(tmp_path / "b3.safetensors", good_header(), b"\0" * 13))
    bad.append(write_st(tmp_path / "b4.safetensors", good_header(), b"\0" * 14, length=10_000))
    for p in bad:
        with pytest.raises(ExpoError):
            read_header(p)
        with pytest.raises(SafetensorError):
            with safe_open(p, "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


@pytest.mark.parametrize("shape", [[True, 2], [2, False], [2.0], [1e400], ["2"], [None], [[2]], 2, "2", None])
def test_shape_entries_must_be_integers_not_booleans(tmp_path, shape):
    """bool is an int in Python, but not in safetensors: [true, 2] once passed and made a file safetensors refuses."""
    h = good_header()
    h["a"]["shape"] = shape
    p = write_st(tmp_path / "s.safetensors", h, b"\0" * 14)
    msg = expect_error(p, "'a'", "invalid shape")
    assert "\n" not in msg
    if shape == [True, 2]:
        with pytest.raises(SafetensorError):
            with safe_open(p, "pt") as f:
                f.get_tensor("a")


@pytest.mark.parametrize("offsets", [[False, 8], [0, True], [0.0, 8.0], "0,8", [0], [0, 8, 8], None, {"0": 0},
                                     [2 ** 64, 2 ** 64 + 8]])
def test_data_offsets_must_be_two_integers(tmp_path, offsets):
    h = good_header()
    h["a"]["data_offsets"] = offsets
    expect_error(write_st(tmp_path / "o.safetensors", h, b"\0" * 14), "'a'", "invalid data_offsets")


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, None, 4, True])
def test_dtype_that_is_not_a_string(tmp_path, dtype):
    h = good_header()
    h["a"]["dtype"] = dtype
    expect_error(write_st(tmp_path / "d.safetensors", h, b"\0" * 14), "'a'", "unknown dtype")


def test_deep_or_huge_header_json(tmp_path):
    raw = '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"
    expect_error(write_st(tmp_path / "deep.safetensors", raw, b""), "not valid JSON", "nested")
    raw = json.dumps(good_header()).replace('"shape": [2]', '"shape": [' + "2" * 5000 + "]")
    expect_error(write_st(tmp_path / "long.safetensors", raw, b"\0" * 14), "not valid JSON", "too long")


def test_metadata_null_is_allowed_other_types_not(tmp_path):
    h = good_header()
    h["__metadata__"] = None
    assert set(read_header(write_st(tmp_path / "n.safetensors", h, b"\0" * 14)).tensors) == {"a", "b"}
    for bad in (["pt"], "pt", 3, {"format": {"x": "y"}}):
        h["__metadata__"] = bad
        expect_error(write_st(tmp_path / "m.safetensors", h, b"\0" * 14), "__metadata__")
