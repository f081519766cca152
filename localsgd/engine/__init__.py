"""The averaging engine: ``LocalSGD`` wraps a model and its optimizer in any training loop.

One concern a module:

* :mod:`.local_sgd`: the public :class:`LocalSGD` (step, finalize, averaged, state) and the sync's phases.
* :mod:`.layout`: flat buffers (parameters as views, buffer slots, check tail) and their buckets.
* :mod:`.check_words`: the agreement check's encodings, pure functions.
* :mod:`.averaging`: how the flat buffers travel (bucketed all-reduce; the seam for other strategies).
* :mod:`.state`: the replica backup, the skip-round snapshot and the optimizer-state policy.
* :mod:`.stats`: communication accounting.
"""

from .layout import FlatBuffer, FlatLayout
from .local_sgd import AGREEMENT_CHECKS, BUFFER_POLICIES, NONFINITE_POLICIES, OPTIMIZER_STATE_POLICIES, LocalSGD
from .stats import SyncStats

__all__ = ["AGREEMENT_CHECKS", "BUFFER_POLICIES", "NONFINITE_POLICIES", "OPTIMIZER_STATE_POLICIES", "FlatBuffer",
           "FlatLayout", "LocalSGD", "SyncStats"]
