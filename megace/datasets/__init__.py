"""Multimodal datasets replayed by simulated devices (numpy-only at import time; see README.md here)."""

from megace.datasets.dataset import ModalitySpec, MultimodalDataset, Sample
from megace.datasets.partition import DeviceData, EdgeData, default_modality_sets, label_skew, partition
from megace.datasets.registry import DATASETS, available, load_dataset, register
from megace.datasets.splits import split_across_devices, stratified_cap, train_test_split

__all__ = [
    "DATASETS",
    "DeviceData",
    "EdgeData",
    "ModalitySpec",
    "MultimodalDataset",
    "Sample",
    "available",
    "default_modality_sets",
    "label_skew",
    "load_dataset",
    "partition",
    "register",
    "split_across_devices",
    "stratified_cap",
    "train_test_split",
]
