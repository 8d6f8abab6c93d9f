"""Machine facts for reports (parity.json `environment`, bench.json `machine`). Torch-free."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path


def package_versions(packages) -> dict[str, str]:
    """Installed versions of the given distributions (absent ones left out)."""
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
