# Decides whether moekit::mpi exists (MOEKIT_ENABLE_MPI = AUTO/ON/OFF) and
# defines it: the MPI transport of expert parallelism (moekit/dist/mpi.hpp)
# over find_package(MPI). moekit::moekit never depends on it, so CPU-only
# users need no MPI. Sets MOEKIT_HAS_MPI.
set(MOEKIT_ENABLE_MPI "AUTO" CACHE STRING "Provide moekit::mpi: AUTO (if MPI is found), ON, OFF")
set_property(CACHE MOEKIT_ENABLE_MPI PROPERTY STRINGS AUTO ON OFF)

set(MOEKIT_HAS_MPI OFF)
string(TOUPPER "${MOEKIT_ENABLE_MPI}" _moekit_mpi_mode)
if(NOT _moekit_mpi_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MOEKIT_ENABLE_MPI must be AUTO, ON or OFF, got '${MOEKIT_ENABLE_MPI}'")
endif()
if(NOT _moekit_mpi_mode STREQUAL "OFF")
  set(MPI_CXX_SKIP_MPICXX TRUE)  # the C API only; no deprecated C++ bindings
  if(_moekit_mpi_mode STREQUAL "ON")
    find_package(MPI COMPONENTS CXX REQUIRED)
  else()
    find_package(MPI COMPONENTS CXX QUIET)
  endif()
  if(MPI_CXX_FOUND)
    set(MOEKIT_HAS_MPI ON)
  endif()
endif()
message(STATUS "moekit: MPI transport ${MOEKIT_HAS_MPI} (MOEKIT_ENABLE_MPI=${MOEKIT_ENABLE_MPI})")

if(MOEKIT_HAS_MPI)
  add_library(moekit_mpi INTERFACE)
  add_library(moekit::mpi ALIAS moekit_mpi)
  set_target_properties(moekit_mpi PROPERTIES EXPORT_NAME mpi)
  target_link_libraries(moekit_mpi INTERFACE moekit MPI::MPI_CXX)
endif()

# moekit_add_mpirun_test(<name> <ranks> <target> [ARGS ...] [PROPERTIES ...])
# For moekit's own tests, examples and benchmarks: a CTest test that runs
# <target> under mpirun on <ranks> ranks of this machine. On one machine
# without a network (a CI container): 4 ranks on 2 cores need
# oversubscription, the ranks talk over shared memory (btl self,vader) and,
# as root, Open MPI wants its run-as-root consent. All of it is set through
# Open MPI's environment variables, which other MPIs ignore (a flag such as
# --oversubscribe would stop MPICH's mpiexec). The vader BTL's single-copy
# mechanism (CMA, process_vm_readv) is turned off: containers commonly
# forbid that ptrace-like access between processes, and Open MPI 4.1 then
# fails at the first large message instead of falling back to copies. The
# ranks are not bound to cores (Open MPI binds 2 ranks to a core each by
# default): on a machine shared with other jobs a bound rank waits for its
# one core while another is idle, which made the 50-step training run 4 to
# 5 times slower here. Each rank runs one OpenMP thread (the ranks share the
# cores).
function(moekit_add_mpirun_test name ranks target)
  cmake_parse_arguments(PARSE_ARGV 3 arg "" "" "ARGS;PROPERTIES")
  set(env OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
          OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
          OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none)
  add_test(NAME ${name}
    COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${MPIEXEC_PREFLAGS}
            $<TARGET_FILE:${target}> ${MPIEXEC_POSTFLAGS} ${arg_ARGS})
  set_tests_properties(${name} PROPERTIES ENVIRONMENT "${env}" TIMEOUT 120
                                          PROCESSORS ${ranks} ${arg_PROPERTIES})
endfunction()
unset(_moekit_mpi_mode)
