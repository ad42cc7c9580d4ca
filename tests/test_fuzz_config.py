"""Seeded mutation fuzzing of what a user (or a damaged disk) hands expo-dist: merge configs (YAML) and the
manifest, index and headers of a merged output that `expo-dist verify` reads.

Every case must end in a success (with values of the schema's types, nothing coerced), a one-line ExpoError
(exit 2) or, for verify, a FAILED verdict (exit 1) — never another exception. No hypothesis here: random.Random
with fixed seeds, so a failure names a case that replays.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import math
import os
import random
import shutil

import pytest
import yaml

from expo_dist.checks import MAX_SIZE
from expo_dist.cli import main
from expo_dist.errors import ExpoError
from expo_dist.spec import DEVICES, FIELDS, IO_MODES, build_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
FULL = """\
description: every field
sft: some/sft
aligned: some/aligned
alpha: [0.1, 0.3]
out: /tmp/expo-fuzz-out
address: auto
workers: 4
max_task_bytes: 64MiB
max_shard_size: 2GB
overwrite: false
max_attempts: 3
cache_dir: /tmp/hf
alpha_rules:
  - {match: "model.embed_tokens.*", alpha: 0}
  - {regex: 'model\\.layers\\.(0|1)\\..*', scale: 0.5}
io: auto
device: cpu
"""

# values a field may be swapped for: every YAML type, edge numbers, strings that look like other types
POOL = [None, True, False, 0, -1, 1, 7, 2.5, 1.0, -0.0, 1e300, math.inf, -math.inf, math.nan, 10**30, 2**63,
        "", " ", "false", "true", "yes", "no", "5GB", "256MiB", "0.5", "1e9", "abc", "auto", "cpu", "cuda",
        "buffered", "\x00x", "x" * 5000, "é\u2028ü", [], [0.1], [True], [0.1, 0.1], [[0.1]], [None], {},
        {"a": 1}, [{"match": "x", "alpha": True}], [{"match": 1, "alpha": 0}], [{"regex": "(", "scale": 1}],
        [{"match": "x", "scale": "0.5"}], [[{"match": "x", "alpha": 0}]]]
# raw YAML text for a value: what yaml.safe_dump cannot write
RAW = ["1" * 5000, "0x" + "f" * 5000, "1" * 4000, "9" * 400 + ".0", "[" * 60 + "]" * 60, "[" * 3000 + "]" * 3000,
       "{a: " * 50 + "1" + "}" * 50, "&a [*a]", "&a {k: *a}", "*undefined", "!!python/object:os.system {}",
       "2024-01-01", "0o777", "0b101", "1_000", ".NaN", "-.inf", "~", "!!binary aGVsbG8=", "[1, 2", "'unclosed",
       "{: }", "? [a]\n  : b", "|\n  multi\n  line"]


def _typed_ok(spec) -> None:
    """A config that was accepted holds values of the schema's types only: nothing coerced."""
    alphas = spec.alpha if isinstance(spec.alpha, list) else [spec.alpha]
    assert alphas and all(type(a) is float and math.isfinite(a) for a in alphas), spec.alpha
    for key in ("sft", "aligned"):
        assert isinstance(getattr(spec, key), str) and getattr(spec, key).strip()
    for key in ("out", "address", "cache_dir"):
        assert getattr(spec, key) is None or (isinstance(getattr(spec, key), str) and getattr(spec, key))
    assert spec.workers is None or (type(spec.workers) is int and spec.workers >= 1)
    assert type(spec.max_attempts) is int and spec.max_attempts >= 1
    assert type(spec.max_task_bytes) is int and (1 << 20) <= spec.max_task_bytes <= MAX_SIZE
    assert type(spec.max_shard_size) is int and 1 <= spec.max_shard_size <= MAX_SIZE
    assert type(spec.overwrite) is bool
    assert spec.io in (None, *IO_MODES) and spec.device in DEVICES  # io None: the environment's (Settings)
    assert spec.alpha_rules is None or isinstance(spec.alpha_rules, list)
    spec.rules()


