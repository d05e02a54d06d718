"""Bidirectional hinge triplet losses over a score matrix (Eq. 15 and its VSE warm-up)."""

from __future__ import annotations

import torch


def _violations(scores: torch.Tensor, margin: float, same_image: torch.Tensor | None):
    """Hinge terms of every negative in both directions, zero on the positives.

    scores[i, j] = S(image of pair i, caption of pair j); the diagonal holds the positives.
    `same_image[i, j]` marks pairs that share an image (two captions of one photo in a batch):
    they are not negatives, so they never count as violations.
    """
    positive = scores.diagonal()
    not_negative = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    if same_image is not None:
        not_negative = not_negative | same_image
    to_caption = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(not_negative, 0)
    to_image = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(not_negative, 0)
    return to_caption, to_image


def max_violation_loss(scores: torch.Tensor, margin: float = 0.2,
                       same_image: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 15: the hardest negative caption of each image plus the hardest negative image of
    each caption, summed over the batch (VSE++ "max violation")."""
    to_caption, to_image = _violations(scores, margin, same_image)
    return to_caption.amax(dim=1).sum() + to_image.amax(dim=0).sum()


def sum_violation_loss(scores: torch.Tensor, margin: float = 0.2,
                       same_image: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over all negatives (VSE0): a gentler start before hardest negatives take over."""
    to_caption, to_image = _violations(scores, margin, same_image)
    return to_caption.sum() + to_image.sum()
