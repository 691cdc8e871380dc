"""Test set-up: 8 fake CPU devices so mesh tests run anywhere; float32 matmuls exact."""

import collections
import os

# Must happen before jax is imported anywhere: tests see 8 CPU devices; single-device
# tests use jax.devices()[:1] explicitly or run on the default device.
#
# And XLA:CPU compiles without LLVM's optimisations (backend level 0; a caller's own level
# wins): the suite compiles many small programs whose run time is negligible, so
# compiling is most of its time. At level 0 the not-slow tests take ~40% less CPU (2 GHz
# 2-core AMD EPYC, 2026-12-07: `-m "not slow"` 7:05 -> 4:28 wall, 13:13 -> 8:11 CPU;
# tests/models/test_transformer.py alone 137 -> 81 s CPU). XLA's HLO passes do not depend
# on it, so the HLO-text and memory-analysis assertions hold as they are; the library
# itself keeps XLA's default level. Float results can differ from the default level's in
# the last bits (e.g. random normal draws): a test that compares its own results with
# another process's passes these flags on (tests/cli_testing.xla_flags), and the demos,
# whose accuracy bars were measured at the default level, run at it (tests/test_demos.py).
#
# And XLA:CPU compiles fusions with its older loop emitters instead of its MLIR fusion
# emitters (--xla_cpu_use_fusion_emitters=false; a caller's choice wins): compiling is
# ~35% faster (tiny qwen2 at level 0: forward 0.61 -> 0.41 s, gradient 1.49 -> 0.90 s);
# `-m "not slow"` 5:03 -> 3:38 wall, 9:45 -> 6:56 CPU (2 GHz 2-core EPYC, 2026-12-07, 708
# passed). The fusion passes decide a little differently with it (the tiny gradient's
# temporaries 317,192 -> 317,344 bytes); the memory-analysis tests' bounds hold either
# way. The flag is jaxlib 0.10.2's (pinned): a jaxlib without it stops at start-up with
# "Unknown flag in XLA_FLAGS".
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path set-up
def pytest_configure(config):
    """One persistent XLA compilation cache per test run, shared by the xdist workers and
    the processes tests start (CLI runs, notebooks, multi-host peers): many tests compile
    the same programs again (a straight run and its resumed twin, each parametrization),
    and on a 2-core CPU compiling is most of the suite's time (GRPO and reliability
    tests: 315 -> 183 s). It lives in pytest's base temp folder, which pytest rotates;
    a JAX_COMPILATION_CACHE_DIR set by the caller wins."""
    # xdist's loadfile sends files in the order of pytest_collection_modifyitems below
    # only without its own reordering by test count (which put the 2-test demo file,
    # the longest unit, among the last files, to run alone at the end).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    basetemp = config._tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        basetemp = basetemp.parent  # the run's folder, above each worker's popen-gwN
    cache_dir = str(basetemp / "xla-compilation-cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


#: Files that run for minutes as one unit (the SFT demo's training, the notebooks, the
#: two-process runs), longest first (`--durations` on a 2-core CPU, 2026-12-07): a
#: scheduling hint only; a stale entry costs nothing but balance.
LONGEST_FILES = ("tests/test_demos.py", "tests/test_notebooks.py", "tests/test_multihost.py",
                 "tests/test_reliability.py", "tests/train/test_grpo.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with slow tests, the quick files
    last: with `--dist loadfile` each file goes to one worker whole, and a long file
    collected late (the SFT demo's ~6 min) left one worker running alone at the end while
    the other idled; quick files now fill the gaps as the workers finish. Within each of
    the last two groups, files with more tests go first (xdist's own heuristic, which
    conftest turns off above so that this order is the one that runs); within a file the
    order is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    counts = collections.Counter(item.path for item in items)

    def rank(item):
        name = os.path.relpath(item.path, config.rootpath).replace(os.sep, "/")
        if name in LONGEST_FILES:
            return LONGEST_FILES.index(name), 0, name
        return len(LONGEST_FILES) + (item.path not in slow_files), -counts[item.path], name
    items.sort(key=rank)
