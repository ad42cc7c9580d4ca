"""The merge config's one typed schema (spec.FIELDS): YAML keys and CLI flags are checked the same way, and a
wrong type or range is exit 2 with one stderr line naming the key, never a traceback or a silent coercion."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from expo_dist.cli import main
from expo_dist.errors import ExpoError
from expo_dist.spec import DEVICES, FIELDS, MergeSpec, build_spec, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "sft: some/sft\naligned: some/aligned\nalpha: 0.3\n"

# (YAML line, key the error must name, words the line must hold)
BAD_YAML = [
    ("workers: two", "workers", ["integer", "'two'"]),
    ("workers: true", "workers", ["integer", "boolean"]),
    ("workers: 2.5", "workers", ["integer", "2.5"]),
    ("workers: 0", "workers", ["at least 1"]),
    ("workers: 1000000000000", "workers", ["at most"]),
    ("io: 3", "io", ["auto, direct, buffered", "3"]),
    ("io: fast", "io", ["auto, direct, buffered", "'fast'"]),
    ("io: true", "io", ["boolean"]),
    ("out: 5", "out", ["string", "5"]),
    ("out: ''", "out", ["non-empty string"]),
    ("out: [a, b]", "out", ["string", "list"]),
    ("alpha: yes", "alpha", ["number", "boolean"]),
    ("alpha: true", "alpha", ["number", "boolean"]),
    ("alpha: [0.1, true]", "alpha", ["number", "boolean"]),
    ("alpha: abc", "alpha", ["number", "'abc'"]),
    ("alpha: {a: 1}", "alpha", ["number", "mapping"]),
    ("alpha: [[0.1, 0.2]]", "alpha", ["number", "list"]),
    ("alpha: []", "alpha", ["needs a value"]),
    ("alpha: .nan", "alpha", ["finite"]),
    ("alpha: " + "9" * 400, "alpha", ["finite"]),
    ("alpha: [0.1, 0.10]", "alpha", ["twice"]),
    ("max_shard_size: true", "max_shard_size", ["size", "boolean"]),
    ("max_shard_size: false", "max_shard_size", ["size", "boolean"]),
    ("max_shard_size: 0", "max_shard_size", ["at least 1 byte"]),
    ("max_shard_size: 0.5", "max_shard_size", ["size", "0.5"]),
    ("max_shard_size: 5XB", "max_shard_size", ["'5XB'"]),
    ("max_shard_size: " + "9" * 40, "max_shard_size", ["at most 1EiB"]),
    ("max_shard_size: [5GB]", "max_shard_size", ["size", "list"]),
    ("max-shard-size: yes", "max_shard_size", ["size", "boolean"]),
    ("max_task_bytes: 1KB", "max_task_bytes", ["at least 1MiB"]),
    ("max_task_bytes: on", "max_task_bytes", ["size", "boolean"]),
    ("overwrite: 'false'", "overwrite", ["true or false", "'false'", "string"]),
    ("overwrite: 'true'", "overwrite", ["true or false", "string"]),
    ("overwrite: 1", "overwrite", ["true or false", "integer"]),
    ("overwrite: 0", "overwrite", ["true or false", "integer"]),
    ("max_attempts: false", "max_attempts", ["integer", "boolean"]),
    ("max_attempts: '3.5'", "max_attempts", ["integer"]),
    ("max_attempts: 0", "max_attempts", ["at least 1"]),
    ("max_attempts: 99999", "max_attempts", ["at most"]),
    ("cache_dir: 7", "cache_dir", ["string", "integer"]),
    ("cache_dir: \"a\\0b\"", "cache_dir", ["NUL"]),
    ("address: 6379", "address", ["string", "integer"]),
    ("sft: [a]", "sft", ["string", "list"]),
    ("aligned: {path: a}", "aligned", ["string", "mapping"]),
    ("aligned: 2024-01-01", "aligned", ["string", "date"]),
    ("device: gpu", "device", ["auto, cuda, cpu", "'gpu'"]),
    ("device: true", "device", ["auto, cuda, cpu", "boolean"]),
    ("device: 0", "device", ["auto, cuda, cpu", "integer"]),
    ("alpha_rules: {match: x, alpha: 0}", "alpha_rules", ["list of mappings"]),
    ("alpha_rules: yes", "alpha_rules", ["list of mappings", "boolean"]),
    ("alpha_rules: [5]", "alpha_rules[0]", ["mapping", "integer"]),
    ("alpha_rules: [{match: x, alpha: yes}]", "alpha_rules[0]", ["alpha must be a number", "boolean"]),
    ("alpha_rules: [{match: x, scale: [1]}]", "alpha_rules[0]", ["scale must be a number", "list"]),
    ("alpha_rules: [{match: x, alpha: '0.1.2'}]", "alpha_rules[0]", ["alpha must be a number"]),
    ("alpha_rules: [{match: x, alpha: .inf}]", "alpha_rules[0]", ["finite"]),
    ("alpha_rules: [{match: 7, alpha: 0}]", "alpha_rules[0]", ["match must be a non-empty string", "integer"]),
    ("alpha_rules: [{regex: '(', alpha: 0}]", "alpha_rules[0]", ["bad regex"]),
    ("alpha_rules: [{match: x, regex: y, alpha: 0}]", "alpha_rules[0]", ["exactly one of match/regex"]),
    ("alpha_rules: [{1: 2, match: x, alpha: 0}]", "alpha_rules[0]", ["keys", "integer"]),
]


def refused(capsys, argv, *words):
    """exit 2, exactly one stderr line, naming each word; nothing on stdout; no traceback."""
    rc = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, (rc, cap.err)
    assert len(lines) == 1 and lines[0].startswith("expo-dist: error: "), cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("line,key,words", BAD_YAML, ids=[c[0][:40] for c in BAD_YAML])
@pytest.mark.parametrize("cmd", ["merge", "plan"])
def test_wrong_type_in_yaml_is_one_line_naming_the_key(tmp_path, capsys, line, key, words, cmd):
    cfg = tmp_path / "c.yaml"
    first = line.split(":")[0].replace("-", "_")
    # the line replaces the base's own value of that key, if it has one
    base = "".join(b + "\n" for b in BASE.splitlines() if b.split(":")[0] != first)
    cfg.write_text(base + line + "\n")
    msg = refused(capsys, [cmd, "--config", str(cfg), "--out", str(tmp_path / "o")], str(cfg), *words)
    assert f"{cfg}: {key}" in msg, msg
    assert not (tmp_path / "o").exists()


# (flags, words): the CLI's values go through the same checks (sizes arrive as strings, --workers as an int)
BAD_FLAGS = [
    (["--max-shard-size", "true"], ["--max-shard-size", "'true'"]),
    (["--max-shard-size", "0"], ["--max-shard-size", "at least 1 byte"]),
    (["--max-task-bytes", "1KB"], ["--max-task-bytes", "at least 1MiB"]),
    (["--max-task-bytes", "9" * 200], ["--max-task-bytes", "size"]),
    (["--workers", "0"], ["--workers", "at least 1"]),
    (["--max-attempts", "0"], ["--max-attempts", "at least 1"]),
    (["--alpha", "yes"], ["--alpha", "number", "'yes'"]),
    (["--alpha", "1" + "0" * 400], ["--alpha", "finite"]),
    (["--alpha", "0.1", "0.1"], ["--alpha", "twice"]),
    (["--out", ""], ["--out", "non-empty"]),
    (["--cache-dir", " "], ["--cache-dir", "non-empty"]),
]


@pytest.mark.parametrize("flags,words", BAD_FLAGS, ids=[" ".join(f[0])[:40] for f in BAD_FLAGS])
def test_wrong_flag_values_are_one_line(tmp_path, capsys, flags, words):
    argv = ["merge", "--sft", "some/sft", "--aligned", "some/aligned", "--out", str(tmp_path / "o")]
    if "--alpha" not in flags:
        argv += ["--alpha", "0.3"]
    refused(capsys, argv + flags, *words)


def test_device_flag_and_key(tmp_path):
    spec = build_spec(None, {"sft": "a", "aligned": "b", "alpha": "0.3"}).validate(need_out=False)
    assert spec.device == "auto"
    for dev in DEVICES:
        assert build_spec(None, {"sft": "a", "aligned": "b", "alpha": "0.3", "device": dev}).validate(
            need_out=False).device == dev
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE + "device: CPU\n")
    assert build_spec(str(cfg), {}).validate(need_out=False).device == "cpu"
    assert build_spec(str(cfg), {"device": "cuda"}).validate(need_out=False).device == "cuda"  # flags override


def test_device_flag_reaches_the_spec(monkeypatch, tmp_path):
    import expo_dist.merge

    seen = {}

    def fake_run(spec, progress=True):
        spec.validate()
        seen["spec"] = spec
        return {"files": {}, "tasks": 0, "tasks_resumed": 0, "workers": [], "merge_seconds": 0}

    monkeypatch.setattr(expo_dist.merge, "run", fake_run)
    assert main(["merge", "--sft", "a", "--aligned", "b", "--alpha", "0.3", "--out", str(tmp_path / "o"),
                 "--device", "cpu", "-q"]) == 0
    assert seen["spec"].device == "cpu"
    with pytest.raises(SystemExit) as e:  # argparse's own refusal for a value outside the choices
        main(["merge", "--sft", "a", "--aligned", "b", "--alpha", "0.3", "--device", "gpu"])
    assert e.value.code == 2


def test_valid_values_are_normalised_not_coerced(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE.replace("alpha: 0.3", "alpha: [0.1, 0.3, '0.5']") + """\
out: out-here
address: auto
workers: 3.0
max_task_bytes: 2MiB
max_shard_size: 1000000
overwrite: true
max_attempts: 2
cache_dir: ~/hf
alpha_rules:
  - {match: "model.embed_tokens.*", alpha: 0}
  - {regex: 'model\\.layers\\.1\\..*', scale: 0.5}
