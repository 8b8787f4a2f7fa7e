import os
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

# Triton kernels run on CPU tensors under the interpreter where no GPU is present. Must be set
# before triton compiles anything (triton_kernels is imported lazily by the ops).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Measured dispatch (pyhappy.tune): the suite runs the ops' default schedules, so results do not
# depend on what this machine measured; tests/test_tune.py turns it on with a cache of its own, and
# forces each candidate against the reference. Nothing is written to the user's tuning cache.
os.environ.setdefault("PYHAPPY_TUNE", "off")
os.environ.setdefault("PYHAPPY_TUNE_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".hypothesis",
                                                          "tune-test-cache.json"))

# Hypothesis profiles: "ci" (default) keeps the suite within its time budget; "deep" is for
# release checks: HYPOTHESIS_PROFILE=deep pytest tests
# Failing examples are saved in the checkout's .hypothesis/ (whatever the working directory) and
# replayed first on the next run, in either profile.
_DB = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 ".hypothesis", "examples"))
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          database=_DB)
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          database=_DB)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The GPU check (bash .ci/gpu) gives its test phase a deadline, in seconds since the epoch: a test not
# started by then is skipped, so that pytest ends (and writes its JUnit XML) within the phase's budget.
# Its `timeout -s INT` must also reach pytest when the shell started it with SIGINT ignored.
_DEADLINE = float(os.environ.get("PYHAPPY_TEST_DEADLINE") or 0)
if _DEADLINE and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_runtest_setup(item):
    if _DEADLINE and time.time() > _DEADLINE:
        pytest.skip("the GPU check's time budget for tests ran out before this test started")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fp32_engine():
    """Call with 'aten' or 'onednn' to run the C++ ops' fp32 products on that engine for one test
    (csrc/cpu/gemm.h; skips where this torch has no oneDNN); the start-up setting is restored after."""
    from pyhappy import _ext

    e = _ext.load()
    if e is None:
        pytest.skip("pyhappy._C not built")

    def use(engine):
        e.set_fp32_gemm(engine)
        if e.fp32_gemm() != engine:
            pytest.skip(f"fp32 engine {engine!r} not available here (in use: {e.fp32_gemm()})")

    yield use
    e.set_fp32_gemm(os.environ.get("PYHAPPY_FP32_GEMM", "auto"))
