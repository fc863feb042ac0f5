"""Exported tokenizers: a folder that rebuilds the model without the training code.

    tokenizer.save_pretrained("my-tokenizer")                     # or: gmvq-export --checkpoint ... --out ...
    tokenizer = gmvq_ext.Tokenizer.from_pretrained("my-tokenizer")

The folder holds two files:

    config.json        what rebuilds the network: format "gmvq_ext.tokenizer",
                       format_version, image_size, downsampling, residual_blocks,
                       quantizer, codebook_size, dim, quantizer_options; and,
                       for people, gmvq_ext_version and trained_on (the run)
    model.safetensors  the autoencoder's state_dict (weights and buffers:
                       BatchNorm statistics, the codebook, the quantizer's
                       state), written by the safetensors library: no pickle,
                       nothing in it runs, no optimizer

Reading checks both before building anything: a config.json that is not
JSON, not ours, from a newer format version, or describing a network this
gmvq_ext cannot build; a model.safetensors that is unreadable or whose
tensors (names, shapes, dtypes) do not fit the config: each a one-line
PretrainedError naming the file.

The Hugging Face Hub: where huggingface_hub is importable, TokenizerNetwork
also derives from its PyTorchModelHubMixin (save_pretrained, push_to_hub,
from_pretrained("user/name")), with this module's writer and reader behind
it, so a folder on the Hub is the same two files, read with the same checks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .files import write_atomic, write_json_atomic
from .models import Autoencoder, Decoder, Encoder, image_size_problem

FORMAT = "gmvq_ext.tokenizer"
# 1: the first format. Bump when config.json or the state_dict's layout changes.
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# What rebuilds the network: config.json's required entries and their types.
NETWORK_KEYS = {"format": str, "format_version": int, "image_size": int, "downsampling": int,
                "residual_blocks": int, "quantizer": str, "codebook_size": int, "dim": int, "quantizer_options": dict}
NAMED_IN_ERROR = 3  # how many missing or unexpected tensors an error names
# A Hugging Face Hub repository id, "user/name" (huggingface_hub.utils.validate_repo_id's characters).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

try:  # optional: the Hub's model mixin, where the library is installed
    from huggingface_hub import PyTorchModelHubMixin
except ImportError:
    PyTorchModelHubMixin = None
HUB_BASES = (PyTorchModelHubMixin,) if PyTorchModelHubMixin is not None else ()
HUB_CLASS_OPTIONS = ({"library_name": "gmvq_ext", "tags": ["image-tokenizer", "vector-quantization", "gmvq"]}
                     if HUB_BASES else {})


class PretrainedError(ValueError):
    """An exported tokenizer folder is missing, unreadable, tampered with or from a newer gmvq_ext."""


def network_config(*, image_size: int, downsampling: int, residual_blocks: int, quantizer: str, codebook_size: int,
                   dim: int, quantizer_options: dict, trained_on: dict | None = None) -> dict:
    """config.json's content for a network of these settings."""
    from . import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "gmvq_ext_version": __version__,
            "image_size": image_size, "downsampling": downsampling, "residual_blocks": residual_blocks,
            "quantizer": quantizer, "codebook_size": codebook_size, "dim": dim,
            "quantizer_options": dict(quantizer_options), "trained_on": dict(trained_on or {})}


class TokenizerNetwork(Autoencoder, *HUB_BASES, **HUB_CLASS_OPTIONS):
    """The autoencoder that ``config`` (config.json's content) describes."""

    def __init__(self, config: dict):
        from .quantizers import build_quantizer

        quantizer = build_quantizer(config["quantizer"], codebook_size=config["codebook_size"], dim=config["dim"],
                                    **config["quantizer_options"])
        blocks, downsampling = config["residual_blocks"], config["downsampling"]
        super().__init__(Encoder(quantizer.input_channels, blocks, downsampling=downsampling), quantizer,
                         Decoder(quantizer.code_dim, blocks, downsampling=downsampling))
        self.config = dict(config)

    # The Hub mixin's hooks (used only where huggingface_hub is installed).
    def _save_pretrained(self, save_directory: Path) -> None:
        save_folder(self, self.config, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, map_location="cpu", **ignored) -> "TokenizerNetwork":
        folder = model_id if Path(model_id).is_dir() else hub_folder(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token)
        return load_network(folder, map_location)


# ----------------------------------------------------------------------------- writing

