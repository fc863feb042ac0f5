"""--download against a local HTTP server on 127.0.0.1 serving a tarball of the
CIFAR-10 sample: success, wrong checksum, network errors, bad archives; each
failure leaves nothing half-written. Nothing here reaches the internet."""

from __future__ import annotations

import filecmp
import functools
import hashlib
import http.server
import io
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from gmvq_ext import train
from gmvq_ext.data import build_dataset
from gmvq_ext.download import CIFAR10_MD5_ENV, CIFAR10_URL_ENV, DownloadError, celeba_instructions, ensure_cifar10
from helpers import SAMPLE_DATA

from training_runs import SMALL

# One intra-op thread for every test (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE_BATCHES = SAMPLE_DATA / "cifar10-sample" / "cifar-10-batches-py"


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Any download a test does not point elsewhere goes to a closed local port, never the official host."""
    monkeypatch.setenv(CIFAR10_URL_ENV, f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz")
    monkeypatch.delenv(CIFAR10_MD5_ENV, raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def make_tarball(path: Path, members: dict[str, bytes | Path] | None = None) -> str:
    """A .tar.gz of the sample as cifar-10-batches-py/ (or of ``members``: file contents, or
    a Path for a symbolic link to it); its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        if members is None:
            tar.add(SAMPLE_BATCHES, arcname="cifar-10-batches-py")
        else:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                if isinstance(data, Path):  # a symbolic link to it
                    info.type, info.linkname = tarfile.SYMTYPE, str(data)
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) of a stdlib HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=served))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_then_train(tmp_path, server, monkeypatch):
    served, base = server
    md5 = make_tarball(served / "cifar.tar.gz")
    monkeypatch.setenv(CIFAR10_URL_ENV, f"{base}/cifar.tar.gz")
    monkeypatch.setenv(CIFAR10_MD5_ENV, md5)
    data = tmp_path / "fresh" / "data"  # neither folder exists yet
    argv = [a if a != str(SAMPLE_DATA / "cifar10-sample") else str(data) for a in SMALL]
    results = train.main([*argv, "--download", "--epochs", "1", "--out", str(tmp_path / "run")])

    assert results["train_images"] == 96 and results["test_images"] == 64
    assert [p.name for p in data.iterdir()] == ["cifar-10-batches-py"]  # no archive or temporary folder left
    comparison = filecmp.dircmp(data / "cifar-10-batches-py", SAMPLE_BATCHES)
    assert not comparison.left_only and not comparison.right_only and not comparison.diff_files
    assert len(build_dataset("cifar10", data, "test")) == 1017


def test_a_present_folder_is_used_as_is_even_when_partial(tmp_path):
    # the sample's batches are partial (fewer than 10000 rows, other checksums); the URL is a closed port
    assert ensure_cifar10(SAMPLE_DATA / "cifar10-sample") == SAMPLE_BATCHES
    assert ensure_cifar10(SAMPLE_BATCHES) == SAMPLE_BATCHES
    partial = tmp_path / "cifar-10-batches-py"
    partial.mkdir()
    shutil.copy(SAMPLE_BATCHES / "test_batch", partial)  # only the test split present
    assert ensure_cifar10(tmp_path) == partial


def test_wrong_checksum_keeps_nothing(tmp_path, server):
    served, base = server
    md5 = make_tarball(served / "cifar.tar.gz")
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("the user's own file")
    wrong = "0" * 32
    with pytest.raises(DownloadError) as raised:
        ensure_cifar10(data, url=f"{base}/cifar.tar.gz", md5=wrong, progress=False)
    message = str(raised.value)
    assert f"has MD5 {md5}, expected {wrong}" in message and "\n" not in message
    assert [p.name for p in data.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("where", ["404", "closed port"])
def test_network_errors_keep_nothing(tmp_path, server, where):
    _, base = server
    url = f"{base}/missing.tar.gz" if where == "404" else f"http://127.0.0.1:{closed_port()}/cifar.tar.gz"
    data = tmp_path / "new" / "data"
    with pytest.raises(DownloadError, match=f"cannot download CIFAR-10 from {url}: ") as raised:
        ensure_cifar10(data, url=url, progress=False)
    assert "\n" not in str(raised.value)
    assert ("HTTP 404" in str(raised.value)) == (where == "404")
    assert not (tmp_path / "new").exists()  # the folders this call created are gone again
    assert [p.name for p in tmp_path.iterdir()] == ["served"]


def test_the_cli_reports_a_download_failure_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    argv = [a if a != str(SAMPLE_DATA / "cifar10-sample") else str(data) for a in SMALL]
    with pytest.raises(SystemExit) as raised:
        train.main([*argv, "--download", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert str(raised.value).startswith("gmvq-train: error: cannot download CIFAR-10 from http://127.0.0.1:")
    assert not data.exists()


@pytest.mark.parametrize("members,message", [
    ({"cifar-10-batches-py/../../escaped.txt": b"x"}, "cannot extract"),
    ({"cifar-10-batches-py/data_batch_1": Path("/etc/passwd")}, "cannot extract"),
    ({"/tmp/absolute-escape.txt": b"x"}, "holds no cifar-10-batches-py/ folder"),  # the filter strips the /
    ({"something-else/readme.txt": b"x"}, "holds no cifar-10-batches-py/ folder"),
])
def test_archives_that_escape_or_lack_the_folder_keep_nothing(tmp_path, server, members, message):
    served, base = server
    md5 = make_tarball(served / "bad.tar.gz", members)
    data = tmp_path / "data"
    with pytest.raises(DownloadError, match=message):
        ensure_cifar10(data, url=f"{base}/bad.tar.gz", md5=md5, progress=False)
    assert not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]
    assert not Path("/tmp/absolute-escape.txt").exists()


def test_an_existing_empty_batches_folder_is_never_overwritten(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DownloadError, match="exists but holds no CIFAR-10 batch files"):
        ensure_cifar10(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-batches-py"]


def test_celeba_download_explains_how_to_get_it(tmp_path):
    argv = ["--dataset", "celeba", "--data-dir", str(tmp_path / "data"), "--download", "--epochs", "1",
            "--device", "cpu", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as raised:
        train.main(argv)
    message = str(raised.value)
    assert message.startswith("gmvq-train: error: --download: CelebA cannot be downloaded automatically")
    for needed in ("https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html", "img_align_celeba.zip",
                   "list_eval_partition.txt", f"{tmp_path / 'data'}/img_align_celeba/000001.jpg"):
        assert needed in message
    assert not (tmp_path / "data").exists()
    assert "./data/img_align_celeba/" in celeba_instructions()


def test_celeba_download_is_a_no_op_when_celeba_is_in_place(tmp_path):
    from gmvq_ext.download import ensure_dataset

    ensure_dataset("celeba", SAMPLE_DATA / "celeba-sample")  # aligned faces and the partition file present
    assert build_dataset("celeba", SAMPLE_DATA / "celeba-sample", "train")[0].shape == (3, 128, 128)


def test_data_dir_defaults_to_dot_data_and_download_is_off():
    from gmvq_ext.training.config import parse_args

    args = parse_args(["--dataset", "cifar10", "--out", "x"])
    assert args.data_dir == "./data" and args.download is False
