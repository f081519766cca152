"""Run a function on N real Gloo ranks on localhost, each collective bounded by a timeout.

The spawner lives in the package (:mod:`localsgd.testing.ranks`) so the benchmarks share it; each
rank joins through ``localsgd.dist.init`` as the trainer does. These names stay here so the tests
import them from one place.
"""

from localsgd.testing.ranks import free_port, run_ok, run_ranks

__all__ = ["free_port", "run_ranks", "run_ok"]
