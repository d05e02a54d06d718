"""The scoring engine (docs/engine.md): per-item precomputation, batched pair scoring streamed in
fixed-shape blocks, exact pruned ranks and top-K, shortlist re-ranking, and mine-then-recompute
training loss."""

from mmca.engine.bank import ImageBank, TextBank
from mmca.engine.mining import exhaustive_loss, exhaustive_scores, mined_loss
from mmca.engine.ranking import RankResult
from mmca.engine.scoring import ScoringEngine

__all__ = [
    "ImageBank",
    "RankResult",
    "ScoringEngine",
    "TextBank",
    "exhaustive_loss",
    "exhaustive_scores",
    "mined_loss",
]
