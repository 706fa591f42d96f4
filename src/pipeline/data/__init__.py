"""Raw datasets, checksummed downloads and the training subsets built from them."""
from pipeline.data.fetch import KNOWN_FILES, ChecksumError, FetchError, fetch, verify
from pipeline.data.sources import SOURCES, CaptionedSource, load_captioned, load_source, register_source
from pipeline.data.subsets import Subset, build_subset, build_text_subset, read_subset, write_subset

__all__ = [
    "KNOWN_FILES",
    "SOURCES",
    "CaptionedSource",
    "ChecksumError",
    "FetchError",
    "Subset",
    "build_subset",
    "build_text_subset",
    "fetch",
    "load_captioned",
    "load_source",
    "read_subset",
    "register_source",
    "verify",
    "write_subset",
]
