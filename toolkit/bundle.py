"""Deployment bundles: a folder with manifest.json, tokenizer.json and one or more model variants.

A bundle is the only thing the on-device runtime needs, so this module is torch-free (it imports the
standard library and toolkit.config / toolkit.errors only; not even the `onnx` package).

    manifest.json      {"format": "edgekit-bundle/1", "model": {ModelConfig}, "tokenizer": "tokenizer.json",
                        "source": {"checkpoint", "sha256"}, "files": {relpath: {"bytes", "sha256"}},
                        "variants": [{"name", "precision", "targets", "files", "model", "export",
                                      "quantization", "parity"}]}
    tokenizer.json
    fp32/model.onnx    (+ fp32/model.onnx.data when the weights are stored as ONNX external data)
    fp16/model.onnx    ...

Trust rules, checked by `Bundle.open` (and again before a file is added):
- every file listed in the manifest exists, is a regular file (no symlink anywhere on its path) and has
  the recorded size and sha256;
- every path (manifest keys, variant files, ONNX external-data `location`s) is a relative POSIX path
  inside the bundle: no absolute path, drive, backslash or `..` component;
- every model file parses as an ONNX protobuf and its external-data files are listed in the manifest.

Writes are atomic: a new bundle is built in a hidden temporary folder and renamed into place; adding a
variant writes its files first and replaces manifest.json last (temp file + os.replace), under a lock.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from .config import ModelConfig, model_config_from_dict
from .errors import BundleError, ConfigError

BUNDLE_FORMAT = "edgekit-bundle/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


# --- paths and hashes --------------------------------------------------------------------------------
def check_relpath(rel, what: str = "path") -> str:
    """A normalised relative POSIX path that stays inside the bundle, or BundleError."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{what} must be a non-empty string (got {rel!r})")
    if "\\" in rel or "\x00" in rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise BundleError(f"{what} {rel!r} is not a relative path inside the bundle")
    parts = PurePosixPath(rel).parts
    if any(p in ("..", ".") for p in parts) or rel.endswith("/"):
        raise BundleError(f"{what} {rel!r} escapes the bundle (no '..' or '.' components allowed)")
    return "/".join(parts)


def _safe_path(root: Path, rel: str, what: str = "path") -> Path:
    """root / rel, refusing symlinks on every component (a symlink could point anywhere)."""
    rel = check_relpath(rel, what)
    path = root
    for part in PurePosixPath(rel).parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{what} {rel!r} is a symlink (or passes through one); bundles hold regular files only")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _fsync_dir(path: Path):
    with contextlib.suppress(OSError):  # not every platform / filesystem allows fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, data: dict):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _locked(root: Path):
    """Exclusive advisory lock on the bundle folder (serialises concurrent manifest updates)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; updates are still atomic, just not serialised
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- minimal ONNX protobuf scan (torch-free and onnx-free) ----------------------------------------------
# Field numbers from onnx.proto: which submessages can hold a TensorProto, and where external data lives.
_MODEL = {7: "graph", 20: "training", 25: "function"}
_TRAINING = {1: "graph", 2: "graph"}
_FUNCTION = {7: "node"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_NODE = {5: "attr"}
_ATTR = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_TENSOR = {13: "entry"}
_KINDS = {"model": _MODEL, "training": _TRAINING, "function": _FUNCTION, "graph": _GRAPH, "node": _NODE,
          "attr": _ATTR, "sparse": _SPARSE, "tensor": _TENSOR, "entry": {}}


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, stop) for each field of the message buf[pos:end]; for
    length-delimited fields start/stop bound the payload."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            yield field, wire, pos, pos
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ValueError("truncated fixed-width field")
            yield field, wire, pos, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("length-delimited field runs past the end of the data (truncated file?)")
            yield field, wire, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _scan(buf, kind: str, pos: int, end: int, found: list[str]):
    children = _KINDS[kind]
    key = value = None
    for field, wire, start, stop in _fields(buf, pos, end):
        if kind == "entry" and wire == 2 and field in (1, 2):
            text = bytes(buf[start:stop]).decode("utf-8", "replace")
            key, value = (text, value) if field == 1 else (key, text)
        elif wire == 2 and field in children:
            _scan(buf, children[field], start, stop, found)
    if kind == "entry" and key == "location" and value is not None:
        found.append(value)


def onnx_external_locations(path: Path) -> list[str]:
    """External-data `location` strings in an ONNX file; BundleError if it is not a parseable ONNX model."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise ValueError("the file is empty")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            top = {field for field, *_ in _fields(buf, 0, size)}
            if 1 not in top or 7 not in top:  # ir_version and graph are required
                raise ValueError("no ir_version or graph")
            found: list[str] = []
            _scan(buf, "model", 0, size, found)
            return found
    except (ValueError, OSError) as exc:
        raise BundleError(f"{path} is not a valid ONNX model ({exc})") from None


