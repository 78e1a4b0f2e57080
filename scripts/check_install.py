"""Checks that scripts/bootstrap.sh left a complete install: every run-time requirement of every package it
installs (followed through their own requirements) is present at a fitting version, and each of them imports.

Packages installed with --no-deps are where a requirement goes missing silently (transformers without regex
once); this check finds it at install time instead of a test skipping later. The one requirement left out on
purpose is listed in DELIBERATE with the reason. Exit status 1 and one line per problem when anything is wrong.
Usage: python scripts/check_install.py
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement

# What bootstrap.sh installs, and the module each must import as.
INSTALLED = {
    "orw_fast": "orw_fast._C",
    "torch": "torch",
    "triton": "triton",
    "torchcfm": "torchcfm",
    "torchdiffeq": "torchdiffeq",
    "transformers": "transformers",
    "diffusers": "diffusers",
    "peft": "peft",
    "nvidia-dali-cuda130": "nvidia.dali",
    "pytest": "pytest",
    "pytest-benchmark": "pytest_benchmark",
}
# (package, requirement) pairs not installed on purpose.
DELIBERATE = {
    ("torchcfm", "torchdyn"): "torchdyn pulls torchvision and a newer (CUDA) torch; orw_fast uses none of it",
}


def _name(text: str) -> str:
    return text.lower().replace("_", "-")


def problems() -> list[str]:
    found, seen, todo = [], set(), [(_name(p), None) for p in INSTALLED]
    while todo:
        package, wanted_by = todo.pop()
        if package in seen:
            continue
        seen.add(package)
        try:
            dist = distribution(package)
        except PackageNotFoundError:
            found.append(f"{package} is not installed" + (f" (required by {wanted_by})" if wanted_by else ""))
            continue
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or another platform's
            if (_name(package), _name(req.name)) in DELIBERATE:
                continue
            try:
                version = distribution(req.name).version
            except PackageNotFoundError:
                found.append(f"{req.name} is not installed (required by {package}: {text})")
                continue
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                found.append(f"{req.name} {version} does not satisfy {package}'s requirement {text}")
            todo.append((_name(req.name), package))
    for package, module in INSTALLED.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any import failure is an incomplete install
            found.append(f"import {module} (package {package}) fails: {type(err).__name__}: {err}")
    return found


if __name__ == "__main__":
    bad = problems()
    for line in bad:
        print(f"check_install: {line}", file=sys.stderr)
    if bad:
        sys.exit(1)
    print(
        f"check_install: complete ({len(INSTALLED)} packages and all they need at run time; left out on purpose: "
        + "; ".join(f"{p} -> {r} ({why})" for (p, r), why in DELIBERATE.items())
        + ")"
    )
