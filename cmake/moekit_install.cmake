# Install rules: headers, one export set per component, a relocatable package
# config and its version file. Header-only, so everything lands under share/.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(MOEKIT_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/moekit"
    CACHE STRING "Where moekit's CMake package files are installed")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")

install(TARGETS moekit EXPORT moekitTargets)
install(EXPORT moekitTargets NAMESPACE moekit:: DESTINATION "${MOEKIT_INSTALL_CMAKEDIR}")
if(MOEKIT_HAS_IO)
  install(TARGETS moekit_io EXPORT moekitIoTargets)
  install(EXPORT moekitIoTargets NAMESPACE moekit:: DESTINATION "${MOEKIT_INSTALL_CMAKEDIR}")
endif()
if(MOEKIT_HAS_MPI)
  install(TARGETS moekit_mpi EXPORT moekitMpiTargets)
  install(EXPORT moekitMpiTargets NAMESPACE moekit:: DESTINATION "${MOEKIT_INSTALL_CMAKEDIR}")
endif()
if(MOEKIT_HAS_CUDA)
  install(TARGETS moekit_cuda EXPORT moekitCudaTargets)
  install(EXPORT moekitCudaTargets NAMESPACE moekit:: DESTINATION "${MOEKIT_INSTALL_CMAKEDIR}")
endif()

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/moekitConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/moekitConfig.cmake"
  INSTALL_DESTINATION "${MOEKIT_INSTALL_CMAKEDIR}")
# 0.x: a minor release may break the API, so only the same minor is compatible.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/moekitConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES
  "${PROJECT_BINARY_DIR}/moekitConfig.cmake"
  "${PROJECT_BINARY_DIR}/moekitConfigVersion.cmake"
  "${PROJECT_SOURCE_DIR}/cmake/moekitHelpers.cmake"
  DESTINATION "${MOEKIT_INSTALL_CMAKEDIR}")
