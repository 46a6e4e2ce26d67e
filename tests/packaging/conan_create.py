#!/usr/bin/env python3
"""`conan create packaging/conan`, offline, as CTest's packaging.conan_create.

In a private CONAN_HOME under the work directory (the user's own Conan cache
and settings are never touched): detect a default profile, remove every
remote, then create the package with packaging/conan/profiles/offline, which
takes Eigen and nlohmann_json from the system ([platform_requires]). `conan
create` also builds and runs packaging/conan/test_package (a copy, so that its
build folder lands here and not in the source tree) against the result. Then
the package's files and reference are checked.

Exits 77 (CTest: skipped) when no Conan 2 is installed; tools/bootstrap.sh
installs one, so CI runs the test.

With --with-cuda the package is made with -o "moekit/*:with_cuda=True" (the
CUDA toolkit installed, found by moekit's CMake itself), and test_package
also links and runs a program against moekit::cuda.

Usage: conan_create.py [--with-cuda] <moekit source dir> <work dir>
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

SKIP = 77


def find_conan() -> list[str] | None:
    """The command that runs Conan 2, or None."""
    candidates = []
    if shutil.which("conan"):
        candidates.append([shutil.which("conan")])
    # Installed into this Python without its script on PATH.
    candidates.append([sys.executable, "-m", "conans.conan"])
    for cmd in candidates:
        try:
            out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"Conan version (\d+)\.", out.stdout)
        if out.returncode == 0 and m and m.group(1) == "2":
            return cmd
    return None


def header_version(source: pathlib.Path) -> str:
    text = (source / "include" / "moekit" / "version.hpp").read_text()
    return ".".join(re.search(rf"#define MOEKIT_VERSION_{p} (\d+)", text).group(1)
                    for p in ("MAJOR", "MINOR", "PATCH"))


def main() -> int:
    args = sys.argv[1:]
    with_cuda = "--with-cuda" in args
    args = [a for a in args if a != "--with-cuda"]
    source = pathlib.Path(args[0]).resolve()
    work = pathlib.Path(args[1]).resolve()
    conan = find_conan()
    if conan is None:
        print("SKIPPED: Conan 2 is not installed (tools/bootstrap.sh installs it: "
              "python3 -m pip install 'conan>=2,<3')")
        return SKIP

    shutil.rmtree(work, ignore_errors=True)
    home = work / "conan-home"
    home.mkdir(parents=True)
    # Never wait for input; CONAN_HOME is private to this test.
    (home / "global.conf").write_text("core:non_interactive=True\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONAN_")}
    env["CONAN_HOME"] = str(home)

    def conan_run(what: str, *args: str, capture_json: bool = False) -> str:
        print(f"[conan] {what}: conan {' '.join(args)}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(conan + list(args), env=env, cwd=work, capture_output=True,
                              text=True)
        log = proc.stderr if capture_json else proc.stdout + proc.stderr
        (work / f"{what.replace(' ', '_')}.log").write_text(log)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr)
            raise SystemExit(f"[conan] {what} failed ({proc.returncode})")
        print(f"[conan] {what}: ok ({time.monotonic() - start:.1f} s)", flush=True)
        return proc.stdout if capture_json else log

    conan_run("profile detect", "profile", "detect", "--force")
    conan_run("remove remotes", "remote", "remove", "*")
    remotes = conan_run("list remotes", "remote", "list", "--format=json", capture_json=True)
    if json.loads(remotes or "[]"):
        raise SystemExit(f"[conan] remotes are left, the test would not be offline: {remotes}")

    recipe = source / "packaging" / "conan"
    profile = recipe / "profiles" / "offline"
    # test_package builds in its own folder (build/, CMakeUserPresets.json):
    # a copy of it here keeps the source tree as it was.
    test_package = work / "test_package"
    shutil.copytree(recipe / "test_package", test_package)
    before = sorted(p.relative_to(recipe) for p in recipe.rglob("*"))
    graph_json = conan_run("create", "create", str(recipe), f"--test-folder={test_package}",
                           f"--profile:host={profile}", f"--profile:build={profile}",
                           "--settings=build_type=Release", "--build=missing",
                           f"--options=moekit/*:with_cuda={with_cuda}",
                           "--format=json", capture_json=True)
    log = (work / "create.log").read_text()
    after = sorted(p.relative_to(recipe) for p in recipe.rglob("*"))
    if after != before:
        raise SystemExit(f"[conan] conan create wrote into the source tree: "
                         f"{sorted(set(map(str, after)) - set(map(str, before)))}")
    lines = re.findall(r"^.*moekit \S+ test_package: .*$", log, re.MULTILINE)
    if len(lines) != (2 if with_cuda else 1):
        print(log)
        raise SystemExit("[conan] test_package did not print its result(s)")
    for line in lines:
        print(line.strip())

    # The package: reference version from version.hpp, header-only layout,
    # moekit's own package config, the license.
    version = header_version(source)
    nodes = json.loads(graph_json)["graph"]["nodes"].values()
    pkg = [n for n in nodes if n.get("ref", "").startswith("moekit/")]
    if not pkg or pkg[0].get("ref", "").split("#")[0] != f"moekit/{version}":
        raise SystemExit(f"[conan] expected package moekit/{version}, graph has "
                         f"{[n.get('ref') for n in pkg]}")
    folder = pathlib.Path(pkg[0]["package_folder"])
    for must in ("include/moekit/moekit.hpp", "include/moekit/version.hpp",
                 "share/cmake/moekit/moekitConfig.cmake", "share/cmake/moekit/moekitTargets.cmake",
                 "licenses/LICENSE"):
        if not (folder / must).is_file():
            raise SystemExit(f"[conan] the package lacks {must} ({folder})")
    cuda_targets = "share/cmake/moekit/moekitCudaTargets.cmake"
    for must in ("share/cmake/moekit/moekitIoTargets.cmake",) + ((cuda_targets,) if with_cuda else ()):
        if not (folder / must).is_file():
            raise SystemExit(f"[conan] the package lacks {must} ({folder})")
    for must_not in ("lib", "bin") + (() if with_cuda else (cuda_targets,)):
        if (folder / must_not).exists():
            raise SystemExit(f"[conan] the header-only, with_cuda={with_cuda} package has {must_not}")
    print(f"[conan] moekit/{version}: package {pkg[0].get('package_id')} checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
