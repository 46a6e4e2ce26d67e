# Helpers shipped with the package. Nothing here runs by itself: a consumer
# calls a helper for its own targets, so moekit never forces flags on anyone.

# moekit_target_cuda_cxx20(<target>)
#   Compiles the target's CUDA sources as C++20, which moekit's headers need.
#   CMake learned `cuda_std_20` for nvcc only in later releases; where the
#   running CMake does not know it, the flag is passed directly.
function(moekit_target_cuda_cxx20 target)
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    target_compile_features(${target} PRIVATE cuda_std_20)
  else()
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  endif()
endfunction()