def _mutate_config(rng: random.Random, text: str) -> tuple[str, bytes]:
    """One mutation of a valid YAML config: (what was done, the file's bytes)."""
    doc = yaml.safe_load(text)
    kind = rng.choice(["swap", "swap", "swap", "raw", "raw", "key", "junk", "truncate", "encoding", "whole",
                       "rule"])
    key = rng.choice(list(FIELDS) + list(doc))
    if kind == "swap":
        doc[key] = rng.choice(POOL)
        return f"swap {key}", yaml.safe_dump(doc, allow_unicode=rng.random() < 0.5).encode()
    if kind == "rule":  # one field of one alpha rule
        rules = [dict(r) for r in (doc.get("alpha_rules") or [{"match": "x", "alpha": 0}])]
        r = rng.choice(rules)
        field = rng.choice(["match", "regex", "alpha", "scale", "other", 1])
        r[field] = rng.choice(POOL)
        doc["alpha_rules"] = rules
        return f"rule {field}", yaml.safe_dump(doc).encode()
    if kind == "raw":
        doc[key] = "@@RAW@@"
        raw = rng.choice(RAW)
        return f"raw {key} {raw[:20]!r}", yaml.safe_dump(doc).replace("'@@RAW@@'", raw).encode()
    if kind == "key":
        new = rng.choice(["alhpa", "max-shard-size", "Alpha", "", "1", "null", "[a]", "{b: 1}", "alpha ", "ö",
                          "max_shard_size", "-", "_"])
        return f"key {new!r}", (text + f"\n{new}: 1\n").encode()
    raw = bytearray(text.encode())
    if kind == "junk":
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(raw) + 1)
            if rng.random() < 0.5 and pos < len(raw):
                raw[pos] = rng.randrange(256)
            else:
                raw[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        return "junk", bytes(raw)
    if kind == "truncate":
        return "truncate", bytes(raw[: rng.randrange(len(raw) + 1)])
    if kind == "encoding":
        how = rng.choice(["utf-16", "latin-1", "bom", "high"])
        if how == "utf-16":
            return "encoding utf-16", text.encode("utf-16")
        if how == "latin-1":
            return "encoding latin-1", (text + "notes: café\n").encode("latin-1")
        if how == "bom":
            return "encoding bom", b"\xef\xbb\xbf" + bytes(raw)
        pos = rng.randrange(len(raw) + 1)
        return "encoding high bytes", bytes(raw[:pos]) + b"\xff\xfe\xc0" + bytes(raw[pos:])
    whole = rng.choice(["", "- a\n- b\n", "42\n", "'text'\n", "---\na: 1\n---\nb: 2\n", "[" * 5000,
                        "a: &x [1]\n" + "".join(f"b{i}: &x{i} [*x, *x, *x]\n" for i in range(1)), "null\n",
                        "alpha: " + "[" * 200 + "0.3" + "]" * 200 + "\n", "\t\tsft: a\n"])
    return "whole", whole.encode()


def test_fuzz_configs(tmp_path):
    bases = [open(p, encoding="utf-8").read() for p in CONFIGS] + [FULL] * 4
    rng = random.Random(20240)
    outcomes = collections.Counter()
    kinds = collections.Counter()
    crashes = []
    path = tmp_path / "c.yaml"
    n = 1200
    for case in range(n):
        what, data = _mutate_config(rng, rng.choice(bases))
        kinds[what.split()[0]] += 1
        path.write_bytes(data)
        try:
            spec = build_spec(str(path), {}).validate(need_out=False)
        except ExpoError as e:
            msg = str(e)
            if "\n" in msg or not msg:
                crashes.append((case, what, f"ExpoError of {msg.count(chr(10)) + 1} lines: {msg[:200]!r}"))
            outcomes["error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - exactly what must not happen
            crashes.append((case, what, f"{e.__class__.__name__}: {str(e)[:200]}"))
            continue
        try:
            _typed_ok(spec)
        except AssertionError as e:
            crashes.append((case, what, f"accepted with a wrong type: {e}"))
        outcomes["ok"] += 1
    assert not crashes, f"{len(crashes)} of {n} cases: {crashes[:10]}"
    assert sum(outcomes.values()) == n
    assert outcomes["error"] >= n // 2 and outcomes["ok"] >= 50, outcomes  # neither side vacuous
    assert all(kinds[k] >= 40 for k in ("swap", "raw", "key", "junk", "truncate", "encoding", "whole", "rule")), kinds
    print(f"config fuzz: {n} cases, {dict(outcomes)}, by mutation {dict(kinds)}")


def test_fuzz_cli_values(tmp_path, capsys):
    """The same values as flags (strings, as a shell gives them) through the real CLI: exit 2 with one line, or a
    spec of the right types."""
    import expo_dist.merge

    rng = random.Random(77)
    accepted = []

    def fake_run(spec, progress=True):
        spec.validate()
        _typed_ok(spec)
        accepted.append(spec)
        return {"files": {}, "tasks": 0, "tasks_resumed": 0, "workers": [], "merge_seconds": 0}

    texts = ["0", "1", "-1", "2.5", "1e3", "1e999", "nan", "inf", "true", "false", "yes", "5GB", "256MiB", "0.5MB",
             "1KB", "abc", "", " ", "9" * 50, "9" * 5000, "0x10", "1_000", "١٢", "5 GB", "-5GB", "1.5GiB", "10**3"]
    flags = ["--alpha", "--max-task-bytes", "--max-shard-size", "--cache-dir", "--address", "--out"]
    outcomes = collections.Counter()
    saved = expo_dist.merge.run
    expo_dist.merge.run = fake_run
    try:
        for case in range(300):
            flag, value = rng.choice(flags), rng.choice(texts)
            argv = {"--sft": "some/sft", "--aligned": "some/aligned", "--alpha": "0.3",
                    "--out": str(tmp_path / "o")}
            argv[flag] = value
            rc = main(["merge", "-q", *[f"{k}={v}" for k, v in argv.items()]])  # '=': '-1' is no option
            cap = capsys.readouterr()
            assert "Traceback" not in cap.err
            if rc == 2:
                lines = cap.err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("expo-dist: error: ") and flag in lines[0], \
                    (case, flag, value, cap.err)
                outcomes["error"] += 1
            else:
                assert rc == 0, (case, flag, value, rc, cap.err)
                outcomes["ok"] += 1
    finally:
        expo_dist.merge.run = saved
    assert outcomes["error"] >= 100 and outcomes["ok"] >= 50 and len(accepted) == outcomes["ok"], outcomes
    print(f"CLI value fuzz: 300 cases, {dict(outcomes)}")


# ---- verify on a damaged output --------------------------------------------------------------------------------

def merge_without_ray(spec) -> dict:
    """The merge's own steps (plan, staged shards, the worker's Runner, finish) in this process, without Ray:
    a real output folder in a fraction of a second."""
    from expo_dist.merge import build_plan
    from expo_dist.output.finalize import create_shards, finish, work_dir
    from expo_dist.output.manifest import RunInfo
    from expo_dist.runtime.runner import Runner

    spec.validate()
    plan, _, aligned = build_plan(spec)
    wdir = work_dir(spec.out)
    create_shards(plan, wdir)
    runner = Runner([wdir], "cpu")
    try:
        for task in plan.tasks:
            runner.run(task)
    finally:
        runner.close()
    sealed = {}
    for shard in plan.shards:
        with open(os.path.join(wdir, shard.file), "rb") as f:
            data = f.read()
        sealed[shard.file] = {"file": shard.file, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    info = RunInfo(spec.sft, spec.aligned, spec.alpha, alpha_rules=[r.describe() for r in spec.rules()])
    return finish(spec.out, plan, aligned.root, info, sealed)


@pytest.fixture(scope="module")
def output(pair_factory, tmp_path_factory):
    from expo_dist.spec import MergeSpec

    sft, aligned = pair_factory(seed=3, extra_vocab=5, nonfloat_buffer=True, sft_shard_bytes=60_000,
                                aligned_shard_bytes=45_000)
    out = tmp_path_factory.mktemp("fuzz-out") / "out"
    merge_without_ray(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.3, out=str(out), max_shard_size="80KB",
                                max_task_bytes="1MiB", alpha_rules=[{"match": "model.norm.*", "scale": 0.5}]))
    assert main(["verify", str(out), "--sft", str(sft), "--aligned", str(aligned), "--full"]) == 0
    return sft, aligned, out


SWAPS = ["null", "true", "false", "0", "-1", "1.5", "1e999", "-Infinity", "NaN", '""', '"x"', '"model.safetensors"',
         '"../../etc/passwd"', "[]", "{}", "[1, 2]", '{"a": {"b": 1}}', "1" * 5000, "1" * 4000, "[" * 5000 + "]" * 5000,
         "[" * 500 + "]" * 500, '{"a":' * 3000 + "1" + "}" * 3000, '"\\ud800"', '"\\u0000"', "18446744073709551616"]


def _paths(doc, prefix=()):
    """Every path into a JSON document (keys and list positions), the root included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            yield from _paths(v, prefix + (i,))


def _mutate_json(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    doc = json.loads(raw)
    kind = rng.choice(["swap", "swap", "swap", "swap", "drop", "junk", "truncate", "encoding", "whole"])
    if kind in ("swap", "drop"):
        paths = [p for p in _paths(doc) if p]
        path = rng.choice(paths)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if kind == "drop":
            del parent[path[-1]]
            return f"drop {path}", json.dumps(doc).encode()
        parent[path[-1]] = "@@SWAP@@"
        value = rng.choice(SWAPS)
        return f"swap {path} {value[:20]}", json.dumps(doc).replace('"@@SWAP@@"', value).encode()
    if kind == "junk":
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(buf))
            buf[pos] = rng.randrange(256)
        return "junk", bytes(buf)
    if kind == "truncate":
        return "truncate", raw[: rng.randrange(len(raw))]
    if kind == "encoding":
        return "utf-16", raw.decode().encode(rng.choice(["utf-16", "utf-32"]))
    return "whole", rng.choice([b"", b"[]", b"null", b"42", b'"x"', b"[" * 10000, b"\xff\xfe\x00",
                                b'{"weight_map": []}', b'{"files": []}', b'{"metadata": 5, "weight_map": {}}'])


def _verify_case(capsys, argv) -> str:
    """Run verify in-process; 'ok', 'failed' or 'error', or an AssertionError saying what went wrong."""
    try:
        rc = main(argv)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{e.__class__.__name__}: {str(e)[:200]}") from None
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err, cap.err[-2000:]
    if rc == 2:
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("expo-dist: error: "), cap.err[-2000:]
        return "error"
    assert rc in (0, 1), rc
    verdict = cap.out.splitlines()
    assert len(verdict) == 1, cap.out[-2000:]
    assert verdict[0].startswith("verify: OK" if rc == 0 else "verify: FAILED"), verdict
    return "ok" if rc == 0 else "failed"


def test_fuzz_verify_manifest_index_headers(output, tmp_path, capsys):
    sft, aligned, good = output
    out = tmp_path / "out"
    shutil.copytree(good, out)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    targets = ["expo_manifest.json", "model.safetensors.index.json"]
    originals = {name: (out / name).read_bytes() for name in targets + shards}
    rng = random.Random(4242)
    outcomes = collections.Counter()
    by_target = collections.Counter()
    crashes = []
    n = 500
    for case in range(n):
        if rng.random() < 0.15:  # a shard's safetensors header
            name = rng.choice(shards)
            data = originals[name]
            hlen = int.from_bytes(data[:8], "little")
            what, header = _mutate_json(rng, data[8:8 + hlen])
            if rng.random() < 0.5:  # keep the file's length right, so the header itself is what is read
                header = header[:hlen].ljust(hlen, b" ")
            new = len(header).to_bytes(8, "little") + header + data[8 + hlen:]
        else:
            name = rng.choice(targets)
            what, new = _mutate_json(rng, originals[name])
        by_target[name.split("-")[0]] += 1
        (out / name).write_bytes(new)
        with_inputs = rng.random() < 0.5
        argv = ["verify", str(out)] + (["--sft", str(sft), "--aligned", str(aligned), "--sample", "2",
                                        "--seed", str(case)] if with_inputs else [])
        try:
            outcomes[_verify_case(capsys, argv)] += 1
        except AssertionError as e:
            crashes.append((case, name, what[:80], with_inputs, str(e)[:300]))
        (out / name).write_bytes(originals[name])
    assert not crashes, f"{len(crashes)} of {n} cases: {crashes[:8]}"
    assert sum(outcomes.values()) == n
    assert outcomes["failed"] + outcomes["error"] >= n // 2 and outcomes["failed"] >= 100, outcomes
    assert by_target["expo_manifest.json"] >= 150 and by_target["model.safetensors.index.json"] >= 150, by_target
    # the folder is whole again: verify passes
    assert _verify_case(capsys, ["verify", str(out), "--sft", str(sft), "--aligned", str(aligned)]) == "ok"
    print(f"verify fuzz: {n} cases, {dict(outcomes)}, by file {dict(by_target)}")


@pytest.mark.parametrize("name", ["expo_manifest.json", "model.safetensors.index.json"])
def test_damaged_metadata_is_a_verdict(output, tmp_path, capsys, name):
    """The issue's cases, one by one: wrong JSON types, not JSON, deep nesting, huge integers."""
    sft, aligned, good = output
    out = tmp_path / "out"
    shutil.copytree(good, out)
    doc = json.loads((out / name).read_text())
    key = "files" if name == "expo_manifest.json" else "weight_map"
    cases = {
        "list": b"[1, 2]",
        "not JSON": b"{not json",
        "not UTF-8": b'{"\xff": 1}',
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "huge int": b'{"total_size": ' + b"9" * 10_000 + b"}",
        f"{key} a list": json.dumps({**doc, key: []}).encode(),
        f"{key} entries wrong": json.dumps({**doc, key: {k: [v] for k, v in doc[key].items()}}).encode(),
        "metadata wrong": json.dumps({**doc, "metadata": "x", "alpha": True}).encode(),
    }
    for what, data in cases.items():
        (out / name).write_bytes(data)
        got = _verify_case(capsys, ["verify", str(out), "--sft", str(sft), "--aligned", str(aligned)])
        assert got in ("failed", "error"), what
