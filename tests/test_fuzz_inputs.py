"""Crafted and mutated inputs never end in a traceback: every parser of a model folder (safetensors headers, both
index kinds, config.json, the zip and pickle of a .bin) either reads the file or refuses it with one ExpoError line.

A seeded mutation loop (no hypothesis needed) starts from small valid models made by expo_dist.synth and mutates
one file at a time: truncation, bit flips, JSON type swaps, deleted and renamed keys, deep nesting, huge numbers,
damaged zip records and pickle bytes. index_model() on the mutated folder must succeed or raise ExpoError with one
line; where it succeeds, so must the planner with the clean other model (or refuse with one line). Anything else
fails the test, with the seed and case to reproduce it. Run with -s to see the counts.
"""

from __future__ import annotations

import collections
import io
import json
import pathlib
import random
import shutil
import struct
import traceback
import zipfile
from collections import OrderedDict

import pytest
import torch

from expo_dist.errors import ExpoError
from expo_dist.planning.plan import make_plan, tensor_sources
from expo_dist.sources.index import index_model

SEED = 10_2024


@pytest.fixture(scope="module")
def models(pair_factory):
    """The micro pair (one layer, vocab 16, a non-float buffer), whole and sharded, aligned also as .bin; own
    copies: the fuzz rewrites files in place (and puts them back)."""
    single = pair_factory("micro", seed=3)
    sharded = pair_factory("micro", seed=4, sft_shard_bytes=1500, aligned_shard_bytes=1200)
    s1, a1 = pair_factory("micro", seed=3, private=True)
    s2, a2 = pair_factory("micro", seed=4, sft_shard_bytes=1500, aligned_shard_bytes=1200, private=True)
    return {"st-single": (s1, a1), "st-sharded": (s2, a2),
            "bin-single": (s1, pair_factory.bin(single[1], None, private=True)),
            "bin-sharded": (s2, pair_factory.bin(sharded[1], 4, private=True))}


# ---- running one case ----------------------------------------------------------------------------------------


class Tally:
    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.by_target: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: list[str] = []

    def run(self, target: str, case: str, folder: pathlib.Path, sft: pathlib.Path) -> str:
        outcome = self._run(folder, sft, f"{target} {case}")
        self.counts[outcome] += 1
        self.by_target[target][outcome] += 1
        return outcome

    def _run(self, folder, sft, label) -> str:
        try:
            idx = index_model(str(folder))
        except ExpoError as e:
            return self._one_line(e, label, "refused", str(folder))
        except Exception:  # noqa: BLE001 - the point of the test
            self.failures.append(f"{label}: index_model: {traceback.format_exc(limit=-3)}")
            return "crashed"
        try:
            s = index_model(str(sft))
            make_plan(tensor_sources(s), tensor_sources(idx), alpha_for=lambda name: 0.3, sft_config=s.config,
                      aligned_config=idx.config, max_task_bytes=1 << 20, max_shard_size=4000)
        except ExpoError as e:
            return self._one_line(e, label, "plan-refused", None)
        except Exception:  # noqa: BLE001
            self.failures.append(f"{label}: make_plan: {traceback.format_exc(limit=-3)}")
            return "crashed"
        return "ok"

    def _one_line(self, e: ExpoError, label: str, outcome: str, names: str | None) -> str:
        msg = str(e)
        if not msg or "\n" in msg or "\r" in msg or (names is not None and names not in msg):
            self.failures.append(f"{label}: not one line naming {names}: {msg!r}")
            return "bad-message"
        return outcome


def mutate_file(path: pathlib.Path, data: bytes, tally: Tally, target, case, folder, sft) -> None:
    original = path.read_bytes()
    try:
        path.write_bytes(data)
        tally.run(target, case, folder, sft)
    finally:
        path.write_bytes(original)


# ---- mutations -----------------------------------------------------------------------------------------------

DEEP, HUGE = "\x00deep\x00", "\x00huge\x00"
SWAPS = ["x", "", 7, 0, -1, 1.5, 2 ** 64, 10 ** 30, True, False, None, [], [1, 2], [True, 2], [-3], [2.0],
         {}, {"a": 1}, {"dtype": "F32"}, "F32", "BF16", "I64", ["F32"], {"F32": 1}, "../x", "a/b", "\u00e9\n",
         DEEP, HUGE]


