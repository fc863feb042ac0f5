"""--dataset folder: nested listing, the hash split and its override, the file
check (error or skip), image sizes and downsampling (train: test_folder_train.py)."""

from __future__ import annotations

import collections
import shutil

import pytest
import torch

from gmvq_ext.data import (DataError, DataSource, FolderImages, FolderIndex, hash_split, list_folder_images,
                           read_image)
from gmvq_ext.models import DOWNSAMPLING_CHOICES, build_autoencoder, image_size_problem
from gmvq_ext.quantizers import build_quantizer
from gmvq_ext.training.config import parse_args
from image_folders import BROKEN, CROPS, make_photo_folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


def test_listing_is_recursive_sorted_and_ignores_other_files(photos):
    names = list_folder_images(photos)
    assert names == sorted(names) and len(names) == 64 + 32 + 1  # crops, aligned faces, the broken file
    assert {name.rsplit(".", 1)[1] for name in names} == {"jpg", "png", "webp", "JPG"}
    assert "people/2019/indoor/182643.jpg" in names and BROKEN in names  # relative, "/"-separated
    assert not [n for n in names if n.endswith(".txt") or "/." in n or n.startswith(".")]


def test_hash_split_is_pinned_and_80_10_10():
    # Pinned: a folder's split must never change across versions or machines.
    assert [hash_split(n) for n in ("a/b.jpg", "img_00002.jpg", "img_00012.jpg")] == ["train", "test", "val"]
    counts = collections.Counter(hash_split(f"img_{i:05d}.jpg") for i in range(10000))
    assert counts == {"train": 8027, "val": 1022, "test": 951}


def test_adding_files_moves_no_file_between_splits(tmp_path):
    folder = tmp_path / "grow"
    folder.mkdir()
    for source in sorted(CROPS.glob("*.jpg"))[:40]:
        shutil.copy(source, folder / source.name)
    before = FolderIndex(folder).split_of
    for source in sorted(CROPS.glob("*.jpg"))[40:80]:
        (folder / "new").mkdir(exist_ok=True)
        shutil.copy(source, folder / "new" / source.name)
    after = FolderIndex(folder).split_of
    assert len(after) == 80 and {name: after[name] for name in before} == before


def test_split_file_overrides_the_hash(photos, tmp_path):
    split_file = tmp_path / "splits.txt"
    split_file.write_text("# my own split\npeople/2019/indoor/182643.jpg test\n\n"
                          "aligned/000001.JPG   train  # a comment\naligned/000002.JPG val\n")
    index = FolderIndex(photos, split_file)
    assert index.names("test") == ["people/2019/indoor/182643.jpg"]
    assert index.names("train") == ["aligned/000001.JPG"] and index.names("val") == ["aligned/000002.JPG"]
    assert index.unlisted == 97 - 3


@pytest.mark.parametrize("text,message", [
    ("aligned/000001.JPG training\n", r"splits.txt' line 1 is 'aligned/000001.JPG training'; expected"),
    ("aligned/000001.JPG train\nnowhere/x.jpg test\n", r"splits.txt' names 1 image\(s\) not under .*'nowhere/x.jpg'"),
])
def test_bad_split_file_is_one_line_naming_it(photos, tmp_path, text, message):
    (tmp_path / "splits.txt").write_text(text)
    with pytest.raises(DataError, match=message) as raised:
        FolderIndex(photos, tmp_path / "splits.txt")
    assert "\n" not in str(raised.value)


def test_check_names_the_broken_file_in_one_line(photos):
    with pytest.raises(DataError) as raised:
        FolderIndex(photos).check(("train", "val", "test"), skip_bad=False, progress=False)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"unreadable image {str(photos / BROKEN)!r}: ")
    assert "1 of 97 files failed the check" in message and "--skip-bad-images" in message


