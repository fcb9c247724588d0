"""``ArtifactStore``: the one owner of an artifacts folder.

Every file of an artifacts folder is written through a store: parts with their external data,
engines, copied checkpoint files, the manifest, the build log. A new build writes into a hidden
temporary folder beside the destination, and ``commit`` seals the checksums, writes the manifest
and moves the folder into place; a failed or interrupted build is removed whole by ``abort`` (or
by leaving the ``with`` block on an exception) and never damages a previous folder. ``open``
updates an existing, complete folder in place (engines built on the device from a bundle): new
files go to hidden temporary names and are renamed into place together by ``commit``.

Tools that write files themselves (onnxruntime's quantizer) write to a ``scratch`` path: hidden,
never sealed, removed by ``drop_scratch``, ``commit`` or ``abort``. The manifest is changed only
through the store too: ``save_part`` (a part's files, tensors, precision, passes, lint findings),
``annotate`` (passes / lint of a saved part), ``set_manifest`` / ``update_manifest`` (sections).

Pure Python: onnx-ir is imported only when a part is saved (build machines), so a runtime-only
install (a Jetson) can add engines to a bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import BUILD_LOG, MANIFEST, Manifest, PartInfo, TensorInfo

EXTERNAL_DATA_THRESHOLD = 512 << 20  # parts above this keep their weights in <part>.onnx.data


class ArtifactStore:
    def __init__(self, path: Path, destination: Path | None, manifest: Manifest | None = None):
        self.path = Path(path)  # where files are written now
        self.destination = destination  # None: updating ``path`` in place
        self.manifest = manifest
        self._parts: dict[str, PartInfo] = {}  # parts saved before the manifest exists (set_manifest)
        self._pending: dict[str, Path] = {}  # in-place updates: final name -> hidden temporary file

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, out_dir: str | Path, force: bool = False) -> "ArtifactStore":
        """A new build of ``out_dir``: refuses a destination that is not an artifacts folder (or one
        that holds artifacts, unless ``force``), then writes into a temporary folder beside it."""
        out_dir = Path(out_dir)
        check_destination(out_dir, force)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp.chmod(0o777 & ~_umask())
        return cls(tmp, out_dir)

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> "ArtifactStore":
        """An existing folder, to add files to in place (its manifest read, checked when ``verify``)."""
        folder = Path(folder)
        manifest = Manifest.read(folder)
        if verify:
            manifest.verify(folder)
        return cls(folder, None, manifest)

    def __enter__(self) -> "ArtifactStore":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is not None:
            self.abort()

    # -- writing ---------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        """Where ``name`` is (or will be) in the folder being written."""
        return self.path / name

    def scratch(self, name: str) -> Path:
        """A hidden temporary path in the folder (never sealed); the caller removes it, ``commit`` and
        ``abort`` remove what is left."""
        return self.path / f".{name}"

    def write_text(self, name: str, text: str) -> None:
        self._target(name).write_text(text, encoding="utf-8")

    def write_bytes(self, name: str, data: bytes) -> None:
        self._target(name).write_bytes(data)

    def copy_in(self, source: Path, name: str | None = None) -> None:
        shutil.copyfile(source, self._target(name or Path(source).name))

    def drop_scratch(self, path: Path) -> None:
        """Remove a scratch file (``scratch``) and its external data file, if any."""
        for p in (Path(path), Path(path).with_name(Path(path).name + ".data")):
            p.unlink(missing_ok=True)

    def part(self, name: str) -> PartInfo | None:
        """The manifest entry of part ``name`` (None before it is saved)."""
        parts = self.manifest.parts if self.manifest is not None else self._parts
        return parts.get(name)

    def save_part(self, name: str, model, precision: str, passes: list[dict] | None = None,
                  lint: list[dict] | None = None) -> PartInfo:
        """Write (or replace) part ``name`` from an onnx-ir model: ``<name>.onnx`` plus
        ``<name>.onnx.data`` when its weights are large (names unique per part, so parts never
        overwrite each other's data). Tensors are written one at a time - lazily bound checkpoint
        weights and lazily quantized ones are computed as they are written, nothing else is loaded -
        into a hidden folder first; the new files then replace the part's old ones, so tensors that
        are still read from the old files (a quantizer's input) stay readable while the new ones are
        written. Updates the manifest's entry (passes and lint findings kept unless given)."""
        import onnx_ir as ir

        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        file = f"{name}.onnx"
        data = f"{name}.onnx.data" if size > EXTERNAL_DATA_THRESHOLD else None
        old = self.part(name)
        staging = self.scratch(f"{name}.saving")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            if data:
                ir.save(model, staging / file, external_data=data)
            else:  # inline: no tensor may keep pointing at a file of the folder
                ir.external_data.load_to_model(model)
                ir.save(model, staging / file)
            for f in (old.file, old.external_data) if old else ():
                if f and f not in (file, data):
                    self.file(f).unlink(missing_ok=True)
            if not data:
                self.file(f"{name}.onnx.data").unlink(missing_ok=True)
            for f in (file, data):
                if f:
                    os.replace(staging / f, self.file(f))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        keep_passes = old.passes if old else []
        keep_lint = old.lint if old else []
        info = PartInfo(name, file, data, tensor_infos(model.graph.inputs), tensor_infos(model.graph.outputs),
                        precision, passes=list(passes if passes is not None else keep_passes),
                        lint=list(lint if lint is not None else keep_lint))
        (self.manifest.parts if self.manifest is not None else self._parts)[name] = info
        return info

    def annotate(self, name: str, passes: list[dict] | None = None, lint: list[dict] | None = None) -> None:
        """Replace the pass records and / or lint findings of a saved part (its files unchanged)."""
        part = self.part(name)
        if passes is not None:
            part.passes = list(passes)
        if lint is not None:
            part.lint = list(lint)

    def set_manifest(self, manifest: Manifest) -> None:
        """The manifest of a new build (parts saved before it was made are carried over), or the one
        a tool that wrote into the folder read back."""
        carried = self.manifest.parts if self.manifest is not None else self._parts
        for name, part in carried.items():
            manifest.parts.setdefault(name, part)
        self._parts = {}
        self.manifest = manifest

    def update_manifest(self, **sections) -> None:
        """Set top-level sections of the manifest (``calibration=...``, ``tensorrt=...``)."""
        for key, value in sections.items():
            if not hasattr(self.manifest, key):
                raise AttributeError(f"the manifest has no section {key!r}")
            setattr(self.manifest, key, value)

    def write_manifest(self) -> None:
        """Write the (unsealed) manifest now: the runtime can load the folder being built (calibration)."""
        self.manifest.write(self.path)

    # -- finishing -------------------------------------------------------------------------------
    def commit(self, build_log: dict[str, Any] | None = None) -> Manifest:
        """Seal checksums, write the manifest (and build log), move everything into place."""
        for final, tmp in self._pending.items():
            os.replace(tmp, self.path / final)
        self._pending.clear()
        self._clean_scratch()
        self.manifest.seal(self.path)
        self.manifest.write(self.path)
        if build_log is not None:
            (self.path / BUILD_LOG).write_text(json.dumps(build_log, indent=2))
        if self.destination is not None:
            _move_into_place(self.path, self.destination)
            self.path = self.destination
            self.destination = None
        return self.manifest

    def abort(self) -> None:
        """Remove everything this store wrote: the whole temporary folder of a new build, the pending
        files of an in-place update."""
        if self.destination is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for tmp in self._pending.values():
                tmp.unlink(missing_ok=True)
            self._pending.clear()

    def _target(self, name: str) -> Path:
        if self.destination is not None:
            return self.path / name
        tmp = self.path / f".{name}.pending"
        self._pending[name] = tmp
        return tmp

    def _clean_scratch(self) -> None:
        for p in self.path.glob(".*"):
            if p.is_file() and p.name != f".{MANIFEST}.tmp" and not p.name.endswith(".pending"):
                p.unlink(missing_ok=True)


def tensor_infos(values) -> list[TensorInfo]:
    """Manifest entries for onnx-ir graph inputs / outputs (ONNX dtype names, lower case)."""
    out = []
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        out.append(TensorInfo(v.name, shape, onnx_dtype_name(v.dtype)))
    return out


def onnx_dtype_name(dtype) -> str:
    """onnx-ir DataType -> the manifest's dtype name: float32, float16, bfloat16, int64, float8e4m3fn, ..."""
    if dtype is None:
        return "unknown"
    names = {"FLOAT": "float32", "DOUBLE": "float64", "FLOAT16": "float16", "BFLOAT16": "bfloat16"}
    return names.get(dtype.name, dtype.name.lower())


def check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise QvlError(f"{out_dir} exists and is not a folder; choose another output path.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST).exists():
            raise QvlError(f"{out_dir} exists and is not an artifacts folder; choose an empty or new output path.")
        if not force:
            raise QvlError(f"{out_dir} already holds artifacts; pass --force to replace them.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
