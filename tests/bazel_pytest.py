"""The main of every `py_test` in BUILD: runs the test file(s) given as arguments under
pytest, from the runfiles tree Bazel prepares (pytest.ini and tests/conftest.py apply)."""

import os
import sys

import pytest

if __name__ == "__main__":
    args = [*sys.argv[1:], "-p", "no:cacheprovider"]
    if os.environ.get("XML_OUTPUT_FILE"):  # Bazel's test.xml
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    sys.exit(pytest.main(args))
