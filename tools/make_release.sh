#!/usr/bin/env bash
# Makes moekit's release source archive for a git ref and its SHA512, the
# numbers the vcpkg port and FetchContent users pin to (docs/packaging.md#releases).
#
#   tools/make_release.sh [--out DIR] [--update-port PORT_DIR] [--expect-tag] [REF]
#
# REF (default: the tag v<version>, version from include/moekit/version.hpp
# at HEAD) is archived with `git archive` as moekit-<version>.tar.gz, every
# file under the top folder moekit-<version>/, and compressed with `gzip -n`,
# so the same commit always gives the same bytes. Writes into DIR (default
# build/release):
#   moekit-<version>.tar.gz          the archive, to attach to the release v<version>
#   moekit-<version>.tar.gz.sha512   its SHA512, in sha512sum's format
# and prints the SHA512 on the last line of its output.
#
# --update-port PORT_DIR  writes the SHA512 into PORT_DIR/portfile.cmake (the
#                         line `set(MOEKIT_RELEASE_SHA512 ...)`), as a release does
#                         for packaging/vcpkg/moekit
# --expect-tag            fail unless REF is the tag v<version> of the version REF
#                         itself declares (what a release must be)
#
# The version comes from include/moekit/version.hpp at REF, and
# packaging/vcpkg/moekit/vcpkg.json at REF must carry the same one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out="build/release"
port_dir=""
expect_tag=0
ref=""
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --update-port) port_dir="$2"; shift 2 ;;
    --expect-tag) expect_tag=1; shift ;;
    -h | --help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "make_release: unknown option $1" >&2; exit 2 ;;
    *) ref="$1"; shift ;;
  esac
done

die() { echo "make_release: $*" >&2; exit 1; }

git rev-parse --git-dir >/dev/null 2>&1 || die "$(pwd) is not a git checkout"

version_at() {  # the M.m.p of include/moekit/version.hpp at $1
  local header
  header="$(git show "$1:include/moekit/version.hpp")" || return 1
  local parts=()
  for part in MAJOR MINOR PATCH; do
    parts+=("$(sed -n "s/^#define MOEKIT_VERSION_${part} \([0-9][0-9]*\)$/\1/p" <<<"$header")")
  done
  [[ -n ${parts[0]} && -n ${parts[1]} && -n ${parts[2]} ]] || return 1
  echo "${parts[0]}.${parts[1]}.${parts[2]}"
}

if [[ -z $ref ]]; then
  ref="v$(version_at HEAD)" || die "no version in include/moekit/version.hpp"
fi
commit="$(git rev-parse --verify --quiet "${ref}^{commit}")" ||
  die "no commit named '${ref}' (a release is made from its tag: git tag -a v<version>)"
version="$(version_at "$commit")" || die "${ref}: no version in include/moekit/version.hpp"

manifest_version="$(git show "${commit}:packaging/vcpkg/moekit/vcpkg.json" |
  sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p')"
[[ $manifest_version == "$version" ]] ||
  die "${ref}: packaging/vcpkg/moekit/vcpkg.json says ${manifest_version}, version.hpp ${version}"
if ((expect_tag)); then
  [[ $ref == "v${version}" ]] || die "${ref} is not the tag v${version} of the version it declares"
  [[ "$(git cat-file -t "refs/tags/${ref}" 2>/dev/null)" == tag ]] ||
    die "${ref} is not an annotated tag (git tag -a ${ref})"
fi

name="moekit-${version}"
mkdir -p "$out"
archive="${out}/${name}.tar.gz"
# tar from git (file order, modes and times fixed by the commit), then gzip
# without a name or time stamp: the bytes depend on the commit alone.
git -c core.autocrlf=false archive --format=tar --prefix="${name}/" "$commit" | gzip -n -9 >"$archive"
sha512="$(sha512sum "$archive" | cut -d' ' -f1)"
(cd "$out" && sha512sum "${name}.tar.gz" >"${name}.tar.gz.sha512")

if [[ -n $port_dir ]]; then
  portfile="${port_dir}/portfile.cmake"
  grep -q '^set(MOEKIT_RELEASE_SHA512 "[0-9a-f]*")' "$portfile" ||
    die "${portfile} has no line set(MOEKIT_RELEASE_SHA512 \"...\")"
  sed -i "s/^set(MOEKIT_RELEASE_SHA512 \"[0-9a-f]*\")/set(MOEKIT_RELEASE_SHA512 \"${sha512}\")/" "$portfile"
  echo "make_release: ${portfile} now names ${name}.tar.gz"
fi

echo "make_release: ${ref} (${commit:0:12}) -> ${archive}, $(stat -c %s "$archive") bytes"
echo "$sha512"
