"""The Bazel BUILD file: complete, up to date, buildifier-clean, and it builds and tests."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.cli_testing import ROOT

UNDER_BAZEL = "TEST_SRCDIR" in os.environ  # running as a py_test: no nested Bazel
BUILD = os.path.join(ROOT, "BUILD")


def _update_build():
    spec = importlib.util.spec_from_file_location(
        "update_build", os.path.join(ROOT, "scripts", "update_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree_files() -> set[str]:
    found = set()
    for top, pattern in (("jaxpost", r".*\.py$"), ("tests", r"test_.*\.py$")):
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            found.update(os.path.relpath(os.path.join(folder, n), ROOT)
                         for n in names if re.match(pattern, n))
    return found


@pytest.mark.skipif(not os.path.exists(BUILD), reason="BUILD is not in the runfiles")
def test_every_module_and_test_file_has_a_build_target():
    with open(BUILD) as f:
        listed = set(re.findall(r'"((?:jaxpost|tests)/[^"]+\.py)"', f.read()))
    missing = sorted(_tree_files() - listed)
    assert not missing, (f"BUILD has no target for {missing}; run "
                         "python scripts/update_build.py")


@pytest.mark.skipif(not os.path.exists(BUILD), reason="BUILD is not in the runfiles")
def test_build_is_what_update_build_writes():
    with open(BUILD) as f:
        assert f.read() == _update_build().render(), \
            "BUILD is out of date: run python scripts/update_build.py"


def test_modules_importing_each_other_share_one_target():
    groups = _update_build().cycles_merged(
        {"a": {"b"}, "b": {"c"}, "c": {"b", "d"}, "d": set(), "e": {"e"}})
    assert groups == {"a": ["a"], "b": ["b", "c"], "c": ["b", "c"], "d": ["d"], "e": ["e"]}


@pytest.mark.skipif(shutil.which("buildifier") is None,
                    reason="buildifier is not installed (npm install -g @bazel/buildifier@8.2.1)")
def test_buildifier_formatting_and_lint_pass():
    files = [f for f in ("BUILD", "WORKSPACE") if os.path.exists(os.path.join(ROOT, f))]
    lint = subprocess.run(["buildifier", "--mode=check", "--lint=warn", *files],
                          cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # The stand-ins forward to native rules on purpose: formatting only.
    stubs = subprocess.run(["buildifier", "--mode=check", "-r", "bazel/stubs"], cwd=ROOT,
                           capture_output=True, text=True)
    assert stubs.returncode == 0, stubs.stdout + stubs.stderr


@pytest.mark.slow
@pytest.mark.skipif(UNDER_BAZEL or shutil.which("bazel") is None,
                    reason="Bazel is not installed (apt-get install bazel-bootstrap ...), "
                           "or this runs inside Bazel")
def test_bazel_builds_the_library_and_passes_a_py_test():
    subprocess.run(["bash", "scripts/bazel_setup.sh", "--python", sys.executable], cwd=ROOT,
                   check=True)
    try:
        build = subprocess.run(["bazel", "build", "//:jaxpost_all"], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stderr[-3000:]
        test = subprocess.run(["bazel", "test", "//:tests_rl_test_rollout"], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
        assert "1 test passes" in test.stdout + test.stderr
        with open(os.path.join(ROOT, "bazel-testlogs", "tests_rl_test_rollout",
                               "test.log")) as f:
            assert re.search(r"\d+ passed", f.read())  # pytest ran the file's tests
    finally:
        subprocess.run(["bazel", "shutdown"], cwd=ROOT, capture_output=True, timeout=120)
