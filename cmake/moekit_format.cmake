# cmake -DCLANG_FORMAT=<exe> -DSOURCE_DIR=<repo> -DMODE=check|fix -P moekit_format.cmake
# Checks (or fixes) the formatting of every C++ and CUDA file in the repo.
file(GLOB_RECURSE files
  "${SOURCE_DIR}/include/*.hpp" "${SOURCE_DIR}/include/*.cuh"
  "${SOURCE_DIR}/tests/*.cpp" "${SOURCE_DIR}/tests/*.cu" "${SOURCE_DIR}/tests/*.hpp" "${SOURCE_DIR}/tests/*.cuh"
  "${SOURCE_DIR}/examples/*.cpp" "${SOURCE_DIR}/examples/*.cu"
  "${SOURCE_DIR}/bench/*.cpp" "${SOURCE_DIR}/bench/*.cu" "${SOURCE_DIR}/bench/*.hpp" "${SOURCE_DIR}/bench/*.cuh"
  "${SOURCE_DIR}/packaging/*.cpp")
list(LENGTH files count)
if(MODE STREQUAL "fix")
  execute_process(COMMAND "${CLANG_FORMAT}" -i --style=file ${files} RESULT_VARIABLE rc)
else()
  execute_process(COMMAND "${CLANG_FORMAT}" --dry-run --Werror --style=file ${files}
                  RESULT_VARIABLE rc ERROR_VARIABLE diagnostics)
  if(NOT rc EQUAL 0)
    message("${diagnostics}")
    message(FATAL_ERROR "clang-format: files above are not formatted; run `cmake --build <build> --target format`")
  endif()
  message(STATUS "clang-format: ${count} files formatted correctly")
endif()
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "clang-format failed (${rc})")
endif()
