"""Pytest setup for the suite: the Triton interpreter switch and the Hypothesis profiles.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton
is imported, so it is set here, before any test module imports the library. Helpers live in utils.py.
"""
import os

import torch
from hypothesis import HealthCheck, settings

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Property tests: CI runs "ci" (few, fixed cases); `make fuzz` runs "fuzz" (HYPOTHESIS_PROFILE=fuzz).
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", 5000)), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
