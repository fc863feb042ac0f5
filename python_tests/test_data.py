"""Loaders read the official layouts of the sample data and fail clearly on bad files."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from helpers import SAMPLE_DATA
from gmvq_ext.data import (CELEBA_ALIGNED_CROP, Cifar10, DataError, ImageFolder, build_dataset,
                           read_partition_file, validation_indices)

DATA = SAMPLE_DATA
CIFAR = DATA / "cifar10-sample"
CELEBA = DATA / "celeba-sample"


def cifar_rows(name: str) -> int:
    with open(CIFAR / "cifar-10-batches-py" / name, "rb") as f:
        return len(pickle.load(f, encoding="bytes")[b"data"])


def test_cifar_row_counts_come_from_the_arrays():
    train_rows = sum(cifar_rows(f"data_batch_{i}") for i in range(1, 6))
    assert train_rows == 5169  # the sample's count, read above from the files themselves
    assert len(Cifar10(CIFAR, "train")) == train_rows
    assert len(Cifar10(CIFAR, "test")) == cifar_rows("test_batch")


def test_cifar_pixels_and_layout():
    data = Cifar10(CIFAR, "test")
    image = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    with open(CIFAR / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    # channel-major rows: the first 1024 values are the red plane
    expected = torch.from_numpy(raw.astype(np.float32)).view(3, 32, 32) / 127.5 - 1
    torch.testing.assert_close(image, expected)
    batch = data.__getitems__([0, 5, 7])
    torch.testing.assert_close(batch[1], data[5])


@pytest.mark.parametrize("root", [CIFAR, CIFAR / "cifar-10-batches-py"])
def test_cifar_data_dir_conventions(root):
    assert len(build_dataset("cifar10", root, "test")) == cifar_rows("test_batch")


def test_cifar_validation_split_is_deterministic_and_disjoint():
    train = Cifar10(CIFAR, "train", val_fraction=0.1)
    val = Cifar10(CIFAR, "val", val_fraction=0.1)
    assert len(train) + len(val) == 5169 and len(val) == round(5169 * 0.1)
    train_idx, val_idx = validation_indices(5169, 0.1)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    full = Cifar10(CIFAR, "train")
    torch.testing.assert_close(val.images, full.images[val_idx])
    assert torch.equal(validation_indices(5169, 0.1)[1], val_idx)


def test_max_images_and_unknown_dataset():
    assert len(build_dataset("cifar10", CIFAR, "train", max_images=10)) == 10
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mnist", CIFAR, "train")


def test_cifar_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Cifar10(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        Cifar10(tmp_path, "train")
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(CIFAR / "cifar-10-batches-py", folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x04 this is not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        Cifar10(tmp_path, "train")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*missing"):
        Cifar10(tmp_path, "train")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), dtype=np.uint8)}, f)
    with pytest.raises(DataError, match="test_batch.*3072"):
        Cifar10(tmp_path, "test")


def test_celeba_aligned_with_partition_file():
    data = build_dataset("celeba", CELEBA, "train")
    partition = read_partition_file(CELEBA / "list_eval_partition.txt")
    present = sorted(p.name for p in (CELEBA / "img_align_celeba").glob("*.jpg"))
    assert data.names == [name for name in present if partition[name] == 0]
    assert data.crop == CELEBA_ALIGNED_CROP
    image = data[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert -1 <= image.min() < image.max() <= 1
    # the image folder itself works too, and finds the partition file beside it
    assert build_dataset("celeba", CELEBA / "img_align_celeba", "train").names == data.names
    # the sample's 32 aligned faces are all in the official training partition
    with pytest.raises(DataError, match="no test images"):
        build_dataset("celeba", CELEBA, "test")


def test_partition_file_crlf_and_lf_agree(tmp_path):
    lf = tmp_path / "lf.txt"
    lf.write_bytes((CELEBA / "list_eval_partition.txt").read_bytes().replace(b"\r\n", b"\n"))
    crlf = read_partition_file(CELEBA / "list_eval_partition.txt")
    assert b"\r\n" in (CELEBA / "list_eval_partition.txt").read_bytes()[:100]
    assert read_partition_file(lf) == crlf and crlf["000001.jpg"] == 0 and crlf["202599.jpg"] == 2


def test_torchvision_layout(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    for name in ("000001.jpg", "000002.jpg"):
        shutil.copy(CELEBA / "img_align_celeba" / name, root / "img_align_celeba" / name)
    shutil.copy(CELEBA / "list_eval_partition.txt", root)
    assert build_dataset("celeba", tmp_path, "train").names == ["000001.jpg", "000002.jpg"]


def test_folder_of_crops_split_by_sorted_name():
    crops = CELEBA / "test_crops"
    names = sorted(p.name for p in crops.glob("*.jpg"))
    splits = {split: ImageFolder(crops, split) for split in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [int(len(names) * .8), int(len(names) * .1),
                                                                  len(names) - int(len(names) * .8) -
                                                                  int(len(names) * .1)]
    assert splits["train"].names + splits["val"].names + splits["test"].names == names
    assert splits["test"].crop is None  # largest central square for non-aligned crops
    image = splits["test"][3]
    assert image.shape == (3, 128, 128)


def test_center_crop_then_resize(tmp_path):
    from PIL import Image

    # A 178x218 picture whose central 140x140 square is white and the rest black.
    array = np.zeros((218, 178, 3), dtype=np.uint8)
    top, left = (218 - 140) // 2, (178 - 140) // 2
    array[top:top + 140, left:left + 140] = 255
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i in range(5):  # no partition file: 80/10/10 by name, so 4 train images
        Image.fromarray(array).save(folder / f"{i:06d}.png")
    data = ImageFolder(tmp_path, "train")
    assert len(data) == 4 and data.crop == CELEBA_ALIGNED_CROP
    image = data[0]
    assert image.shape == (3, 128, 128)
    assert image.min() > 0.95  # nothing outside the crop leaks in


def test_corrupt_image_is_named(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(10):
        shutil.copy(CELEBA / "img_align_celeba" / f"{i + 1:06d}.jpg", folder / f"{i:03d}.jpg")
    (folder / "009.jpg").write_bytes(b"not a jpeg at all")
    data = ImageFolder(folder, "test")
    assert data.names == ["009.jpg"]
    with pytest.raises(DataError, match="009.jpg"):
        data[0]
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "faces" / "..", "train")
