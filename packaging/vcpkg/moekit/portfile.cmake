# vcpkg port of moekit, a header-only C++20 library. Use it as an overlay port:
#   vcpkg install moekit --overlay-ports=<moekit>/packaging/vcpkg
#   vcpkg install "moekit[cuda]" --overlay-ports=<moekit>/packaging/vcpkg
#
# Sources: the GitHub release v${VERSION} by default, or a local moekit tree
# named by MOEKIT_SOURCE_DIR, set either in a triplet (set(MOEKIT_SOURCE_DIR ...))
# or in the environment (vcpkg clears the environment of port builds, so also
# export VCPKG_KEEP_ENV_VARS=MOEKIT_SOURCE_DIR).
#
# tests/packaging/vcpkg_port.cmake runs this very file, offline, with vcpkg's
# helper functions emulated: what is written here is what the test builds.

set(VCPKG_BUILD_TYPE release)  # header-only: a debug configuration would install the same files

if(NOT DEFINED MOEKIT_SOURCE_DIR AND DEFINED ENV{MOEKIT_SOURCE_DIR})
  set(MOEKIT_SOURCE_DIR "$ENV{MOEKIT_SOURCE_DIR}")
endif()
if(MOEKIT_SOURCE_DIR)
  if(NOT EXISTS "${MOEKIT_SOURCE_DIR}/include/moekit/version.hpp")
    message(FATAL_ERROR "MOEKIT_SOURCE_DIR='${MOEKIT_SOURCE_DIR}' is not a moekit source tree")
  endif()
  set(SOURCE_PATH "${MOEKIT_SOURCE_DIR}")
else()
  vcpkg_from_github(
    OUT_SOURCE_PATH SOURCE_PATH
    REPO moekit/moekit
    REF "v${VERSION}"
    # Set when v${VERSION} is tagged; vcpkg prints the tarball's real hash when this one is wrong.
    SHA512 0
    HEAD_REF main
  )
endif()

vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    cuda MOEKIT_ENABLE_CUDA
)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    -DMOEKIT_BUILD_TESTS=OFF
    -DMOEKIT_BUILD_EXAMPLES=OFF
    -DMOEKIT_BUILD_BENCHMARKS=OFF
    -DMOEKIT_INSTALL=ON
    ${FEATURE_OPTIONS}
)
vcpkg_cmake_install()

# moekit installs its package files to share/cmake/moekit (MOEKIT_INSTALL_CMAKEDIR);
# vcpkg wants them in share/moekit.
vcpkg_cmake_config_fixup(CONFIG_PATH share/cmake/moekit)

# Header-only: no libraries, and nothing of a debug build.
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/debug" "${CURRENT_PACKAGES_DIR}/lib")

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