def swap_value(rng: random.Random):
    v = rng.choice(SWAPS)
    return json.loads(json.dumps(v)) if not isinstance(v, str) else v


def nodes(doc) -> list[tuple[object, object]]:
    """Every (container, key) in a JSON document."""
    out, stack = [], [doc]
    while stack:
        x = stack.pop()
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            out.append((x, k))
            stack.append(v)
    return out


def render(doc, rng: random.Random) -> bytes:
    text = json.dumps(doc)
    depth = rng.choice([65, 200, 990, 5000, 100_000])
    text = text.replace(json.dumps(DEEP), "[" * depth + "1" + "]" * depth)
    text = text.replace(json.dumps(HUGE), rng.choice(["9" * 19, "18446744073709551616", "9" * 4301, "-" + "9" * 5000,
                                                       "1e400", "-0"]))
    return text.encode()


def mutate_json(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of a JSON document: structural (type swap, delete, rename, deep, huge) or of its bytes."""
    op = rng.choice(["swap", "swap", "swap", "delete", "rename", "wrap", "root", "bytes"])
    if op == "bytes":
        return mutate_bytes(raw, rng)
    doc = json.loads(raw)
    if op == "root":
        return "root-swap", render(swap_value(rng), rng)
    places = nodes(doc)
    if not places:
        return "root-swap", render(swap_value(rng), rng)
    parent, key = rng.choice(places)
    if op == "swap":
        parent[key] = swap_value(rng)
    elif op == "delete":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        new = rng.choice(["", "__metadata__", "x\ty", str(key) + "_", "weight_map", "dtype", "layers." + "9" * 5000,
                          "x1\u00b2", "model.layers.0.x"])
        parent[new] = parent.pop(key)
    else:
        parent[key] = [parent[key]] if rng.random() < 0.5 else {"k": parent[key]}
    return f"json-{op}", render(doc, rng)


def mutate_bytes(raw: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> tuple[str, bytes]:
    hi = len(raw) if hi is None else min(hi, len(raw))
    b = bytearray(raw)
    op = rng.choice(["flip", "flip", "truncate", "splice", "zero"])
    if op == "truncate" or hi <= lo:
        return "truncate", bytes(b[: rng.randrange(0, max(1, len(b)))])
    if op == "flip":
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(lo, hi)
            b[i] ^= 1 << rng.randrange(8)
    elif op == "splice":
        i = rng.randrange(lo, hi)
        b[i:i] = rng.choice([b"\xff\xfe", b"[" * 2000, b'"', b"\x00" * 9, b"}", b"9" * 5000])
    else:
        i = rng.randrange(lo, hi)
        b[i: i + rng.randrange(1, 16)] = b"\x00" * 4
    return f"bytes-{op}", bytes(b)


def st_file_variant(original: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A mutated safetensors file: its header JSON mutated (length field kept or fixed), or its bytes."""
    (n,) = struct.unpack("<Q", original[:8])
    header, data = original[8: 8 + n], original[8 + n:]
    if rng.random() < 0.25:
        case, out = mutate_bytes(original, rng, 0, 8 + n)
        return "file-" + case, out
    case, new = mutate_json(header, rng)
    length = n if rng.random() < 0.15 else len(new)
    return "header-" + case, struct.pack("<Q", length) + new + data


def rezip(original: bytes, member_fn=None, compression: int = zipfile.ZIP_STORED) -> bytes:
    """A torch.save zip rewritten, data.pkl through member_fn and stored with `compression`."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as zin, zipfile.ZipFile(out, "w") as zout:
        for zi in zin.infolist():
            data = zin.read(zi)
            if zi.filename.endswith("data.pkl"):
                zi = zipfile.ZipInfo(zi.filename, zi.date_time)
                zi.compress_type = compression
                data = member_fn(data) if member_fn else data
            zout.writestr(zi, data)
    return out.getvalue()


def bin_variant(original: bytes, rng: random.Random) -> tuple[str, bytes]:
    op = rng.choice(["pickle", "pickle", "pickle", "cdir", "head", "anywhere", "compressed", "truncate"])
    if op == "pickle":  # a valid zip around mutated pickle bytes: the unpickler's turn
        case = []

        def fn(pkl):
            c, out = mutate_bytes(pkl, rng)
            case.append(c)
            return out
        data = rezip(original, fn)
        return "pickle-" + case[0], data
    if op == "cdir":  # the central directory and end records
        c, out = mutate_bytes(original, rng, max(0, len(original) - 600))
        return "cdir-" + c, out
    if op == "head":  # the first local header and data.pkl
        c, out = mutate_bytes(original, rng, 0, 200)
        return "head-" + c, out
    if op == "compressed":  # data.pkl compressed (any method), then damaged
        method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        data = bytearray(rezip(original, None, method))
        if rng.random() < 0.8:
            i = rng.randrange(40, min(len(data), 300))
            data[i] ^= 1 << rng.randrange(8)
        return f"compressed-{method}", bytes(data)
    if op == "truncate":
        return "truncate", original[: rng.randrange(len(original))]
    c, out = mutate_bytes(original, rng)
    return "anywhere-" + c, out


# ---- the seeded loop -------------------------------------------------------------------------------------------

ROUNDS = 220  # per target; about 2000 cases in all


def test_fuzz_every_parser(models, capsys):
    rng = random.Random(SEED)
    tally = Tally()
    targets = []
    for kind, (sft, aligned) in models.items():
        targets.append((f"{kind}:config.json", aligned / "config.json", mutate_json, aligned, sft))
        if kind.startswith("st"):
            shard = sorted(aligned.glob("*.safetensors"))[-1]
            targets.append((f"{kind}:{shard.name}", shard, st_file_variant, aligned, sft))
        else:
            shard = sorted(aligned.glob("*.bin"))[0]
            targets.append((f"{kind}:{shard.name}", shard, bin_variant, aligned, sft))
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (aligned / index).exists():
                targets.append((f"{kind}:{index}", aligned / index, mutate_json, aligned, sft))
    for target, path, mutate, folder, sft in targets:
        original = path.read_bytes()
        for i in range(ROUNDS):
            case, data = mutate(original, rng)
            mutate_file(path, data, tally, target, f"#{i} {case}", folder, sft)
        assert path.read_bytes() == original
    with capsys.disabled():
        total = sum(tally.counts.values())
        print(f"\nfuzz: {total} cases, seed {SEED}: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.counts.items())))
        for target, c in tally.by_target.items():
            print(f"  {target}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    assert not tally.failures, f"{len(tally.failures)} failures; first:\n" + "\n".join(tally.failures[:5])
    assert total >= len(targets) * ROUNDS >= 2000
    assert tally.counts["refused"] > 500 and tally.counts["ok"] > 100 and tally.counts["plan-refused"] > 5
    for target, c in tally.by_target.items():
        assert c["refused"] > 0, target  # every parser was reached and said no at least once


# ---- the crafted inputs of issue 10, by name ---------------------------------------------------------------------


def deep(n: int) -> str:
    return "[" * n + "1" + "]" * n


def st_header(edit):
    """A case that rewrites model.safetensors' header: edit(doc) returns the new doc, or its raw text or bytes."""
    def apply(folder: pathlib.Path) -> pathlib.Path:
        p = folder / "model.safetensors"
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        new = edit(json.loads(raw[8:8 + n]))
        new = new if isinstance(new, bytes) else new.encode() if isinstance(new, str) else json.dumps(new).encode()
        data = raw[8 + n:] if not new.strip(b" ").endswith(b"{}") else b""
        p.write_bytes(struct.pack("<Q", len(new)) + new + data)
        return p
    return apply


def first(doc: dict, field: str, value):
    """doc with the first tensor's field set to value (value(old) when callable)."""
    name = next(k for k in doc if k != "__metadata__")
    doc[name][field] = value(doc[name][field]) if callable(value) else value
    return doc


def json_file(name: str, edit):
    """A case that rewrites a JSON file of the folder: edit(doc) returns the new doc, or its raw text or bytes."""
    def apply(folder: pathlib.Path) -> pathlib.Path:
        p = folder / name
        new = edit(json.loads(p.read_bytes()))
        p.write_bytes(new if isinstance(new, bytes) else new.encode() if isinstance(new, str) else
                      json.dumps(new).encode())
        return p
    return apply


def set_metadata(value):
    def edit(doc):
        doc["__metadata__"] = value
        return doc
    return edit


def with_first_value(value):
    def edit(doc):
        wm = doc["weight_map"]
        wm[next(iter(wm))] = value
        return doc
    return edit


def bin_member(change):
    """A case that rewrites pytorch_model.bin: change(zip bytes, folder) returns the new bytes."""
    def apply(folder: pathlib.Path) -> pathlib.Path:
        p = folder / "pytorch_model.bin"
        p.write_bytes(change(p.read_bytes()))
        return p
    return apply


def central_entries(data: bytes) -> dict[str, int]:
    """member name -> offset of its central directory record."""
    out, i = {}, data.find(b"PK\x01\x02")
    while i >= 0:
        n = struct.unpack("<H", data[i + 28:i + 30])[0]
        out[data[i + 46:i + 46 + n].decode("utf-8", "replace")] = i
        i = data.find(b"PK\x01\x02", i + 46 + n)
    return out


def patch_member(suffix: str, *, method: int | None = None, flags: int | None = None, name_bytes: bytes = b""):
    def change(data: bytes) -> bytes:
        b = bytearray(data)
        name, cd = next((k, v) for k, v in central_entries(data).items() if k.endswith(suffix))
        local = struct.unpack("<I", b[cd + 42:cd + 46])[0]
        if method is not None:
            b[cd + 10:cd + 12] = b[local + 8:local + 10] = struct.pack("<H", method)
        if flags is not None:
            b[cd + 8:cd + 10] = b[local + 6:local + 8] = struct.pack("<H", flags)
        if name_bytes:  # same length, so nothing moves
            assert len(name_bytes) <= len(name)
            b[cd + 46:cd + 46 + len(name_bytes)] = b[local + 30:local + 30 + len(name_bytes)] = name_bytes
        return bytes(b)
    return change


def corrupt_compressed(method: int):
    def change(data: bytes) -> bytes:
        b = bytearray(rezip(data, None, method))
        cd = next(v for k, v in central_entries(bytes(b)).items() if k.endswith("data.pkl"))
        local = struct.unpack("<I", b[cd + 42:cd + 46])[0]
        n, m = struct.unpack("<HH", b[local + 26:local + 30])
        start = local + 30 + n + m
        for i in range(start + 4, start + 40):
            b[i] ^= 0x5A
        return bytes(b)
    return change


def flip_stored_pickle(data: bytes) -> bytes:
    """A stored data.pkl with one byte changed: its CRC-32 no longer matches."""
    b = bytearray(data)
    cd = next(v for k, v in central_entries(data).items() if k.endswith("data.pkl"))
    local = struct.unpack("<I", b[cd + 42:cd + 46])[0]
    n, m = struct.unpack("<HH", b[local + 26:local + 30])
    b[local + 30 + n + m + 5] ^= 0x01
    return bytes(b)


def cdir_offset(offset: int):
    """The central directory's offset in the zip64 end record (torch.save writes one) and the end record."""
    def change(data: bytes) -> bytes:
        b = bytearray(data)
        z64, end = data.rfind(b"PK\x06\x06"), data.rfind(b"PK\x05\x06")
        b[z64 + 48:z64 + 56] = struct.pack("<Q", offset)
        b[end + 16:end + 20] = struct.pack("<I", min(offset, 0xFFFFFFFF))
        return bytes(b)
    return change


def pickle_of(payload: bytes):
    return lambda data: rezip(data, lambda _: payload)


def _s(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def tensor_pickle(*tensors: tuple[str, str, int, bytes]) -> bytes:
    """data.pkl of a state dict: (name, storage class, numel, size tuple opcodes) each on storage key '0'."""
    body = b""
    for name, storage, numel, size in tensors:
        body += (_s(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + b"(" + _s("storage") + b"ctorch\n"
                 + storage.encode() + b"\n" + _s("0") + _s("cpu") + b"K" + bytes([numel]) + b"tQ"
                 + b"K\x00" + size + b"K\x01\x85\x89ccollections\nOrderedDict\n)RtR")
    return b"\x80\x02ccollections\nOrderedDict\n)R(" + body + b"u."


def huge_long4() -> bytes:
    """LONG4 of an int with 30,000 digits: the pickle has no int-string limit, repr() of it does."""
    big = (1 << 100_000) - 1
    n = (big.bit_length() + 8) // 8
    return b"\x8b" + n.to_bytes(4, "little") + big.to_bytes(n, "little", signed=True)


def empty_state_dict(data: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save(OrderedDict(), buf)
    return buf.getvalue()


def make_dir(folder: pathlib.Path) -> pathlib.Path:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    return folder / "config.json"


ST, ST_SHARDED, BIN, BIN_SHARDED = "st-single", "st-sharded", "bin-single", "bin-sharded"
ST_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
CRAFTED = {
    # safetensors headers
    "header-nested-100000": (ST, st_header(lambda d: '{"a": ' + deep(100_000) + "}"), ["not valid JSON", "nested"]),
    "header-nested-100": (ST, st_header(lambda d: first(d, "shape", json.loads(deep(100)))), ["nested more than"]),
    "header-int-too-long": (ST, st_header(lambda d: json.dumps(d).replace('"shape": [', '"shape": [' + "9" * 5000
                                                                            + ", ", 1)), ["number is too long"]),
    "header-dtype-list": (ST, st_header(lambda d: first(d, "dtype", ["BF16"])), ["unknown dtype", "['BF16']"]),
    "header-dtype-dict": (ST, st_header(lambda d: first(d, "dtype", {"BF16": 1})), ["unknown dtype"]),
    "header-dtype-null": (ST, st_header(lambda d: first(d, "dtype", None)), ["unknown dtype"]),
    "header-shape-bool": (ST, st_header(lambda d: first(d, "shape", lambda s: [True] + s)), ["invalid shape", "True"]),
    "header-shape-negative": (ST, st_header(lambda d: first(d, "shape", lambda s: [-1, -s[0]] + s[1:])),
                              ["invalid shape"]),
    "header-shape-float": (ST, st_header(lambda d: first(d, "shape", lambda s: [float(x) for x in s])),
                           ["invalid shape"]),
    "header-shape-string": (ST, st_header(lambda d: first(d, "shape", "16x16")), ["invalid shape"]),
    "header-shape-dict": (ST, st_header(lambda d: first(d, "shape", {"0": 16})), ["invalid shape"]),
    "header-shape-overflow": (ST, st_header(lambda d: first(d, "shape", [2 ** 62, 2 ** 62])),
                              ["needs more than 2^63 bytes"]),
    "header-offsets-string": (ST, st_header(lambda d: first(d, "data_offsets", "0,8")), ["invalid data_offsets"]),
    "header-offsets-three": (ST, st_header(lambda d: first(d, "data_offsets", lambda o: o + [9])),
                             ["invalid data_offsets"]),
    "header-offsets-bool": (ST, st_header(lambda d: first(d, "data_offsets", lambda o: [False, o[1]])),
                            ["invalid data_offsets"]),
    "header-offsets-float": (ST, st_header(lambda d: first(d, "data_offsets", lambda o: [float(x) for x in o])),
                             ["invalid data_offsets"]),
    "header-offsets-dict": (ST, st_header(lambda d: first(d, "data_offsets", {"0": 0, "1": 8})),
                            ["invalid data_offsets"]),
    "header-offsets-null": (ST, st_header(lambda d: first(d, "data_offsets", None)), ["invalid data_offsets"]),
    "header-offsets-huge": (ST, st_header(lambda d: first(d, "data_offsets", [2 ** 64, 2 ** 64 + 32])),
                            ["invalid data_offsets"]),
    "header-metadata-list": (ST, st_header(set_metadata(["pt"])), ["__metadata__"]),
    "header-metadata-string": (ST, st_header(set_metadata("pt")), ["__metadata__"]),
    "header-metadata-int-value": (ST, st_header(set_metadata({"format": 1})), ["__metadata__"]),
    "header-metadata-nested": (ST, st_header(set_metadata({"format": {"pt": "x"}})), ["__metadata__"]),
    "header-entry-list": (ST, st_header(lambda d: {**d, "x": [1, 2]}), ["'x'", "lacks"]),
    "header-entry-string": (ST, st_header(lambda d: {**d, "x": "F32"}), ["'x'", "lacks"]),
    "header-name-control": (ST, st_header(lambda d: {"a\nb" if k != "__metadata__" and i == 1 else k: v
                                                     for i, (k, v) in enumerate(d.items())}), ["control"]),
    "header-not-utf8": (ST, st_header(lambda d: b'{"a\xff": 1}'), ["not valid JSON", "UTF-8"]),
    "header-root-list": (ST, st_header(lambda d: []), ["not a JSON object"]),
    "header-zero-tensors": (ST, st_header(lambda d: "{}"), ["no tensors"]),
    # both index kinds
    **{f"{kind}-{name}": (model, json_file(fname, edit), words)
       for kind, model, fname in (("st-index", ST_SHARDED, ST_INDEX), ("bin-index", BIN_SHARDED, BIN_INDEX))
       for name, edit, words in (
           ("nested-100000", lambda d: '{"weight_map": ' + deep(100_000) + "}", ["not a valid", "nested"]),
           ("nested-100", lambda d: {**d, "metadata": json.loads(deep(100))}, ["nested more than"]),
           ("int-too-long", lambda d: '{"metadata": {"total_size": ' + "9" * 5000 + "}, " + json.dumps(d)[1:],
            ["number is too long"]),
           ("not-utf8", lambda d: json.dumps(d).encode().replace(b'"weight_map"', b'"weight_\xe9map"'),
            ["not UTF-8"]),
           ("root-list", lambda d: [d], ["not a JSON object"]),
           ("weight-map-list", lambda d: {"weight_map": list(d["weight_map"].items())}, ["weight_map is a list"]),
           ("weight-map-missing", lambda d: {"metadata": d["metadata"]}, ["no weight_map"]),
           ("value-list", with_first_value(["x.safetensors"]), ["refuses weight file name"]),
           ("value-null", with_first_value(None), ["refuses weight file name"]),
           ("value-int", with_first_value(3), ["refuses weight file name"]),
           ("value-control", with_first_value("model\n.safetensors"), ["refuses weight file name", "\\n"]),
           ("empty-weight-map", lambda d: {**d, "weight_map": {}}, ["no tensors"]))},
    # config.json
    "config-nested-100000": (ST, json_file("config.json", lambda d: '{"x": ' + deep(100_000) + "}"),
                             ["cannot read config", "nested"]),
    "config-nested-100": (ST, json_file("config.json", lambda d: {**d, "rope_scaling": json.loads(deep(100))}),
                          ["cannot read config", "nested more than"]),
    "config-int-too-long": (ST, json_file("config.json", lambda d: '{"hidden_size": ' + "1" * 5000 + "}"),
                            ["cannot read config", "number is too long"]),
    "config-not-utf8": (ST, json_file("config.json", lambda d: b'{"model_type": "ll\xe1ma"}'),
                        ["cannot read config", "not UTF-8"]),
    "config-utf16": (ST, json_file("config.json", lambda d: json.dumps(d).encode("utf-16")),
                     ["cannot read config"]),
    "config-root-list": (ST, json_file("config.json", lambda d: [d]), ["not a JSON object"]),
    "config-a-directory": (ST, make_dir, ["cannot read config", "not a regular file"]),
    # .bin: damaged zip members
    "bin-pkl-deflate-corrupt": (BIN, bin_member(corrupt_compressed(zipfile.ZIP_DEFLATED)), ["data.pkl"]),
    "bin-pkl-bzip2-corrupt": (BIN, bin_member(corrupt_compressed(zipfile.ZIP_BZIP2)), ["data.pkl"]),
    "bin-pkl-lzma-corrupt": (BIN, bin_member(corrupt_compressed(zipfile.ZIP_LZMA)), ["data.pkl"]),
    "bin-pkl-unknown-method": (BIN, bin_member(patch_member("data.pkl", method=99)), ["data.pkl"]),
    "bin-pkl-crc-mismatch": (BIN, bin_member(flip_stored_pickle), ["data.pkl", "corrupt"]),
    "bin-pkl-encrypted": (BIN, bin_member(patch_member("data.pkl", flags=1)), ["encrypted"]),
    "bin-byteorder-encrypted": (BIN, bin_member(patch_member("byteorder", flags=1)), ["byteorder", "encrypted"]),
    "bin-name-not-utf8": (BIN, bin_member(patch_member("data.pkl", flags=0x800, name_bytes=b"\xff\xfe")),
                          ["zip archive"]),
    "bin-truncated-half": (BIN, bin_member(lambda d: d[: len(d) // 2]), ["zip archive"]),
    "bin-truncated-end-record": (BIN, bin_member(lambda d: d[:-7]), ["zip archive"]),
    "bin-cdir-offset-huge": (BIN, bin_member(cdir_offset(2 ** 63 + 5)), ["corrupt"]),
    "bin-cdir-offset-past-end": (BIN, bin_member(cdir_offset(10 ** 6)), ["corrupt"]),
    # .bin: pickles
    "bin-pickle-int-too-long": (BIN, bin_member(pickle_of(b"\x80\x02L" + b"9" * 5000 + b"L\n.")), ["ValueError"]),
    "bin-pickle-deep-lists": (BIN, bin_member(pickle_of(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")),
                              ["not a state dict"]),
    "bin-pickle-size-beyond-int64": (BIN, bin_member(pickle_of(tensor_pickle(
        ("w", "FloatStorage", 4, b"\x8a\x09" + b"\x00" * 8 + b"\x01\x85")))), ["refused", "int64"]),
    "bin-pickle-size-bool": (BIN, bin_member(pickle_of(tensor_pickle(("w", "FloatStorage", 4, b"\x88\x85")))),
                             ["refused", "int64"]),
    "bin-pickle-storage-two-dtypes": (BIN, bin_member(pickle_of(tensor_pickle(
        ("w", "FloatStorage", 4, b"K\x04\x85"), ("v", "ByteStorage", 16, b"K\x04\x85")))), ["described twice"]),
    "bin-pickle-key-control": (BIN, bin_member(pickle_of(tensor_pickle(("w\n", "FloatStorage", 4, b"K\x04\x85")))),
                               ["not a plain string"]),
    "bin-pickle-key-huge-int": (BIN, bin_member(pickle_of(b"\x80\x02}" + huge_long4() + b"K\x01s.")),
                                ["not a plain string"]),
    "bin-zero-tensors": (BIN, bin_member(empty_state_dict), ["no tensors"]),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_input_is_one_line(models, tmp_path, name):
    model, apply, words = CRAFTED[name]
    folder = shutil.copytree(models[model][1], tmp_path / "m")
    named = apply(folder)
    with pytest.raises(ExpoError) as ei:
        index_model(str(folder))
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(named) in msg or str(folder) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_valid_variants_still_read(models, tmp_path):
    """What the format allows stays allowed: a null __metadata__, no __metadata__, extra keys in an index."""
    folder = shutil.copytree(models[ST][1], tmp_path / "m")
    want = {n: (r.dtype, r.shape) for n, r in index_model(str(models[ST][1])).tensors.items()}
    for edit in (set_metadata(None), lambda d: {k: v for k, v in d.items() if k != "__metadata__"}):
        st_header(edit)(folder)
        assert {n: (r.dtype, r.shape) for n, r in index_model(str(folder)).tensors.items()} == want
    sharded = shutil.copytree(models[ST_SHARDED][1], tmp_path / "s")
    json_file(ST_INDEX, lambda d: {**d, "extra": {"x": [1, {"y": None}]}})(sharded)
    assert len(index_model(str(sharded)).tensors) == len(index_model(str(models[ST_SHARDED][1])).tensors)
