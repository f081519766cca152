"""The STN data path: per-example augmentation and input noise as batched tensor operations.

In a Self-Tuning Network every training example gets its own perturbed hyperparameters (MacKay et
al., ICLR 2019, arXiv 1903.03088), so augmentation strengths differ *within* a minibatch. The
official code mutates the dataset per ``__getitem__``; here each operation takes the batch and a
``[B]`` tensor of strengths and acts on all examples at once (our design, not the paper's).

* ``input_dropout``: inverted dropout of input elements at rate p_i.
* ``input_noise``: multiply every input element by u ~ U[1/(1 + r_i), 1 + r_i] (the paper's
  "input scaling noise"; its range (0, 0.3) is the official CNN code's).
* ``shift`` and ``stretch`` for 1-D signals such as MNIST-1D (Greydanus & Kobak, arXiv 2011.14439):
  example i is resampled (linear interpolation, zeros outside) at positions
  c + (t − c)/a_i − o_i·L, with a random offset o_i ~ U(−shift_i, shift_i) (a fraction of the length
  L) and a random stretch a_i ~ U[1/(1 + stretch_i), 1 + stretch_i] about the centre c. These two are
  our augmentations for MNIST-1D, not the paper's (which tuned image colour jitter and cutout).

Strengths are detached: training never differentiates through the data path (the hypergradient flows
only through the best-response weights).
"""

from __future__ import annotations

import torch

DATA_HYPERPARAMETERS = ("shift", "stretch", "input_noise", "input_dropout")


def _column(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.detach().to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def input_dropout(x: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    pc = _column(p, x)
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= pc
    return x * keep / (1 - pc)


def input_noise(x: torch.Tensor, r: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Multiplicative noise U[1/(1 + r), 1 + r] per element, r per example."""
    rc = _column(r, x)
    lo, hi = 1 / (1 + rc), 1 + rc
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x * (lo + (hi - lo) * u)


def shift_stretch_1d(x: torch.Tensor, shift: torch.Tensor | None, stretch: torch.Tensor | None,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Random translation and time-stretch of 1-D signals along the last axis, per example.

    ``x``: [B, L] or [B, C, L]; ``shift``: [B] maximum offsets as a fraction of L; ``stretch``: [B]
    maximum stretch r (factor in [1/(1 + r), 1 + r]). Either may be None (not applied).
    """
    batch, length = x.shape[0], x.shape[-1]
    signal = x.reshape(batch, -1, length)
    dev, dt = x.device, x.dtype
    t = torch.arange(length, device=dev, dtype=dt).expand(batch, length)
    centre = (length - 1) / 2
    pos = t
    if stretch is not None:
        r = stretch.detach().to(dt).reshape(batch, 1)
        u = torch.rand(batch, 1, generator=generator, device=dev, dtype=dt)
        factor = 1 / (1 + r) + (1 + r - 1 / (1 + r)) * u
        pos = centre + (pos - centre) / factor
    if shift is not None:
        m = shift.detach().to(dt).reshape(batch, 1)
        offset = (2 * torch.rand(batch, 1, generator=generator, device=dev, dtype=dt) - 1) * m * length
        pos = pos - offset
    return resample_1d(signal, pos).reshape(x.shape)


def resample_1d(signal: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``signal`` [B, C, L] at fractional positions ``pos`` [B, L]; 0 outside."""
    length = signal.shape[-1]
    left = pos.floor()
    frac = (pos - left).unsqueeze(1)
    left = left.long()
    out = torch.zeros_like(signal)
    for idx, weight in ((left, 1 - frac), (left + 1, frac)):
        inside = ((idx >= 0) & (idx < length)).unsqueeze(1)
        gathered = signal.gather(-1, idx.clamp(0, length - 1).unsqueeze(1).expand_as(signal))
        out = out + torch.where(inside, gathered * weight, torch.zeros((), dtype=signal.dtype, device=signal.device))
    return out


def apply_data_path(x: torch.Tensor, values: dict[str, torch.Tensor],
                    generator: torch.Generator | None) -> torch.Tensor:
    """Augment, then add input noise, then drop input elements, each if its hyperparameter is tuned.

    ``values`` maps a name of :data:`DATA_HYPERPARAMETERS` to its [B] constrained strengths.
    """
    if "shift" in values or "stretch" in values:
        x = shift_stretch_1d(x, values.get("shift"), values.get("stretch"), generator)
    if "input_noise" in values:
        x = input_noise(x, values["input_noise"], generator)
    if "input_dropout" in values:
        x = input_dropout(x, values["input_dropout"], generator)
    return x
