"""The pictures of a run: labelled reconstruction grids and training curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gmvq_ext.data import to_uint8
from gmvq_ext.training.visuals import (CURVES_DPI, CURVES_SIZE, read_curves, save_code_histogram,
                                       save_reconstruction_grid, save_training_curves)

PAD = 2  # the grid's gap between images


def open_png(path) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        picture.verify()
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


@pytest.mark.parametrize("n,size,columns", [(12, 32, 8), (3, 128, 8)])
def test_grid_rows_are_labelled_and_hold_the_images(tmp_path, n, size, columns):
    generator = torch.Generator().manual_seed(0)
    originals = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
    reconstructions = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
    path = tmp_path / "grid.png"
    save_reconstruction_grid(originals, reconstructions, path, columns=columns)
    canvas = open_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left

    columns = min(columns, n)
    rows = -(-n // columns)
    band = size + PAD
    assert canvas.shape[0] == 2 * rows * band + PAD
    margin = canvas.shape[1] - (columns * band + PAD)
    assert margin > 40  # room for the labels

    for i in range(n):
        row, col = divmod(i, columns)
        x = margin + PAD + col * band
        for offset, source in enumerate((originals, reconstructions)):
            y = PAD + (2 * row + offset) * band
            expected = to_uint8(source[i]).permute(1, 2, 0).numpy()
            assert np.array_equal(canvas[y:y + size, x:x + size], expected), (i, offset)

    labels = [canvas[PAD + b * band: PAD + b * band + size, :margin] for b in range(2 * rows)]
    for label in labels:
        assert (label.min(axis=2) < 100).sum() > 20  # dark text drawn in every row's margin
    assert not np.array_equal(labels[0], labels[1])  # "original" is not "reconstruction"
    if rows > 1:
        assert np.array_equal(labels[0], labels[2]) and np.array_equal(labels[1], labels[3])


def test_grid_refuses_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="as many reconstructions as originals"):
        save_reconstruction_grid(torch.zeros(4, 3, 8, 8), torch.zeros(3, 3, 8, 8), tmp_path / "g.png")
    assert not list(tmp_path.iterdir())


def write_metrics(path, epochs, split="test"):
    lines = [json.dumps({"epoch": e, "train/mse": 0.5 / e, f"{split}/mse": 0.4 / e, "train/perplexity": 10.0 * e,
                         f"{split}/perplexity": 9.0 * e, "lr": 0.001}) for e in epochs]
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("epochs,split", [([1], "test"), ([1, 2, 3], "val")])
def test_curves_are_a_png_of_the_expected_size(tmp_path, epochs, split):
    write_metrics(tmp_path / "metrics.jsonl", epochs, split)
    save_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    canvas = open_png(tmp_path / "curves.png")
    assert canvas.shape == (CURVES_SIZE[1] * CURVES_DPI, CURVES_SIZE[0] * CURVES_DPI, 3)
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert set(curves) == {"train/mse", f"{split}/mse", "train/perplexity", f"{split}/perplexity"}
    assert curves[f"{split}/perplexity"] == (epochs, [9.0 * e for e in epochs])


def test_curves_of_a_resumed_run_keep_one_value_per_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [1, 2, 3])
    with open(path, "a") as f:  # epochs 2 and 3 again, as a hand-resumed run would append them
        f.write(json.dumps({"epoch": 2, "train/mse": 0.1, "test/mse": 0.2}) + "\n\n")
        f.write(json.dumps({"epoch": 3, "train/mse": 0.05, "test/mse": 0.1}) + "\n")
    curves = read_curves(path)
    assert curves["train/mse"] == ([1, 2, 3], [0.5, 0.1, 0.05])
    assert curves["test/perplexity"] == ([1], [9.0])  # the replacing lines carry no perplexity
    save_training_curves(path, tmp_path / "curves.png")
    assert open_png(tmp_path / "curves.png").shape[:2] == (CURVES_SIZE[1] * CURVES_DPI, CURVES_SIZE[0] * CURVES_DPI)


def test_curves_name_an_unreadable_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl' holds no epochs"):
        read_curves(path)
    path.write_text('{"epoch": 1, "train/mse": 0.1}\n{"no epoch": true}\n')
    with pytest.raises(ValueError, match="metrics.jsonl' line 2 is not a metrics record"):
        save_training_curves(path, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_code_histogram_is_written_atomically(tmp_path):
    save_code_histogram(torch.tensor([5, 0, 3, 9]), tmp_path / "codes.png", "test code usage")
    assert open_png(tmp_path / "codes.png").shape[:2] == (300, 800)
    assert [p.name for p in tmp_path.iterdir()] == ["codes.png"]
