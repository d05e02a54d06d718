"""mmca: Multi-Modality Cross Attention for image-sentence matching (Wei et al., CVPR 2020).

    import mmca
    r = mmca.load("models/mmca-flickr8k")      # a model directory (`mmca export`) or a checkpoint
    hits = r.search("a dog runs on the beach", r.encode_images(["a.jpg", "b.jpg"]), k=5)

The API lives in `mmca.api` (docs/api.md); it is imported on first use, so `import mmca` and
the command line stay quick.
"""

from typing import TYPE_CHECKING

from mmca.config import ModelConfig, TrainConfig
from mmca.errors import MmcaError
from mmca.version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports them on use
    from mmca.api import Hit, ImageGallery, Retriever, TextGallery, load, open_index

_API = ("Hit", "ImageGallery", "Retriever", "TextGallery", "load", "open_index")


def __getattr__(name: str):
    if name in _API:
        from mmca import api
        return getattr(api, name)
    raise AttributeError(f"module 'mmca' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


__all__ = ["ModelConfig", "MmcaError", "TrainConfig", "__version__", *_API]