io: Buffered
device: auto
description: free text
notes: [anything, {goes: here}]
""")
    spec = build_spec(str(cfg), {}).validate()
    assert spec.alpha == [0.1, 0.3, 0.5] and all(type(a) is float for a in spec.alpha)
    assert spec.workers == 3 and type(spec.workers) is int
    assert (spec.max_task_bytes, spec.max_shard_size) == (2 << 20, 10**6)
    assert spec.overwrite is True and spec.max_attempts == 2 and spec.io == "buffered" and spec.device == "auto"
    assert spec.out == os.path.abspath("out-here") and spec.cache_dir == os.path.expanduser("~/hf")
    assert [r.describe() for r in spec.rules()] == [{"match": "model.embed_tokens.*", "alpha": 0.0},
                                                    {"regex": r"model\.layers\.1\..*", "scale": 0.5}]
    cfg.write_text(BASE + "overwrite: false\nworkers: null\nmax_shard_size: null\n")
    spec = build_spec(str(cfg), {}).validate(need_out=False)
    assert spec.overwrite is False and spec.workers is None and spec.max_shard_size == 5 * 10**9


def test_python_api_goes_through_the_schema():
    with pytest.raises(ExpoError, match=r"--max-shard-size must be a size.*True \(a boolean\)"):
        MergeSpec(sft="a", aligned="b", alpha=0.3, max_shard_size=True).validate(need_out=False)
    with pytest.raises(ExpoError, match=r"--overwrite must be true or false.*'false'"):
        MergeSpec(sft="a", aligned="b", alpha=0.3, overwrite="false").validate(need_out=False)
    with pytest.raises(ExpoError, match=r"--alpha must be a number.*boolean"):
        MergeSpec(sft="a", aligned="b", alpha=True).validate(need_out=False)
    spec = MergeSpec(sft="a", aligned="b", alpha=0.3, max_shard_size="200KB", max_task_bytes=2 << 20)
    assert spec.validate(need_out=False).max_shard_size == 200_000
    assert spec.validate(need_out=False).max_shard_size == 200_000  # validating twice changes nothing


def test_schema_covers_every_field():
    assert list(FIELDS) == [f.name for f in dataclasses.fields(MergeSpec)]
    assert all(t and d and "\n" not in d for t, d in FIELDS.values())


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "--device {auto,cuda,cpu}" in out and "require GPUs" in out
    for key, (_typ, desc) in FIELDS.items():
        assert f"  {key} " in out and desc[:30] in out, key


def test_unknown_key_lists_the_known_ones(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE + "alhpa: 0.5\n")
    with pytest.raises(ExpoError) as e:
        load_config(str(cfg))
    msg = str(e.value)
    assert "'alhpa'" in msg and all(k in msg for k in FIELDS) and "--help" in msg and "\n" not in msg


@pytest.mark.parametrize("content,words", [
    (b"sft: a\n\xff\xfe: 1\n", ["not a UTF-8 text file"]),
    (b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", ["nest"]),
    (b"alpha: " + b"1" * 5000 + b"\n", ["not a usable config"]),
    (b"alpha: [0.3\n", ["not valid YAML"]),
    (b"- 0.3\n", ["a config must be a YAML mapping", "a list"]),
    (b"{1: 2}\n", ["unknown key 1"]),
    (b"sft: a\nsft-: b\n", ["unknown key 'sft-'"]),
    (b"max_shard_size: 1\nmax-shard-size: 2\n", ["given twice"]),
    (b"alpha: &a [*a]\n", ["alpha must be a number", "list"]),
])
def test_broken_files_are_one_line(tmp_path, capsys, content, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    refused(capsys, ["plan", "--config", str(cfg)], str(cfg), *words)


def test_verify_takes_inputs_from_a_checked_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE + "overwrite: 'no'\n")
    (tmp_path / "o").mkdir()
    refused(capsys, ["verify", str(tmp_path / "o"), "--config", str(cfg)], "overwrite", "true or false")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_configs_still_load(path):
    spec = build_spec(path, {}).validate(need_out=False)
    assert isinstance(spec.alpha, float) and isinstance(spec.max_shard_size, int) and spec.device == "auto"