def test_check_finds_truncated_and_mislabelled_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "bad"
    folder.mkdir()
    good = sorted(CROPS.glob("*.jpg"))[:3]
    jpeg = good[0].read_bytes()
    (folder / "a_truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # a valid header, half the data
    with Image.open(good[1]) as image:
        image.save(folder / "b_whole.png")
        image.save(folder / "c_gif.png", format="GIF")  # a GIF named .png
    png = (folder / "b_whole.png").read_bytes()
    (folder / "d_truncated.png").write_bytes(png[:len(png) // 2])
    (folder / "e_empty.webp").write_bytes(b"")
    shutil.copy(good[2], folder / "f_good.jpg")
    index = FolderIndex(folder, None)
    index.split_of = {name: "train" for name in index.split_of}  # every file in one split
    bad = index.check(("train",), skip_bad=True, progress=False)
    reasons = {b.path: b.reason for b in bad}
    assert sorted(reasons) == ["a_truncated.jpg", "c_gif.png", "d_truncated.png", "e_empty.webp"]
    assert "truncated" in reasons["a_truncated.jpg"] and "GIF" in reasons["c_gif.png"]
    assert str(folder) not in "".join(reasons.values())  # the path is named apart, once
    assert index.names("train") == ["b_whole.png", "f_good.jpg"]  # skipped files are left out


def test_skip_mode_leaves_out_and_reports(photos):
    source = DataSource("folder", str(photos), image_size=32, skip_bad_images=True)
    datasets, skipped = source.open(("train", "val", "test"), progress=False)
    assert [b.path for b in skipped] == [BROKEN]
    assert sum(len(d) for d in datasets.values()) == 96
    assert all(BROKEN not in d.names for d in datasets.values())
    # another rank applies rank 0's verdict without checking again
    again, _ = source.open(("train",), known_bad=skipped)
    assert again["train"].names == datasets["train"].names


def test_images_are_center_cropped_and_resized(photos):
    index = FolderIndex(photos)
    index.drop([b for b in index.check(("test",), skip_bad=True, progress=False)])
    data = FolderImages(index, "test", 48)
    image = data[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and -1 <= image.min() < image.max() <= 1
    expected = read_image(photos / data.names[0], 48).float() / 127.5 - 1
    torch.testing.assert_close(image, expected)


def test_empty_or_missing_folder_is_one_line(tmp_path):
    with pytest.raises(DataError, match="image folder .* does not exist"):
        FolderIndex(tmp_path / "nowhere")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images under .*docs'"):
        FolderIndex(tmp_path / "docs")


@pytest.mark.parametrize("argv,message", [
    ([], "--dataset folder needs --image-size S"),
    (["--image-size", "100", "--downsampling", "8"],
     "--image-size 100 does not fit --downsampling 8: the image size must be a multiple of 8 from 16 to 1024 "
     "(e.g. 16, 32, 64)"),
    (["--image-size", "16", "--downsampling", "16"], "must be a multiple of 16 from 32 to 1024"),
    (["--image-size", "2048"], "must be a multiple of 4 from 16 to 1024"),
    (["--image-size", "64", "--download"], "--download applies to cifar10 and celeba"),
])
def test_sizes_the_network_cannot_handle_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "folder", "--data-dir", "x", "--out", "y", *argv])
    assert message in capsys.readouterr().err


def test_folder_flags_are_refused_elsewhere(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "cifar10", "--out", "y", "--skip-bad-images"])
    assert "--skip-bad-images applies to --dataset folder only" in capsys.readouterr().err


@pytest.mark.parametrize("downsampling", DOWNSAMPLING_CHOICES)
def test_latent_grid_is_image_size_over_downsampling(downsampling):
    size = 64
    assert image_size_problem(size, downsampling) is None
    model = build_autoencoder("folder", build_quantizer("vqvae", codebook_size=8, dim=4), downsampling).eval()
    with torch.no_grad():
        reconstruction, indices, _, _ = model(torch.zeros(2, 3, size, size))
    assert indices.shape == (2, size // downsampling, size // downsampling) and reconstruction.shape == (2, 3, 64, 64)


def test_downsampling_4_keeps_the_papers_networks():
    cifar = build_autoencoder("cifar10", build_quantizer("vqvae", codebook_size=8, dim=4))
    deeper = build_autoencoder("cifar10", build_quantizer("vqvae", codebook_size=8, dim=4), 8)
    assert len(deeper.encoder) == len(cifar.encoder) + 3 and len(deeper.decoder) == len(cifar.decoder) + 3
    assert "encoder.3.weight" in cifar.state_dict() and cifar.state_dict()["encoder.3.weight"].shape == (64, 32, 4, 4)
