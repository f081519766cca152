"""Self-Tuning Networks (MacKay et al., ICLR 2019, arXiv 1903.03088) and Delta-STN (Bae & Grosse,
NeurIPS 2020, arXiv 2010.13514) inside the local-SGD worker: hyperparameters learned online.

This package holds the model side of an STN:

* :mod:`.space`: unconstrained hyperparameters h, perturbation scales s, transforms, entropy.
* :mod:`.layers`: best-response ``StnLinear``/``StnConv1d``/``StnConv2d`` and per-example dropout.
* :mod:`.augment`: the per-example data path (shift/stretch for 1-D signals, input noise and dropout).
* :mod:`.convert`: turns a ``localsgd.models`` model into an STN in place.
* :mod:`.averaging`: plain and Jacobian-corrected averaging across workers.

The optimizer plugin that trains it, ``optimizer=stn`` (Algorithm 1, Delta-STN by default: ``StnConfig``,
``StnPlugin``, ``build_stn``, ``linearized_forward``), is :mod:`localsgd.optim.stn`; this package imports
nothing from :mod:`localsgd.optim`.
"""

from .averaging import consensus_pre_average, move_to_hyperparameters_
from .convert import HYPERPARAMETERS, StnModel, find, to_stn
from .layers import HyperContext, StnConv1d, StnConv2d, StnDropout, StnLayer, StnLinear, per_example_dropout
from .space import HParamSpec, HyperSpace

__all__ = [
    "HYPERPARAMETERS", "HParamSpec", "HyperContext", "HyperSpace", "StnConv1d", "StnConv2d", "StnDropout",
    "StnLayer", "StnLinear", "StnModel", "consensus_pre_average", "find", "move_to_hyperparameters_",
    "per_example_dropout", "to_stn",
]
