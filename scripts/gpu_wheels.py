"""Build the wheel folder that `bash scripts/gpu_check.sh --wheels DIR` installs from.

The GPU machines this project is lent have PyTorch, timm, pandas, matplotlib, pytest, PyYAML and
tqdm, but no Hydra, omegaconf, antlr4, submitit or wandb, and no network. Run this beside the
checkout on a machine with PyPI, then take the folder along with the checkout:

    python scripts/gpu_wheels.py wheels                   # pip wheel from PyPI (antlr4 from its sdist)
    python scripts/gpu_wheels.py wheels --from-installed  # offline: this Python's installed copies

The folder holds exactly the versions pyproject.toml pins, each a pure-Python wheel (so one folder
serves any Python 3 and platform). Not in it: wandb (imported only with logger=wandb) and esam
itself (gpu_check.sh runs it from the checkout through PYTHONPATH, so the machine's Python need
not be the 3.11 pyproject asks for). Without --from-installed, a failed download falls back to
the installed copies and says so.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the GPU machines lack from pyproject's dependencies (hydra-core brings omegaconf, which
# brings antlr4; the submitit pair serves hydra/launcher=local and slurm).
LACKING = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "hydra-submitit-launcher", "submitit")


def pins() -> list[str]:
    """``name==version`` for each of :data:`LACKING`, read from pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {d.split("==")[0].strip().lower(): d.strip() for d in deps if "==" in d}
    missing = [n for n in LACKING if n not in pinned]
    if missing:
        sys.exit(f"error: pyproject.toml pins no version of {', '.join(missing)}")
    return [pinned[n] for n in LACKING]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pack_installed(requirement: str, out: Path) -> Path:
    """A wheel of the installed distribution ``name==version``, from the files its RECORD lists
    (scripts outside site-packages are left out: pip makes them again from entry_points.txt)."""
    name, version = requirement.split("==")
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"error: {name} is not installed in {sys.prefix}, so it cannot be packed; "
                 "run without --from-installed on a machine with PyPI")
    if dist.version != version:
        sys.exit(f"error: {name} {dist.version} is installed here, not the {version} pyproject.toml pins")
    files = [f for f in dist.files or () if f.parts[0] != ".." and "__pycache__" not in f.parts]
    info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info is None:
        sys.exit(f"error: {name} was not installed from a wheel (no .dist-info with a RECORD)")
    wheel = Path(dist.locate_file(f"{info}/WHEEL")).read_text()
    tags = re.findall(r"^Tag: (\S+)$", wheel, flags=re.M)
    if "Root-Is-Purelib: true" not in wheel or any(not t.endswith("-none-any") for t in tags) or not tags:
        sys.exit(f"error: {name} is not pure Python ({', '.join(tags) or 'no tags'}), so it cannot travel as one wheel")
    tag = ".".join(sorted({t.split("-")[0] for t in tags})) + "-none-any"
    path = out / f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-{tag}.whl"
    record = []

    def entry(name: str) -> zipfile.ZipInfo:  # fixed dates: the same files give the same wheel
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        return info

    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(files, key=str):
            if f.parts[0] == info and f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue  # written by pip at install time
            data = Path(dist.locate_file(f)).read_bytes()
            z.writestr(entry(f.as_posix()), data)
            record.append(f"{f.as_posix()},{_record_hash(data)},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(entry(f"{info}/RECORD"), "\n".join(record) + "\n")
    return path


def download(requirements: list[str], out: Path) -> bool:
    """``pip wheel --no-deps``: the published wheel where there is one, else one built from the sdist."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), *requirements]
    return subprocess.run(cmd).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to fill (made if missing)")
    parser.add_argument("--from-installed", action="store_true",
                        help="pack this Python's installed copies instead of asking PyPI")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    requirements = pins()
    if not args.from_installed and not download(requirements, args.out):
        print("note: pip could not fetch them; packing this Python's installed copies instead", file=sys.stderr)
        args.from_installed = True
    if args.from_installed:
        for r in requirements:
            pack_installed(r, args.out)
    wheels = sorted(p.name for p in args.out.glob("*.whl"))
    impure = [w for w in wheels if not w.endswith("-none-any.whl")]
    if impure:
        sys.exit(f"error: {', '.join(impure)} in {args.out} are not pure-Python wheels")
    print(f"{len(wheels)} wheels in {args.out}: {' '.join(wheels)}")
    print(f"on the GPU machine, from the checkout: bash scripts/gpu_check.sh --quick --wheels {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
