"""Failures of the environment through the real CLI process: a runtime-only install, SIGTERM, a
read-only / full / unwritable output disk and command-line bytes that are not UTF-8. Each gives one
line on stderr and a non-zero exit, no traceback, and leaves nothing half-written."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_EXTRA = ("torch", "transformers", "onnx", "onnx_ir", "onnxscript", "safetensors")


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """``python -m qvl_export.cli ARGS`` (args may be bytes: passed to the OS unchanged)."""
    argv = [os.fsencode(sys.executable), b"-m", b"qvl_export.cli", *[a if isinstance(a, bytes) else os.fsencode(str(a))
                                                                     for a in args]]
    return subprocess.run(argv, capture_output=True, timeout=timeout, cwd=REPO, env=cli_env())


def error_lines(stderr: str | bytes) -> list[str]:
    """stderr without the ``[qvl-export]`` progress lines."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "backslashreplace")
    return [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("[qvl-export]")]


def assert_one_line(code, stderr, expected_code, *words, prefix="error: "):
    text = stderr.decode("utf-8", "backslashreplace") if isinstance(stderr, bytes) else stderr
    assert code == expected_code, text
    assert "Traceback" not in text, text
    lines = error_lines(text)
    assert len(lines) == 1, text
    assert lines[0].startswith(prefix), lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a runtime-only install --------------------------------------------------------------------------

def run_without_build_extra(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a process where the build extra's packages cannot be imported, as if not installed."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {BUILD_EXTRA!r}
        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:  # what the import system raises for an absent package
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, NotInstalled())
        from qvl_export.cli import main
        sys.argv = ["qvl-export", *{args!r}]
        main()
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=cli_env())


def test_runtime_only_install_passes_needs_the_build_extra(tmp_path):
    proc = run_without_build_extra(tmp_path, ["passes"])
    line = assert_one_line(proc.returncode, proc.stderr, 2, "'qvl-export passes' needs the build extra",
                           'pip install "qvl-export[build]"')
    assert "is not installed" in line and "internal failure" not in line


def test_runtime_only_install_build_needs_the_build_extra(tmp_path, checkpoint):
    out = tmp_path / "out"
    proc = run_without_build_extra(tmp_path, ["build", str(checkpoint("qwen2_5_vl")), "-o", str(out)])
    assert_one_line(proc.returncode, proc.stderr, 2, "'qvl-export build' needs the build extra", "qvl-export[build]")
    assert not out.exists() and leftovers(tmp_path) == []


def test_other_missing_modules_stay_internal_failures_and_tensorrt_gets_its_own_line():
    from qvl_export.core.errors import missing_module_message

    with pytest.raises(ModuleNotFoundError) as missing:
        import qvl_export_no_such_module  # noqa: F401
    assert missing_module_message(missing.value, "qvl-export run") is None
    try:
        import tensorrt  # noqa: F401
    except ModuleNotFoundError as err:
        line = missing_module_message(err, "qvl-export engine")
        assert "'qvl-export engine' needs TensorRT" in line and "cuda-python" in line and "JetPack" in line
    else:
        pytest.skip("tensorrt is installed here")


# --- SIGTERM -----------------------------------------------------------------------------------------

def sigterm_build(tmp_path: Path, ckpt: Path, out: Path, *extra: str) -> tuple[int, str]:
    """Start ``build``, send SIGTERM once its temporary folder exists, return (exit code, stderr)."""
    argv = [sys.executable, "-m", "qvl_export.cli", "build", str(ckpt), "-o", str(out), "--no-parity", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(f".{out.name}.tmp-*")):
            assert proc.poll() is None, f"build ended before it was signalled: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no temporary build folder appeared within 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode("utf-8", "backslashreplace")


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
def test_sigterm_during_build_removes_the_temporary_folder(tmp_path, checkpoint):
    out = tmp_path / "out"
    code, err = sigterm_build(tmp_path, checkpoint("qwen2_5_vl"), out)
    line = assert_one_line(code, err, 128 + signal.SIGTERM, prefix="interrupted")
    assert line == "interrupted (SIGTERM); nothing was left half-written."
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_during_force_rebuild_leaves_previous_artifacts_untouched(tmp_path, checkpoint, artifacts):
    out = tmp_path / "out"
    shutil.copytree(artifacts("qwen2_5_vl"), out)  # a previous, complete build
    before = hashes(out)
    code, err = sigterm_build(tmp_path, checkpoint("qwen2_5_vl"), out, "--force")
    assert_one_line(code, err, 143, "SIGTERM", "nothing was left half-written", prefix="interrupted")
    assert hashes(out) == before
    assert leftovers(tmp_path) == []


