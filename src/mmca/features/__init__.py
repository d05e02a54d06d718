"""Frozen features (docs/data.md): the MobileNetV2 grid backbone, the BERT-family text encoder, and
the on-disk cache that computes both once per dataset split."""

from mmca.features.backbone import ImageBackbone
from mmca.features.cache import default_cache_dir
from mmca.features.prepare import EntryReport, PreparedSplit, open_dataset, prepare_split
from mmca.features.text_encoder import TextEncoder

__all__ = [
    "EntryReport",
    "ImageBackbone",
    "PreparedSplit",
    "TextEncoder",
    "default_cache_dir",
    "open_dataset",
    "prepare_split",
]
