"""Data for MARS: datasets, splits and standardisation, missing-modality
protocols, the embedded mfeat data, a synthetic classification set with a
known missing-pattern structure, a synthetic segmentation set and
feature-directory loaders."""
from .dataset import MultimodalDataset, concat_datasets
from .errors import DataFormatError
from .feature_files import load_feature_dir, read_feature_dir, read_meta, write_feature_dir
from .mfeat import MFEAT_VIEWS, load_mfeat, read_mfeat
from .missingness import (
    PROTOCOL_NAMES,
    MissingnessProtocol,
    all_subsets,
    parse_protocol,
    subset_masks,
    subset_name,
)
from .sources import BUILTIN_SOURCES, data_fingerprint, load_data, resolve_source
from .splits import (
    DEFAULT_FRACTIONS,
    Standardizer,
    split_dataset,
    split_sizes,
    standardize_splits,
    stratified_split,
    stratify_keys,
)
from .synthetic import generate_segmentation, make_segmentation
from .synthetic_missing import generate_missing, make_missing, missing_shift

__all__ = [
    "BUILTIN_SOURCES", "DEFAULT_FRACTIONS", "MFEAT_VIEWS", "PROTOCOL_NAMES",
    "DataFormatError", "MissingnessProtocol", "MultimodalDataset", "Standardizer",
    "all_subsets", "concat_datasets", "data_fingerprint", "resolve_source", "generate_missing", "generate_segmentation", "load_data", "load_feature_dir",
    "load_mfeat", "make_missing", "make_segmentation", "missing_shift", "parse_protocol", "read_feature_dir", "read_meta",
    "read_mfeat", "split_dataset", "split_sizes", "standardize_splits", "stratified_split",
    "stratify_keys", "subset_masks", "subset_name", "write_feature_dir",
]
