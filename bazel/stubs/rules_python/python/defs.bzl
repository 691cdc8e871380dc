"""Local stand-in for rules_python's python/defs.bzl: Bazel 4's native Python rules.

jaxpost's BUILD loads its rules from @rules_python as on a current Bazel; on Debian's
bazel-bootstrap 4.2.3, offline, this repository (WORKSPACE: local_repository) forwards
them to the native rules, and third-party packages come from the Python toolchain's own
site-packages (scripts/bazel_setup.sh registers the project's interpreter).
"""

def py_binary(**kwargs):
    native.py_binary(**kwargs)

def py_library(**kwargs):
    native.py_library(**kwargs)

def py_runtime(**kwargs):
    native.py_runtime(**kwargs)

def py_test(**kwargs):
    native.py_test(**kwargs)