# --- the bundle ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    targets: tuple[str, ...]
    files: tuple[str, ...]
    model: str  # relpath of the .onnx file
    export: dict
    quantization: dict | None
    parity: dict | None

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        try:
            return cls(name=str(d["name"]), precision=str(d["precision"]), targets=tuple(d.get("targets", ())),
                       files=tuple(d["files"]), model=d["model"], export=dict(d.get("export") or {}),
                       quantization=d.get("quantization"), parity=d.get("parity"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed variant entry in {MANIFEST}: {exc!r}") from None


class Bundle:
    """An opened, verified bundle. Use `Bundle.open(path)`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    # loading and verification
    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        root = Path(path)
        if not (root / MANIFEST).is_file():
            raise BundleError(f"{root} is not a bundle (no {MANIFEST}); create one with `edgekit export`")
        if (root / MANIFEST).is_symlink():
            raise BundleError(f"{root / MANIFEST} is a symlink; bundles hold regular files only")
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
        bundle = cls(root, manifest)
        bundle._check_structure()
        if verify:
            bundle.verify()
        return bundle

    def _check_structure(self):
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
            found = m.get("format") if isinstance(m, dict) else None
            raise BundleError(f"{self.root / MANIFEST}: unsupported bundle format {found!r} (expected {BUNDLE_FORMAT!r})")
        for key in ("model", "files", "variants", "tokenizer"):
            if key not in m:
                raise BundleError(f"{self.root / MANIFEST} has no {key!r} entry")
        if not isinstance(m["files"], dict) or not isinstance(m["variants"], list):
            raise BundleError(f"{self.root / MANIFEST}: 'files' must be an object and 'variants' a list")
        files = {check_relpath(rel, "manifest file") for rel in m["files"]}
        if check_relpath(m["tokenizer"], "tokenizer") not in files:
            raise BundleError(f"{self.root / MANIFEST}: tokenizer {m['tokenizer']!r} is not among the listed files")
        names = set()
        for v in self.variants:
            if v.name in names:
                raise BundleError(f"{self.root / MANIFEST}: two variants are named {v.name!r}")
            names.add(v.name)
            for rel in v.files + (v.model,):
                if check_relpath(rel, f"variant {v.name!r} file") not in files:
                    raise BundleError(f"{self.root / MANIFEST}: variant {v.name!r} uses {rel!r}, which is not listed in 'files'")
            if v.model not in v.files:
                raise BundleError(f"{self.root / MANIFEST}: variant {v.name!r} model {v.model!r} is not among its files")
        _ = self.model_config

    def verify(self):
        """Check every listed file (regular file, size, sha256) and every model's external data paths."""
        for rel, entry in self.manifest["files"].items():
            path = _safe_path(self.root, rel, "manifest file")
            if not path.is_file():
                raise BundleError(f"bundle {self.root}: listed file {rel!r} is missing")
            if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
                raise BundleError(f"bundle {self.root}: manifest entry for {rel!r} has no bytes/sha256")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise BundleError(f"bundle {self.root}: {rel!r} has changed since the bundle was written "
                                  "(size or sha256 differs from manifest.json); re-export the bundle")
        for v in self.variants:
            self._check_model_file(v.model, set(self.manifest["files"]))

    def _check_model_file(self, model_rel: str, listed: set[str]):
        path = _safe_path(self.root, model_rel, "model file")
        base = PurePosixPath(model_rel).parent
        if model_rel.endswith(".xml"):  # OpenVINO IR: its weights are the sibling .bin, which must be listed
            if model_rel[:-4] + ".bin" not in listed:
                raise BundleError(f"{model_rel}: OpenVINO IR weights {model_rel[:-4] + '.bin'!r} are not listed in the bundle manifest")
            return
        for loc in onnx_external_locations(path):
            try:
                rel = check_relpath(loc, "external data location")
            except BundleError as exc:
                raise BundleError(f"{model_rel}: {exc}") from None
            rel = check_relpath(str(base / rel) if str(base) != "." else rel)
            if rel not in listed:
                raise BundleError(f"{model_rel}: external data {loc!r} is not a file listed in the bundle manifest")
            _safe_path(self.root, rel, "external data location")

    # accessors
    @property
    def model_config(self) -> ModelConfig:
        try:
            return model_config_from_dict(self.manifest["model"])
        except (ConfigError, TypeError, AttributeError) as exc:
            raise BundleError(f"{self.root / MANIFEST}: {exc}") from None

    @property
    def variants(self) -> list[Variant]:
        return [Variant.from_dict(d) for d in self.manifest["variants"]]

    @property
    def tokenizer_path(self) -> Path:
        return self.path_of(self.manifest["tokenizer"])

    def path_of(self, relpath: str) -> Path:
        return _safe_path(self.root, relpath)

    def variant_bytes(self, variant: Variant) -> int:
        """Bytes of a variant's files, as the manifest records them (the shared tokenizer not counted)."""
        files = self.manifest["files"]
        return sum(int(files[f]["bytes"]) for f in variant.files if f in files)

    def variant(self, precision: str, target: str | None = None) -> Variant:
        """The variant with this precision (and meant for `target`, when given)."""
        matches = [v for v in self.variants if v.precision == precision and (target is None or target in v.targets)]
        if not matches:
            have = ", ".join(f"{v.name} ({v.precision}; targets {', '.join(v.targets) or '-'})" for v in self.variants)
            for_target = f" for target {target!r}" if target else ""
            raise BundleError(f"bundle {self.root} has no {precision} variant{for_target}; it has: {have or 'none'}")
        return matches[0]

    # updates (each re-reads manifest.json under the lock, so concurrent updates are not lost)
    def _update(self, change):
        with _locked(self.root):
            current = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
            new = copy.deepcopy(current)
            change(new)
            _write_json_atomic(self.root / MANIFEST, new)
            self.manifest = new

    def add_variant(self, name: str, precision: str, files: list[str], targets: list[str], model_file: str,
                    quantization: dict | None = None, export: dict | None = None) -> Variant:
        """Register files already written inside the bundle as a variant (replacing one of the same
        name): hashes them, checks the ONNX file, then atomically replaces manifest.json."""
        files = [check_relpath(f, "variant file") for f in files]
        model_file = check_relpath(model_file, "model file")
        if model_file not in files:
            files.append(model_file)
        entries = {}
        for rel in files:
            path = _safe_path(self.root, rel, "variant file")
            if not path.is_file():
                raise BundleError(f"cannot add variant {name!r}: {path} does not exist")
            entries[rel] = file_entry(path)
        self._check_model_file(model_file, set(self.manifest["files"]) | set(entries))
        entry = {"name": name, "precision": precision, "targets": list(targets), "files": files,
                 "model": model_file, "export": export or {}, "quantization": quantization, "parity": None}

        def change(m):
            m["variants"] = [v for v in m["variants"] if v.get("name") != name] + [entry]
            m["files"].update(entries)

        self._update(change)
        return Variant.from_dict(entry)

    def set_parity(self, variant_name: str, summary: dict | None):
        if variant_name not in {v.name for v in self.variants}:
            raise BundleError(f"bundle {self.root} has no variant named {variant_name!r}")

        def change(m):
            for v in m["variants"]:
                if v.get("name") == variant_name:
                    v["parity"] = summary

        self._update(change)


# --- writing a new bundle ------------------------------------------------------------------------------
def build_manifest(root: Path, model: dict, source: dict, variants: list[dict], tokenizer: str = TOKENIZER) -> dict:
    """Manifest for the files already in `root`: hashes the tokenizer and every variant file."""
    rels = [check_relpath(tokenizer, "tokenizer")] + [check_relpath(f) for v in variants for f in v["files"]]
    files = {rel: file_entry(_safe_path(root, rel)) for rel in dict.fromkeys(rels)}
    empty = {"name": None, "precision": None, "targets": [], "files": [], "model": None, "export": {},
             "quantization": None, "parity": None}
    full = [{**empty, **v} for v in variants]
    return {"format": BUNDLE_FORMAT, "model": model, "tokenizer": tokenizer, "source": source, "files": files,
            "variants": full}


@contextlib.contextmanager
def new_bundle(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill (files, then manifest.json via write_manifest); on success it is
    renamed to out_dir (replacing an old bundle only with overwrite=True); on failure it is removed."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not a bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError("internal error: bundle written without a manifest")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(root: Path, manifest: dict):
    _write_json_atomic(Path(root) / MANIFEST, manifest)
