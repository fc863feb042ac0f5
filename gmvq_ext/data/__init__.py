"""The data sets, one module each, in their official on-disk layouts.

    common.py    split names, DataError, pixel conversions, decoding one image
    cifar10.py   CIFAR-10 (cifar-10-batches-py/), preloaded
    celeba.py    CelebA (img_align_celeba/) and folders of face crops, decoded lazily
    folder.py    any folder of JPEG, PNG or WebP images, subfolders included: hash split, file check
    build.py     build_dataset (one split of CIFAR-10 or CelebA), DataSource (a run's data flags)

Every data set returns float32 images (3, H, W) with pixels in [-1, 1].
"""

from .build import DATASETS, IMAGE_SIZE, DataSource, build_dataset, first_images
from .celeba import (CELEBA_ALIGNED_CROP, CELEBA_FOLDER, CELEBA_PARTITION_FILE, IMAGE_SUFFIXES, ImageFolder,
                     find_celeba_folder, list_images, read_partition_file, split_by_sorted_name)
from .cifar10 import (CIFAR_FOLDER, CIFAR_TEST_FILES, CIFAR_TRAIN_FILES, VALIDATION_SPLIT_SEED, Cifar10,
                      find_cifar10_folder, read_cifar10_batch, validation_indices)
from .folder import (FOLDER_SUFFIXES, BadImage, FolderImages, FolderIndex, check_images, hash_split,
                     list_folder_images, read_split_file)
from .common import SPLITS, DataError, collate_images, load_image, read_image, to_signed_unit, to_uint8

__all__ = [
    "DATASETS", "IMAGE_SIZE", "DataSource", "build_dataset", "first_images",
    "FOLDER_SUFFIXES", "BadImage", "FolderImages", "FolderIndex", "check_images", "hash_split",
    "list_folder_images", "read_split_file",
    "CELEBA_ALIGNED_CROP", "CELEBA_FOLDER", "CELEBA_PARTITION_FILE", "IMAGE_SUFFIXES", "ImageFolder",
    "find_celeba_folder", "list_images", "read_partition_file", "split_by_sorted_name",
    "CIFAR_FOLDER", "CIFAR_TEST_FILES", "CIFAR_TRAIN_FILES", "VALIDATION_SPLIT_SEED", "Cifar10",
    "find_cifar10_folder", "read_cifar10_batch", "validation_indices",
    "SPLITS", "DataError", "collate_images", "load_image", "read_image", "to_signed_unit", "to_uint8",
]
