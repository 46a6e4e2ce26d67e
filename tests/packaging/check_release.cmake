# cmake -DSOURCE_DIR=<moekit> -DWORK_DIR=<dir> -P check_release.cmake
# The vcpkg port names a real release archive: its MOEKIT_RELEASE_SHA512 is a
# SHA512, not a placeholder, and where this clone has the tag v<version>, it
# is the SHA512 of the archive tools/make_release.sh makes from that tag.
cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/release_sha512.cmake")
include("${SOURCE_DIR}/cmake/moekit_version.cmake")  # -> MOEKIT_VERSION

set(portfile "${SOURCE_DIR}/packaging/vcpkg/moekit/portfile.cmake")
file(STRINGS "${portfile}" line REGEX "^set\\(MOEKIT_RELEASE_SHA512 \"[^\"]*\"\\)$")
if(NOT line MATCHES "\"([^\"]*)\"")
  message(FATAL_ERROR "${portfile}: no line set(MOEKIT_RELEASE_SHA512 \"...\")")
endif()
set(sha512 "${CMAKE_MATCH_1}")
check_release_sha512("${sha512}" "${portfile}")

set(tag "v${MOEKIT_VERSION}")
execute_process(COMMAND git -C "${SOURCE_DIR}" rev-parse --verify --quiet "refs/tags/${tag}"
                RESULT_VARIABLE no_tag OUTPUT_QUIET ERROR_QUIET)
if(no_tag)
  message(STATUS "moekit ${MOEKIT_VERSION}: this clone has no tag ${tag}; the port's SHA512 is "
                 "well formed but not checked against the archive")
  return()
endif()
file(REMOVE_RECURSE "${WORK_DIR}")
execute_process(COMMAND bash "${SOURCE_DIR}/tools/make_release.sh" --expect-tag --out "${WORK_DIR}" "${tag}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "tools/make_release.sh ${tag} failed (${rc}):\n${out}")
endif()
string(REGEX MATCH "[0-9a-f]+\n?$" archive_sha512 "${out}")
string(STRIP "${archive_sha512}" archive_sha512)
if(NOT archive_sha512 STREQUAL sha512)
  message(FATAL_ERROR "${portfile} names SHA512 ${sha512}, but the archive of ${tag} has "
                      "${archive_sha512}: run tools/make_release.sh --update-port packaging/vcpkg/moekit ${tag}")
endif()
message(STATUS "moekit ${MOEKIT_VERSION}: the vcpkg port names the archive of ${tag} (SHA512 ${sha512})")
