"""Data layer: the two on-disk layouts (docs/data.md), the in-memory dataset types and the feature spec
they carry."""

from mmca.data.dataset import RetrievalDataset, SplitSource, TokenFeatures
from mmca.data.layouts import detect_layout, list_splits, read_split
from mmca.data.spec import FeatureSpec

__all__ = ["FeatureSpec", "RetrievalDataset", "SplitSource", "TokenFeatures", "detect_layout", "list_splits",
           "read_split"]