# --- the output disk: read-only, full, not writable ---------------------------------------------------

def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}): a real read-only / full disk needs CAP_SYS_ADMIN")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): a real read-only / full disk needs "
                    "root with CAP_SYS_ADMIN")


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True, timeout=30)


def test_build_onto_a_read_only_file_system(tmp_path, checkpoint):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "ro,size=1m")
    try:
        proc = run_cli("build", checkpoint("qwen2_5_vl"), "-o", ro / "out", "--no-parity")
        line = assert_one_line(proc.returncode, proc.stderr, 2, "the file system is read-only", "-o")
        assert str(ro) in line
        assert list(ro.iterdir()) == []
    finally:
        unmount(ro)


def test_build_onto_a_full_disk_fails_midway_without_leftovers(tmp_path, checkpoint):
    """2 MiB hold the vision and merger parts of the tiny model, not the decoder: the disk fills midway."""
    full = tmp_path / "full"
    mount_tmpfs(full, "size=2m")
    try:
        proc = run_cli("build", checkpoint("qwen2_5_vl"), "-o", full / "out", "--no-parity")
        assert b"tracing decoder" in proc.stderr, proc.stderr.decode()  # it failed midway, not at the start
        line = assert_one_line(proc.returncode, proc.stderr, 2, "the disk is full", "free space", "-o")
        assert str(full / "out") in line
        assert list(full.iterdir()) == []
    finally:
        unmount(full)


def test_build_into_an_immutable_folder_is_permission_denied(tmp_path, checkpoint):
    """Root ignores permission bits; an immutable folder (chattr +i) refuses even root (EPERM)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available: no way to make a folder unwritable for root here")
    proc = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this file system has no immutable flag ({proc.stderr.strip()})")
    try:
        done = run_cli("build", checkpoint("qwen2_5_vl"), "-o", locked / "out", "--no-parity")
        line = assert_one_line(done.returncode, done.stderr, 2, "permission denied", "-o")
        assert str(locked) in line
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)


# --- bytes that are not UTF-8 -------------------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="POSIX argv bytes")
def test_prompt_that_is_not_utf8(artifacts):
    proc = run_cli("run", artifacts("qwen2_5_vl"), "--prompt", b"\xff\xfe", "--max-new-tokens", "2")
    assert_one_line(proc.returncode, proc.stderr, 2, "--prompt", "not valid UTF-8", "0xff")


@pytest.mark.skipif(os.name == "nt", reason="POSIX argv bytes")
def test_checkpoint_path_that_is_not_utf8(tmp_path, checkpoint):
    """The folder exists under a non-UTF-8 name; it is refused by name, not reported as a corrupt checkpoint."""
    odd = os.path.join(os.fsencode(tmp_path), b"ckpt-\xff")
    shutil.copytree(checkpoint("qwen2_5_vl"), os.fsdecode(odd))
    proc = run_cli("build", odd, "-o", tmp_path / "out", "--no-parity")
    line = assert_one_line(proc.returncode, proc.stderr, 2, "MODEL_DIR", "not valid UTF-8", "rename")
    assert "ckpt-\\xff" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_text_file_that_is_not_utf8_read_later(tmp_path, checkpoint):
    """A calibration prompts.txt in Latin-1: the UnicodeDecodeError deep in the build becomes one line."""
    from PIL import Image

    docs = tmp_path / "docs"
    docs.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(docs / "page.png")
    (docs / "prompts.txt").write_bytes("Quel est le total à payer ?\n".encode("latin-1"))
    out = tmp_path / "out"
    proc = run_cli("build", checkpoint("qwen2_5_vl"), "-o", out, "--precision", "int8", "--calib-docs", docs,
                   "--no-parity")
    assert_one_line(proc.returncode, proc.stderr, 2, "not valid UTF-8", "0xe0")
    assert not out.exists() and leftovers(tmp_path) == []
