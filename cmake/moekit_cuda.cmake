# Decides whether moekit::cuda exists (MOEKIT_ENABLE_CUDA = AUTO/ON/OFF) and
# defines it. Sets MOEKIT_HAS_CUDA.
#
# moekit::cuda needs the CUDA toolkit (nvcc, cudart, cuBLAS, CCCL), not the
# CUDA language: detection is find_package(CUDAToolkit), which locates nvcc
# itself (CUDAToolkit_ROOT, CUDA_PATH, PATH, /usr/local/cuda) and compiles
# nothing. A consumer that compiles .cu files enables CUDA itself; only
# moekit's own tests, examples and benchmarks enable the language, in the
# top-level build. (Enabling it for an install would make CMake test the
# compiler with the caller's toolchain, e.g. a Conan toolchain's C++20, which
# CMake 3.25 cannot give nvcc.)

set(MOEKIT_HAS_CUDA OFF)
string(TOUPPER "${MOEKIT_ENABLE_CUDA}" _moekit_cuda_mode)
if(NOT _moekit_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MOEKIT_ENABLE_CUDA must be AUTO, ON or OFF, got '${MOEKIT_ENABLE_CUDA}'")
endif()

if(NOT _moekit_cuda_mode STREQUAL "OFF")
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    find_package(CCCL CONFIG QUIET
      HINTS "${CUDAToolkit_LIBRARY_DIR}/cmake" "${CUDAToolkit_LIBRARY_ROOT}/lib/cmake")
  endif()
  if(CUDAToolkit_FOUND AND CCCL_FOUND)
    set(MOEKIT_HAS_CUDA ON)
  elseif(_moekit_cuda_mode STREQUAL "ON" AND NOT CUDAToolkit_FOUND)
    message(FATAL_ERROR "MOEKIT_ENABLE_CUDA=ON, but no CUDA toolkit (nvcc, cudart, cuBLAS) was found. "
      "Set CUDAToolkit_ROOT to its folder (or put nvcc on PATH), or configure with "
      "-DMOEKIT_ENABLE_CUDA=AUTO or OFF.")
  elseif(_moekit_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "MOEKIT_ENABLE_CUDA=ON: the CUDA toolkit ${CUDAToolkit_VERSION} was found at "
      "${CUDAToolkit_BIN_DIR}, but not its CCCL (CUB, Thrust, libcu++) CMake package.")
  endif()
endif()
message(STATUS "moekit: CUDA backend ${MOEKIT_HAS_CUDA} (MOEKIT_ENABLE_CUDA=${MOEKIT_ENABLE_CUDA})")

if(MOEKIT_HAS_CUDA)
  add_library(moekit_cuda INTERFACE)
  add_library(moekit::cuda ALIAS moekit_cuda)
  set_target_properties(moekit_cuda PROPERTIES EXPORT_NAME cuda)
  target_link_libraries(moekit_cuda INTERFACE moekit CCCL::CCCL CUDA::cudart CUDA::cublas)

  # NCCL, for the GPU transport of expert parallelism (moekit/dist/nccl.cuh):
  # not part of the toolkit, looked for beside it. Only moekit's own NCCL
  # test uses it; a consumer links NCCL itself.
  find_path(MOEKIT_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
  find_library(MOEKIT_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR})
  set(MOEKIT_HAS_NCCL OFF)
  if(MOEKIT_NCCL_INCLUDE_DIR AND MOEKIT_NCCL_LIBRARY)
    set(MOEKIT_HAS_NCCL ON)
  endif()
  message(STATUS "moekit: NCCL transport ${MOEKIT_HAS_NCCL} (${MOEKIT_NCCL_LIBRARY})")

  # moekit's own CUDA targets; architectures are the project's default, never
  # a consumer's (they set CMAKE_CUDA_ARCHITECTURES themselves).
  if(PROJECT_IS_TOP_LEVEL AND (MOEKIT_BUILD_TESTS OR MOEKIT_BUILD_BENCHMARKS OR MOEKIT_BUILD_EXAMPLES))
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES "80;90" CACHE STRING "CUDA architectures for moekit's own targets")
    endif()
    if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
      set(CMAKE_CUDA_COMPILER "${CUDAToolkit_NVCC_EXECUTABLE}")  # the toolkit found above
    endif()
    enable_language(CUDA)
  endif()
endif()
unset(_moekit_cuda_mode)
