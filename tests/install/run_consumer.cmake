# cmake -DMODE=... -DSOURCE_DIR=... -DCONSUMER_DIR=... -DWORK_DIR=... -DGENERATOR=...
#       -DCXX_COMPILER=... [-DCUDA_COMPILER=... -DCUDA_ARCHITECTURES=...] -P run_consumer.cmake
# Builds and runs the consumer project against moekit in one of the ways a
# user would take it. Fails on the first step that fails, showing its output.

function(step what)
  message(STATUS "[${MODE}] ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[${MODE}] ${what} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(common -G "${GENERATOR}" -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release)
set(cuda_mode OFF)
if(MODE MATCHES "cuda")
  set(cuda_mode ON)
  list(APPEND common -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}
       "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}")
endif()
set(mpi_mode OFF)
if(MODE MATCHES "mpi")
  set(mpi_mode ON)
endif()
set(consumer_args -DMOEKIT_CONSUMER_CUDA=${cuda_mode} -DMOEKIT_CONSUMER_MPI=${mpi_mode})

if(MODE MATCHES "^find_package")
  # Install into a staging prefix, then move the prefix: the package must not
  # remember where it was installed.
  step("configure moekit" ${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/moekit-build" ${common}
       -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_EXAMPLES=OFF -DMOEKIT_BUILD_BENCHMARKS=OFF
       -DMOEKIT_INSTALL=ON -DMOEKIT_ENABLE_CUDA=${cuda_mode}
       "-DCMAKE_INSTALL_PREFIX=${WORK_DIR}/staging")
  step("install moekit" ${CMAKE_COMMAND} --install "${WORK_DIR}/moekit-build")
  file(RENAME "${WORK_DIR}/staging" "${WORK_DIR}/relocated")
  list(APPEND consumer_args -DMOEKIT_CONSUMER_MODE=find_package
       "-DCMAKE_PREFIX_PATH=${WORK_DIR}/relocated")

  # An unknown component must be refused, naming it.
  execute_process(COMMAND ${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/bogus-build" ${common}
                  ${consumer_args} -DMOEKIT_CONSUMER_COMPONENT=bogus
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(rc EQUAL 0 OR NOT out MATCHES "unknown component 'bogus'")
    message(FATAL_ERROR "[${MODE}] find_package(moekit COMPONENTS bogus) was not refused:\n${out}")
  endif()
  list(APPEND consumer_args -DMOEKIT_CONSUMER_IO=ON)
elseif(MODE STREQUAL "add_subdirectory")
  # A CPU-only user: no nlohmann_json on the machine, and no CUDA wanted.
  list(APPEND consumer_args -DMOEKIT_CONSUMER_MODE=${MODE} "-DMOEKIT_SOURCE_DIR=${SOURCE_DIR}"
       -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON)
else()
  list(APPEND consumer_args -DMOEKIT_CONSUMER_MODE=${MODE} "-DMOEKIT_SOURCE_DIR=${SOURCE_DIR}"
       -DMOEKIT_CONSUMER_IO=ON)
endif()

step("configure consumer" ${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer-build"
     ${common} ${consumer_args})
if(NOT MODE MATCHES "^find_package")
  # As a subproject moekit looks for no CUDA unless asked (MOEKIT_ENABLE_CUDA is OFF there).
  if(NOT step_output MATCHES "moekit: CUDA backend OFF \\(MOEKIT_ENABLE_CUDA=OFF\\)")
    message(FATAL_ERROR "[${MODE}] moekit as a subproject did not default to MOEKIT_ENABLE_CUDA=OFF:\n${step_output}")
  endif()
  file(STRINGS "${WORK_DIR}/consumer-build/CMakeCache.txt" cuda_search REGEX "^CUDAToolkit_")
  if(cuda_search)
    message(FATAL_ERROR "[${MODE}] moekit as a subproject looked for CUDA: ${cuda_search}")
  endif()
endif()
step("build consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
step("run consumer" "${WORK_DIR}/consumer-build/consumer")
message(STATUS "${step_output}")
if(EXISTS "${WORK_DIR}/consumer-build/consumer_io")
  step("run io consumer" "${WORK_DIR}/consumer-build/consumer_io" "${WORK_DIR}/consumer-build")
  message(STATUS "${step_output}")
elseif(NOT MODE STREQUAL "add_subdirectory")
  message(FATAL_ERROR "[${MODE}] the io consumer was not built")
endif()
if(cuda_mode)
  step("run CUDA consumer" "${WORK_DIR}/consumer-build/consumer_cuda")
  message(STATUS "${step_output}")
endif()
if(mpi_mode)
  # One rank, without mpirun (an MPI singleton); Open MPI wants consent as root.
  step("run MPI consumer" ${CMAKE_COMMAND} -E env OMPI_ALLOW_RUN_AS_ROOT=1
       OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader
       "${WORK_DIR}/consumer-build/consumer_mpi")
  message(STATUS "${step_output}")
endif()
