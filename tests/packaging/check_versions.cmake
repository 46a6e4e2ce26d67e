# cmake -DSOURCE_DIR=<moekit> -P check_versions.cmake
# The version is written once, in include/moekit/version.hpp. The vcpkg port's
# manifest must repeat it (vcpkg reads it from there); the Conan recipe reads
# the header itself (set_version), so it cannot disagree.
cmake_minimum_required(VERSION 3.25)
include("${SOURCE_DIR}/cmake/moekit_version.cmake")  # -> MOEKIT_VERSION

set(manifest_path "${SOURCE_DIR}/packaging/vcpkg/moekit/vcpkg.json")
file(READ "${manifest_path}" manifest)
string(JSON name ERROR_VARIABLE err GET "${manifest}" name)
if(err)
  message(FATAL_ERROR "${manifest_path}: ${err}")
endif()
string(JSON version ERROR_VARIABLE err GET "${manifest}" version)
if(err)
  message(FATAL_ERROR "${manifest_path}: no \"version\" field (${err})")
endif()
if(NOT name STREQUAL "moekit")
  message(FATAL_ERROR "${manifest_path}: name is '${name}', expected 'moekit'")
endif()
if(NOT version STREQUAL MOEKIT_VERSION)
  message(FATAL_ERROR "${manifest_path} says version ${version}, include/moekit/version.hpp says "
    "${MOEKIT_VERSION}: set \"version\" to ${MOEKIT_VERSION} (and reset \"port-version\", if any)")
endif()

# Each library moekit::moekit links must be a dependency of the port.
string(JSON n LENGTH "${manifest}" dependencies)
math(EXPR last "${n} - 1")
set(deps "")
foreach(i RANGE ${last})
  string(JSON dep GET "${manifest}" dependencies ${i})
  string(JSON dep_name ERROR_VARIABLE not_object GET "${dep}" name)
  if(not_object)
    set(dep_name "${dep}")
  endif()
  list(APPEND deps "${dep_name}")
endforeach()
foreach(needed IN ITEMS eigen3 nlohmann-json vcpkg-cmake vcpkg-cmake-config)
  if(NOT needed IN_LIST deps)
    message(FATAL_ERROR "${manifest_path}: dependency '${needed}' is missing (has: ${deps})")
  endif()
endforeach()
message(STATUS "moekit ${MOEKIT_VERSION}: version.hpp and the vcpkg manifest agree")
