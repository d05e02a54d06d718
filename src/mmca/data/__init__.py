"""Data layer: the two on-disk layouts (docs/data.md) and the in-memory dataset types."""

from mmca.data.dataset import RetrievalDataset, SplitSource, TokenFeatures
from mmca.data.layouts import detect_layout, list_splits, read_split

__all__ = ["RetrievalDataset", "SplitSource", "TokenFeatures", "detect_layout", "list_splits", "read_split"]
