"""Frozen features (docs/data.md): the ImageNet CNN grid backbones, the BERT-family text encoder, and
the on-disk cache that computes both once per dataset split, and the typed options that name
them (`FeatureOptions`, resolved from a `FeatureRequest` against a model's feature spec)."""

from mmca.features.backbone import ImageBackbone
from mmca.features.cache import default_cache_dir
from mmca.features.options import FeatureOptions, FeatureRequest, extraction_options
from mmca.features.prepare import EntryReport, PreparedSplit, open_dataset, prepare_split
from mmca.features.text_encoder import TextEncoder

__all__ = [
    "EntryReport",
    "FeatureOptions",
    "FeatureRequest",
    "ImageBackbone",
    "PreparedSplit",
    "TextEncoder",
    "default_cache_dir",
    "extraction_options",
    "open_dataset",
    "prepare_split",
]
