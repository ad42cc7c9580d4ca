"""One Settings object (expo_dist/settings.py): built once on the driver, the config over the environment, handed
to every actor. Nothing else in the package reads an EXPO_* variable, at import or later."""

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import faulthooks
import pytest

from expo_dist.errors import ExpoError
from expo_dist.settings import ENV, HUB_ATTEMPTS, Settings

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "expo_dist"


def test_defaults_without_environment():
    s = Settings.from_env(environ={})
    assert s == Settings() == Settings(io="auto", slots=2, writeback="throttle", kernel="auto",
                                       hub_attempts=HUB_ATTEMPTS, test_hooks=None)


def test_environment_read_and_parsed():
    env = {"EXPO_IO": " Direct ", "EXPO_SLOTS": "4", "EXPO_WRITEBACK": "off", "EXPO_KERNEL": "torch",
           "EXPO_HUB_ATTEMPTS": "3", "EXPO_TEST_HOOKS": "tests.faulthooks:Hooks"}
    assert Settings.from_env(environ=env) == Settings(io="direct", slots=4, writeback="off", kernel="torch",
                                                      hub_attempts=3, test_hooks="tests.faulthooks:Hooks")
    # as before the settings object: at least 2 slots, a hub count that is no number means the default,
    # EXPO_KERNEL empty or "c" the C kernel, empty variables as if unset
    assert Settings.from_env(environ={"EXPO_SLOTS": "1", "EXPO_HUB_ATTEMPTS": "many", "EXPO_KERNEL": "c",
                                      "EXPO_IO": ""}) == Settings(slots=2)
    assert Settings.from_env(environ={"EXPO_HUB_ATTEMPTS": "0"}).hub_attempts == 1


def test_the_config_wins_over_the_environment():
    env = {"EXPO_IO": "direct"}
    assert Settings.from_env({"io": "buffered"}, environ=env).io == "buffered"
    assert Settings.from_env({"io": None}, environ=env).io == "direct"  # None: not given
    with pytest.raises(TypeError):
        Settings.from_env({"iomode": "auto"}, environ={})


@pytest.mark.parametrize("var,value,words", [
    ("EXPO_IO", "fast", ["EXPO_IO", "'fast'", "auto, direct or buffered"]),
    ("EXPO_SLOTS", "two", ["EXPO_SLOTS", "'two'", "integer"]),
    ("EXPO_WRITEBACK", "sometimes", ["EXPO_WRITEBACK", "throttle, async or off"]),
    ("EXPO_KERNEL", "cuda", ["EXPO_KERNEL", "auto or torch"]),
    ("EXPO_TEST_HOOKS", "no-colon", ["EXPO_TEST_HOOKS", "FILE.py:NAME"]),
])
def test_a_bad_value_is_one_line_naming_the_variable(var, value, words):
    with pytest.raises(ExpoError) as e:
        Settings.from_env(environ={var: value})
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    with pytest.raises(ExpoError):
        Settings.from_env({"io": "fast"}, environ={})


def test_frozen_and_picklable():
    s = Settings(io="buffered", slots=3)
    with pytest.raises(AttributeError):
        s.io = "direct"
    assert pickle.loads(pickle.dumps(s)) == s  # what Ray does to hand it to each actor
    assert Settings(io=" Buffered ").io == "buffered"  # checked and normalized however it is made


def _string_constants(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def test_only_settings_names_an_expo_variable():
    """No module but settings.py names an EXPO_* variable (so none can read one), and the worker actor and the
    task runner look at no environment variable at all: they get the Settings."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "settings.py":
            continue
        found += [f"{path.relative_to(ROOT)}:{line} {v}" for line, v in _string_constants(path)
                  if v.startswith("EXPO_") and v.rstrip("_").replace("_", "").isalnum()]
    assert not found, found
    assert set(ENV.values()) >= {"EXPO_IO", "EXPO_SLOTS", "EXPO_WRITEBACK", "EXPO_KERNEL", "EXPO_HUB_ATTEMPTS"}
    for name in ("worker.py", "runner.py"):
        text = (PKG / "runtime" / name).read_text()
        assert "environ" not in text and "getenv" not in text, name


def test_importing_the_package_reads_no_expo_variable():
    """Bad values in every EXPO_* variable: importing every module still works (nothing reads them at import);
    building the Settings is where they are refused."""
    code = ("import importlib, pkgutil, expo_dist\n"
            "for m in pkgutil.walk_packages(expo_dist.__path__, 'expo_dist.'):\n"
            "    if not m.name.startswith('expo_dist.testing'):\n"
            "        importlib.import_module(m.name)\n"
            "from expo_dist.settings import Settings\n"
            "try:\n"
            "    Settings.from_env()\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **{v: "bad:value" for v in ENV.values()}}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ExpoError EXPO_"), r.stdout


def test_runner_takes_its_settings():
    from expo_dist.runtime.runner import Runner

    r = Runner("/nonexistent", settings=Settings(slots=3, io="buffered", writeback="off", kernel="torch"))
    try:
        assert len(r.slots) == 3 and r.io_mode == "buffered" and r.writeback == "off" and not r.c_path
    finally:
        r.close()


def test_worker_loads_test_hooks_by_file_or_module():
    from expo_dist.runtime.worker import load_hooks

    assert load_hooks(None) is None
    hooks = load_hooks(faulthooks.HOOKS)  # FILE.py:NAME, as the fault tests give it
    assert callable(hooks.before) and callable(hooks.after)
    assert type(load_hooks("faulthooks:Hooks")).__name__ == "Hooks"  # package.module:NAME
