"""Meta-learned update rules that run inside the local-SGD worker.

- :mod:`localsgd.learned.lopt` — a per-parameter MLP learned optimizer (Metz et al. 2020/2022 style,
  scaled down to meta-train on 2 CPU cores), ``optimizer=learned``.
- :mod:`localsgd.learned.unsupervised` — the neuron-local unsupervised update rule of Metz,
  Maheswaranathan, Cheung & Sohl-Dickstein (ICLR 2019, arXiv 1804.00222), ``optimizer=metz_unsupervised``.

The worker-loop plugins of both rules live in :mod:`localsgd.optim.learned` and :mod:`localsgd.optim.metz`;
the modules here hold the rules, their checkpoints and meta-trainers, and import nothing from
:mod:`localsgd.optim`. Submodules are imported directly; this package imports nothing so each stays optional.
"""
