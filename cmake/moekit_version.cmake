# Reads MOEKIT_VERSION_{MAJOR,MINOR,PATCH} from include/moekit/version.hpp,
# the one place the version is written, into MOEKIT_VERSION ("M.m.p").
file(READ "${CMAKE_CURRENT_LIST_DIR}/../include/moekit/version.hpp" _moekit_version_header)
foreach(_part MAJOR MINOR PATCH)
  if(NOT _moekit_version_header MATCHES "#define MOEKIT_VERSION_${_part} ([0-9]+)")
    message(FATAL_ERROR "moekit: MOEKIT_VERSION_${_part} not found in include/moekit/version.hpp")
  endif()
  set(_moekit_${_part} "${CMAKE_MATCH_1}")
endforeach()
set(MOEKIT_VERSION "${_moekit_MAJOR}.${_moekit_MINOR}.${_moekit_PATCH}")
unset(_moekit_version_header)
