"""Token-level distillation losses (pure functions).

``generalized_jsd`` follows the generalised Jensen-Shannon divergence of on-policy
distillation (GKD; the same definition as TRL's trainers): with
``M = beta * P_teacher + (1 - beta) * P_student``,

    JSD_beta = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)

and the two ends taken as the plain divergences: ``beta = 0`` is the forward KL
``KL(P_teacher || P_student)``, ``beta = 1`` the reverse KL ``KL(P_student || P_teacher)``.
Distributions are softmaxes at ``temperature``.

The loss returns the *sum* over unmasked target positions; divide by the number of
target tokens in the whole gradient-accumulation window (``num_items_in_batch`` in the HF
trainers), so the loss scale does not depend on how a global batch is split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    mask: torch.Tensor | None = None, *, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Sum over unmasked positions of the per-token generalised JSD.

    ``student_logits`` and ``teacher_logits``: ``(..., vocab)`` with the same shape (the
    two models must share a vocabulary). ``mask``: ``(...)``, true/1 where a position is a
    target token; None means every position counts.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: teacher and student must share "
                         f"a vocabulary for token-level distillation")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        per_token = _kl(log_t, log_s)
    elif beta == 1.0:
        per_token = _kl(log_s, log_t)
    else:
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta),
                                             log_s + math.log(1.0 - beta)]), dim=0)
        per_token = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum()


def shifted_target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose *next* token is a target (labels != -100), aligned with logits
    ``[:, :-1]``: the positions a causal LM is trained to predict from."""
    return labels[:, 1:] != -100
