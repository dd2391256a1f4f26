r"""Cox partial likelihood as a loss on tensors (risk: log hazard, higher = worse).

Notation: patient :math:`i` has risk :math:`\eta_i`, follow-up time :math:`T_i` (months),
event indicator :math:`\delta_i` and case weight :math:`w_i` (1 unless given). The distinct
event times are :math:`t_1 < \dots < t_J`; at :math:`t_j`, :math:`D_j = \{i: T_i = t_j,
\delta_i = 1\}` holds the :math:`d_j` events and :math:`R_j = \{k: T_k \ge t_j\}` the risk
set. A patient censored *at* :math:`t_j` is in :math:`R_j` (events are ordered before
censorings at equal times, as in R ``survival``).

Breslow:

.. math::

    \log L = \sum_j \Big[ \sum_{i \in D_j} w_i \eta_i
              - \Big(\sum_{i \in D_j} w_i\Big) \log \sum_{k \in R_j} w_k e^{\eta_k} \Big]

Efron, with :math:`S_j = \sum_{k \in R_j} w_k e^{\eta_k}`,
:math:`E_j = \sum_{i \in D_j} w_i e^{\eta_i}` and the mean event weight
:math:`\bar w_j = \frac{1}{d_j} \sum_{i \in D_j} w_i` (R ``coxph``'s weighting):

.. math::

    \log L = \sum_j \Big[ \sum_{i \in D_j} w_i \eta_i
              - \bar w_j \sum_{l=0}^{d_j - 1} \log\Big(S_j - \frac{l}{d_j} E_j\Big) \Big]

Both reduce to the same value when no two events share a time.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Ties = Literal["efron", "breslow"]
Reduction = Literal["mean", "sum"]


def cox_partial_log_likelihood(
    risk: Tensor,
    time: Tensor,
    event: Tensor,
    *,
    ties: Ties = "efron",
    reduction: Reduction = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Negative Cox log partial likelihood: a loss to minimise.

    Parameters
    ----------
    risk
        (B,) float32 or float64, log hazard (higher = worse). Gradients flow through it.
    time
        (B,) follow-up time in months (any real dtype); only its order matters.
    event
        (B,) bool (or 0/1): True = the event was observed at ``time``, False = censored.
    ties
        ``"efron"`` (R ``coxph``'s default) or ``"breslow"``; see the module docstring.
    reduction
        ``"sum"``: :math:`-\log L`. ``"mean"``: :math:`-\log L` divided by the (weighted)
        number of events, :math:`\sum_i w_i \delta_i`, so the scale does not depend on the
        batch's event count.
    weight
        (B,) positive case weights, or None for all 1.

    Returns
    -------
    Tensor
        0-d tensor, same dtype and device as ``risk``. With no event in the batch the partial
        likelihood is empty: the loss is exactly 0 and so is its gradient (it stays attached
        to ``risk``, so ``backward()`` works).

    Notes
    -----
    The risk-set sums :math:`\log S_j` come from one reverse ``logcumsumexp`` over the
    time-sorted risks, read at the first patient of each time, so they include everyone tied
    at that time whatever the input order, and risks of ±50 or more neither overflow nor
    lose the smaller terms. The Efron terms are :math:`\log S_j + \log1p(-\frac{l}{d_j}
    E_j / S_j)` with :math:`E_j / S_j \le 1` formed from :math:`e^{\eta_i - \log S_j}
    \le 1`. No Python loop over patients: O(B log B) for the sort, O(B) otherwise.
    """
    risk, time, event, weight = _validated(risk, time, event, weight, ties, reduction)
    if not bool(event.any()):
        return risk.sum() * 0.0
    events = event.to(risk.dtype)
    n_events = (weight * events).sum()

    order = torch.argsort(time, stable=True)
    risk, time, events, weight = risk[order], time[order], events[order], weight[order]
    log_weight = torch.log(weight)
    # log S for the risk set that starts at each sorted position
    tail = torch.logcumsumexp((risk + log_weight).flip(0), dim=0).flip(0)
    _, group, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    log_risk_set = tail[first][group]  # (B,) log S_j of the patient's own time

    numerator = (weight * events * risk).sum()
    if ties == "breslow":
        denominator = (weight * events * log_risk_set).sum()
    else:
        n_groups = counts.shape[0]
        zeros = risk.new_zeros(n_groups)
        d = zeros.index_add(0, group, events)
        event_weight = zeros.index_add(0, group, weight * events)
        share = zeros.index_add(0, group, events * torch.exp(risk + log_weight - log_risk_set))
        # rank l = 0..d_j-1 of each event among the events at its time (any order: the sum
        # over l does not care which event gets which rank)
        before = torch.cumsum(events, 0) - events
        # zero for censorings: their term is dropped, and must stay finite for the gradient
        rank = (before - before[first][group]) * events
        safe_d = torch.clamp(d, min=1.0)[group]
        term = log_risk_set + torch.log1p(-(rank / safe_d) * share[group])
        mean_weight = (event_weight / torch.clamp(d, min=1.0))[group]
        denominator = (events * mean_weight * term).sum()
    loss = denominator - numerator
    return loss / n_events if reduction == "mean" else loss


def _validated(
    risk: Tensor, time: Tensor, event: Tensor, weight: Tensor | None, ties: str, reduction: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if risk.ndim != 1 or not risk.is_floating_point():
        raise ValueError(f"risk must be a 1-D float tensor (B,), got {risk.dtype} "
                         f"{tuple(risk.shape)}")
    n = risk.shape[0]
    for name, value in (("time", time), ("event", event), ("weight", weight)):
        if value is not None and tuple(value.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) like risk, got {tuple(value.shape)}")
    if not bool(torch.isfinite(risk).all()):
        raise ValueError("risk has NaN or infinite values")
    time = time.to(device=risk.device)
    if not bool(torch.isfinite(time).all()):
        raise ValueError("time has NaN or infinite values")
    if event.dtype != torch.bool:
        if bool(((event != 0) & (event != 1)).any()):
            raise ValueError("event must be bool or 0/1")
        event = event != 0
    event = event.to(device=risk.device)
    if weight is None:
        weight = torch.ones_like(risk)
    else:
        weight = weight.to(device=risk.device, dtype=risk.dtype)
        if not bool((torch.isfinite(weight) & (weight > 0)).all()):
            raise ValueError("weight must be finite and > 0")
    return risk, time, event, weight
