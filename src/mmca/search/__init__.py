"""Search a gallery: a persistent index (SQLite + memory-mapped tensors), exact queries by
sentence or by image through the engine, and a small web server with its static page."""

from mmca.engine.heatmap import cross_token_region_attention
from mmca.search.build import add_to_index, build_from_dataset, build_from_folder
from mmca.search.index import GalleryIndex
from mmca.search.query import QueryError, Searcher, decode_image

__all__ = [
    "GalleryIndex",
    "QueryError",
    "Searcher",
    "add_to_index",
    "build_from_dataset",
    "build_from_folder",
    "cross_token_region_attention",
    "decode_image",
]
