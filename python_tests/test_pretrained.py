"""Exported tokenizers: model.safetensors + config.json, the round trip, the
one-line errors of a tampered or mismatched folder, gmvq-export, and the
Hugging Face Hub mixin on local folders (no test touches a network)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gmvq_ext
from gmvq_ext import pretrained
from gmvq_ext.cli.export import main as export_main
from gmvq_ext.pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedError, TokenizerNetwork, network_config

CONFIG = network_config(image_size=32, downsampling=8, residual_blocks=2, quantizer="gmvq", codebook_size=16, dim=8,
                        quantizer_options={"seed": 5, "weight": "scalar"}, trained_on={"dataset": "folder"})


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    """A tokenizer whose weights and buffers are not the initial ones (a few training-mode forwards)."""
    torch.manual_seed(1)
    network = TokenizerNetwork(CONFIG)
    network.train()
    with torch.no_grad():
        for _ in range(3):
            network(torch.rand(8, 3, 32, 32) * 2 - 1)
    return gmvq_ext.Tokenizer(network, 32, config=CONFIG)


@pytest.fixture
def exported(tokenizer, tmp_path):
    return tokenizer.save_pretrained(tmp_path / "exported")


def test_round_trip_reproduces_encode_and_decode(tokenizer, exported):
    assert sorted(p.name for p in exported.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = gmvq_ext.Tokenizer.from_pretrained(exported, device="cpu")
    assert loaded.code_shape == (4, 4) and loaded.image_shape == (3, 32, 32) and loaded.codebook_size == 16
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    codes = tokenizer.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))
    for name, tensor in tokenizer.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_the_files_are_plain_safetensors_and_json(tokenizer, exported):
    header_length = int.from_bytes((exported / WEIGHTS_NAME).read_bytes()[:8], "little")
    header = json.loads((exported / WEIGHTS_NAME).read_bytes()[8:8 + header_length])
    assert header["__metadata__"] == {"format": "gmvq_ext.tokenizer", "format_version": "1"}
    weights = load_file(exported / WEIGHTS_NAME)
    assert weights.keys() == tokenizer.model.state_dict().keys()
    assert not [name for name in weights if "optimizer" in name or "exp_avg" in name]
    config = json.loads((exported / CONFIG_NAME).read_text())
    assert config == {**CONFIG, "gmvq_ext_version": gmvq_ext.__version__}
    assert config["format_version"] == 1


def rewrite_config(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def rewrite_weights(folder, change):
    weights = load_file(folder / WEIGHTS_NAME)
    change(weights)
    save_file(weights, folder / WEIGHTS_NAME)


TAMPERINGS = {
    "newer version": (lambda f: rewrite_config(f, format_version=2),
                      CONFIG_NAME, "format version 2 is newer than this gmvq_ext reads (up to 1); upgrade gmvq_ext"),
    "not JSON": (lambda f: (f / CONFIG_NAME).write_text("{\"format\": "), CONFIG_NAME, "not valid JSON"),
    "another program's config": (lambda f: (f / CONFIG_NAME).write_text('{"model_type": "bert"}'), CONFIG_NAME,
                                 "not a gmvq_ext tokenizer config (its format is None"),
    "a key missing": (lambda f: rewrite_config(f, dim=None), CONFIG_NAME, "entry 'dim' is missing or not a int"),
    "unknown quantizer": (lambda f: rewrite_config(f, quantizer="magic"), CONFIG_NAME,
                          "describes a network this gmvq_ext cannot build"),
    "a size that does not fit": (lambda f: rewrite_config(f, image_size=36), CONFIG_NAME,
                                 "image_size 36 does not fit downsampling 8"),
    "no config": (lambda f: (f / CONFIG_NAME).unlink(), CONFIG_NAME, "no config.json at"),
    "no weights": (lambda f: (f / WEIGHTS_NAME).unlink(), WEIGHTS_NAME, "no model.safetensors at"),
    "truncated weights": (lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:500]),
                          WEIGHTS_NAME, "not a complete safetensors file"),
    "a pickle instead": (lambda f: torch.save({"x": torch.zeros(1)}, f / WEIGHTS_NAME), WEIGHTS_NAME,
                         "not a complete safetensors file"),
    "wrong shape": (lambda f: rewrite_weights(f, lambda w: w.update({"quantizer.codebook": torch.zeros(17, 8)})),
                    WEIGHTS_NAME, "tensor 'quantizer.codebook' is torch.float32 (17, 8), the config's network "
                                  "needs torch.float32 (16, 8)"),
    "missing tensors": (lambda f: rewrite_weights(f, lambda w: [w.pop(k) for k in list(w) if k.startswith("decoder")]),
                        WEIGHTS_NAME, "missing tensor(s): 'decoder.0.weight'"),
    "unexpected tensors": (lambda f: rewrite_weights(f, lambda w: w.update({"extra.weight": torch.zeros(2)})),
                           WEIGHTS_NAME, "1 unexpected tensor(s): 'extra.weight'"),
    "another config's weights": (lambda f: rewrite_config(f, dim=4), WEIGHTS_NAME, "does not fit"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_tampered_folder_is_one_line_naming_the_file(exported, case):
    tamper, file_name, message = TAMPERINGS[case]
    tamper(exported)
    with pytest.raises(PretrainedError) as raised:
        gmvq_ext.Tokenizer.from_pretrained(exported)
    text = str(raised.value)
    assert "\n" not in text and message in text and str(exported / file_name) in text, text


def test_a_missing_local_folder_is_named_without_any_network(tmp_path):
    with pytest.raises(PretrainedError, match=r"no exported tokenizer folder at '.*nowhere'"):
        gmvq_ext.Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_a_bare_model_cannot_be_exported(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="built from a bare model"):
        gmvq_ext.Tokenizer(tokenizer.model, 32).save_pretrained(tmp_path / "x")


def test_export_command_refuses_to_overwrite_and_names_a_bad_checkpoint(exported, tmp_path):
    with pytest.raises(SystemExit, match=r"gmvq-export: error: --out .* already holds an exported tokenizer"):
        export_main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(exported)])
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"gmvq-export: error: cannot load checkpoint '.*c.pt'"):
        export_main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_hub_mixin_saves_and_loads_the_same_folder(tokenizer, exported, tmp_path):
    pytest.importorskip("huggingface_hub")
    assert pretrained.HUB_BASES, "huggingface_hub is importable, so TokenizerNetwork must be a PyTorchModelHubMixin"
    network = TokenizerNetwork.from_pretrained(str(exported))  # the mixin's classmethod, a local folder
    assert isinstance(network, TokenizerNetwork) and not network.training
    network.save_pretrained(tmp_path / "via-mixin")  # the mixin's writer: our two files and a model card
    assert json.loads((tmp_path / "via-mixin" / CONFIG_NAME).read_text()) == json.loads(
        (exported / CONFIG_NAME).read_text())
    loaded = gmvq_ext.Tokenizer.from_pretrained(tmp_path / "via-mixin")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(images), tokenizer.encode(images))
    rewrite_config(tmp_path / "via-mixin", format_version=7)  # the mixin's reader runs the same checks
    with pytest.raises(PretrainedError, match="format version 7 is newer"):
        TokenizerNetwork.from_pretrained(str(tmp_path / "via-mixin"))


def test_a_hub_id_is_fetched_through_huggingface_hub(exported, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = {}

    def snapshot_download(repo_id, allow_patterns, **options):  # stands in for the network
        asked.update(repo_id=repo_id, files=sorted(allow_patterns))
        return str(exported)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    tokenizer = gmvq_ext.Tokenizer.from_pretrained("someone/faces-tokenizer")
    assert asked == {"repo_id": "someone/faces-tokenizer", "files": [CONFIG_NAME, WEIGHTS_NAME]}
    assert tokenizer.code_shape == (4, 4)

    def unreachable(repo_id, allow_patterns, **options):
        raise OSError("no network here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(PretrainedError, match=r"no local folder 'someone/x', and it cannot be fetched from the "
                                              r"Hugging Face Hub: OSError: no network here"):
        gmvq_ext.Tokenizer.from_pretrained("someone/x")
