"""The MMCA network and its plain reference path."""

from mmca.model.mmca import MMCA
from mmca.model.reference import reference_score
from mmca.model.text_head import TextCNNHead
from mmca.model.transformer import TransformerUnit

__all__ = ["MMCA", "TextCNNHead", "TransformerUnit", "reference_score"]
