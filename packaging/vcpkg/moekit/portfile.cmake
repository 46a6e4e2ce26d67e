# vcpkg port of moekit, a header-only C++20 library. Use it as an overlay port:
#   vcpkg install moekit --overlay-ports=<moekit>/packaging/vcpkg
#   vcpkg install "moekit[cuda]" --overlay-ports=<moekit>/packaging/vcpkg
#
# Sources: the release archive moekit-${VERSION}.tar.gz attached to the GitHub
# release v${VERSION}, made by tools/make_release.sh from the tag v${VERSION},
# which also writes its SHA512 below (docs/packaging.md#releases). Or a local
# moekit tree named by MOEKIT_SOURCE_DIR, set either in a triplet
# (set(MOEKIT_SOURCE_DIR ...)) or in the environment (vcpkg clears the
# environment of port builds, so also export VCPKG_KEEP_ENV_VARS=MOEKIT_SOURCE_DIR).
#
# tests/packaging/vcpkg_port.cmake runs this very file, offline, with vcpkg's
# helper functions emulated: what is written here is what the test builds.

set(VCPKG_BUILD_TYPE release)  # header-only: a debug configuration would install the same files

# Written by tools/make_release.sh --update-port: the SHA512 of moekit-${VERSION}.tar.gz.
set(MOEKIT_RELEASE_SHA512 "5f3bafa8ca267daf8ccdd1d2b9bbe8e51c03b47457f8f9b8b63e06b1b08d26376ebe262971c9f83125d5c564bc92ffdef8332921b5618dfa27514ac7b19c7de3")

if(NOT DEFINED MOEKIT_SOURCE_DIR AND DEFINED ENV{MOEKIT_SOURCE_DIR})
  set(MOEKIT_SOURCE_DIR "$ENV{MOEKIT_SOURCE_DIR}")
endif()
if(MOEKIT_SOURCE_DIR)
  if(NOT EXISTS "${MOEKIT_SOURCE_DIR}/include/moekit/version.hpp")
    message(FATAL_ERROR "MOEKIT_SOURCE_DIR='${MOEKIT_SOURCE_DIR}' is not a moekit source tree")
  endif()
  set(SOURCE_PATH "${MOEKIT_SOURCE_DIR}")
else()
  vcpkg_download_distfile(ARCHIVE
    URLS "https://github.com/moekit/moekit/releases/download/v${VERSION}/moekit-${VERSION}.tar.gz"
    FILENAME "moekit-${VERSION}.tar.gz"
    SHA512 "${MOEKIT_RELEASE_SHA512}"
  )
  vcpkg_extract_source_archive(SOURCE_PATH ARCHIVE "${ARCHIVE}")
endif()

vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    cuda MOEKIT_ENABLE_CUDA
)

# The CUDA toolkit, located by the cuda port's vcpkg_find_cuda (CUDA_PATH,
# CUDA_HOME, /usr/local/cuda-<version>), not by whatever nvcc is on PATH.
if("cuda" IN_LIST FEATURES)
  vcpkg_find_cuda(OUT_CUDA_TOOLKIT_ROOT cuda_toolkit_root)
  list(APPEND FEATURE_OPTIONS "-DCUDAToolkit_ROOT=${cuda_toolkit_root}")
endif()

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
