"""Image datasets for jaxdpdm: sources, preprocessing and the `load_dataset` entry point.

    spec = DataSpec(name="fashion_mnist", image_size=28, channels=1)
    dataset = load_dataset(spec)   # images uint8 [N, 28, 28, 1], labels int32 [N]
    print(dataset.summary())

TensorFlow (for "tfds:<name>" datasets) is imported only when such a dataset is loaded; it comes
with the `tfds` extra (`pip install 'jaxdpdm[tfds]'`). The pixel-range conversions for models
are `jaxdpdm.images.to_model_range` / `from_model_range`.
"""

from jaxdpdm.data.dataset import KNOWN_DATASETS, DataSpec, ImageDataset
from jaxdpdm.data.preprocessing import (convert_channels, filter_classes, public_private_indices,
                                        resize_images, split_public_private)
from jaxdpdm.data.sources import load_dataset

__all__ = [
    "KNOWN_DATASETS",
    "DataSpec",
    "ImageDataset",
    "load_dataset",
    "filter_classes",
    "split_public_private",
    "convert_channels",
    "resize_images",
    "public_private_indices",
]
