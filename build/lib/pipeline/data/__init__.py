"""Datasets as manifests: label loaders, image checks, the synthetic demo set."""

from pipeline.data.demo import generate_demo
from pipeline.data.images import check_images, load_rgb
from pipeline.data.labels import DATASET_GUIDES, load_labels
from pipeline.data.manifest import MANIFEST_COLUMNS, ManifestError, manifest_hash, validate_manifest

__all__ = [
    "DATASET_GUIDES",
    "MANIFEST_COLUMNS",
    "ManifestError",
    "check_images",
    "generate_demo",
    "load_labels",
    "load_rgb",
    "manifest_hash",
    "validate_manifest",
]