def save_folder(model: torch.nn.Module, config: dict, folder: str | os.PathLike) -> Path:
    """Write ``model``'s state_dict as model.safetensors and ``config`` as
    config.json into ``folder`` (created), each atomically; the config last,
    so a folder with a config.json is complete. Returns the folder."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    problem = config_problem(config)
    if problem is not None:
        raise ValueError(f"cannot export this config: {problem}")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    payload = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    write_atomic(folder / WEIGHTS_NAME, lambda f: f.write(payload))
    write_json_atomic(folder / CONFIG_NAME, config)
    return folder


# ----------------------------------------------------------------------------- reading

def load_network(folder: str | os.PathLike, device: str | torch.device = "cpu") -> TokenizerNetwork:
    """The network of an exported folder on ``device``, in eval mode; a one-line
    PretrainedError naming the file when the folder does not hold one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedError(f"no exported tokenizer folder at {str(folder)!r}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = read_config(config_path)
    try:
        network = TokenizerNetwork(config)
    except (ValueError, TypeError, KeyError) as error:
        raise PretrainedError(f"{str(config_path)!r} describes a network this gmvq_ext cannot build: "
                              f"{first_line(error)}") from None
    weights = read_weights(weights_path)
    problem = weights_problem(network.state_dict(), weights)
    if problem is not None:
        raise PretrainedError(f"{str(weights_path)!r} does not fit {str(config_path)!r}: {problem}")
    network.load_state_dict(weights)
    return network.to(device).eval()


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise PretrainedError(f"no {CONFIG_NAME} at {str(path)!r}: not an exported gmvq_ext tokenizer "
                              "(gmvq-export or Tokenizer.save_pretrained writes one)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PretrainedError(f"cannot read {str(path)!r}: not valid JSON ({error.msg} at line {error.lineno})"
                              ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PretrainedError(f"cannot read {str(path)!r}: {first_line(error)}") from None
    problem = config_problem(config)
    if problem is not None:
        raise PretrainedError(f"{str(path)!r}: {problem}")
    return config


def config_problem(config) -> str | None:
    """What makes ``config`` not a config.json this gmvq_ext reads, or None."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        return f"not a gmvq_ext tokenizer config (its format is {found!r}, expected {FORMAT!r})"
    version = config.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return (f"format version {version} is newer than this gmvq_ext reads (up to {FORMAT_VERSION}); "
                "upgrade gmvq_ext to load it")
    for key, kind in NETWORK_KEYS.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            return f"entry {key!r} is missing or not a {kind.__name__} (found {config.get(key)!r})"
    if version < 1:
        return f"format version {version} is not one gmvq_ext ever wrote"
    return image_size_problem(config["image_size"], config["downsampling"], "image_size", "downsampling")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise PretrainedError(f"no {WEIGHTS_NAME} at {str(path)!r} (the folder's config.json has no weights)")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises SafetensorError, OSError, ValueError on bad files
        raise PretrainedError(f"cannot read {str(path)!r}: not a complete safetensors file "
                              f"({type(error).__name__}: {first_line(error)})") from None


def weights_problem(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """How the tensors ``found`` differ from the state_dict ``expected`` (names, shapes, dtypes), or None."""
    for what, names in (("missing", [n for n in expected if n not in found]),
                        ("unexpected", [n for n in found if n not in expected])):
        if names:
            listed = ", ".join(repr(n) for n in names[:NAMED_IN_ERROR])
            return f"{len(names)} {what} tensor(s): {listed}" + (", ..." if len(names) > NAMED_IN_ERROR else "")
    for name, tensor in expected.items():
        if found[name].shape != tensor.shape or found[name].dtype != tensor.dtype:
            return (f"tensor {name!r} is {found[name].dtype} {tuple(found[name].shape)}, the config's network "
                    f"needs {tensor.dtype} {tuple(tensor.shape)}")
    return None


def hub_folder(repo_id: str, **download_options) -> str:
    """The local copy of a Hub repository's two files (downloaded by
    huggingface_hub where it is installed and the network allows)."""
    if PyTorchModelHubMixin is None:
        raise PretrainedError(f"no exported tokenizer folder at {repo_id!r} (a Hugging Face Hub repository id "
                              "needs huggingface_hub: pip install huggingface_hub)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **download_options)
    except Exception as error:  # network, authentication, a missing repository
        raise PretrainedError(f"no local folder {repo_id!r}, and it cannot be fetched from the Hugging Face Hub: "
                              f"{type(error).__name__}: {first_line(error)}") from None


def resolve_folder(name_or_path: str | os.PathLike) -> str:
    """A local folder as it is; a Hub repository id ("user/name") fetched
    with huggingface_hub; anything else a PretrainedError naming it."""
    text = str(name_or_path)
    if Path(text).is_dir():
        return text
    if isinstance(name_or_path, str) and REPO_ID.fullmatch(text) and ".." not in text:
        return hub_folder(text)
    raise PretrainedError(f"no exported tokenizer folder at {text!r}")


def first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)[:300]
