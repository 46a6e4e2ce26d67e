# cmake -DSOURCE_DIR=... -DPORT_DIR=... -DCONSUMER_DIR=... -DWORK_DIR=... -DGENERATOR=...
#       -DCXX_COMPILER=... [-DFEATURES=cuda -DCUDA_COMPILER=... -DCUDA_ARCHITECTURES=...]
#       -P vcpkg_port.cmake
#
# Runs packaging/vcpkg/moekit/portfile.cmake itself, offline, without vcpkg:
# the vcpkg helpers the port calls are defined here as functions that do what
# vcpkg documents for them (vcpkg_download_distfile, vcpkg_extract_source_archive,
# vcpkg_find_cuda, vcpkg_check_features, vcpkg_cmake_configure,
# vcpkg_cmake_install, vcpkg_cmake_config_fixup, vcpkg_install_copyright), so
# the download, configure options, feature options and config path are exactly
# the port's: nothing is copied out of the portfile, nothing can drift from it.
#
# The port's release route is taken, as a user's vcpkg takes it: first
# tools/make_release.sh makes the release archive of the checked-out tree
# (`git stash create`, so uncommitted edits of tracked files are in it) and
# writes its SHA512 into a copy of the port, as a release does. The emulated
# download then serves that archive from a local asset cache (no network) and,
# like vcpkg, refuses a placeholder SHA512 and a file whose SHA512 differs.
# With feature cuda, every folder holding an nvcc is taken off PATH first: the
# port must find the toolkit itself (vcpkg_find_cuda).
#
# Then, like vcpkg: post-build checks for a header-only port, the package
# copied from packages/ to installed/<triplet>/ (so nothing may remember the
# packages/ path), and tests/install/consumer built and run against it with
# find_package(moekit COMPONENTS io), CMAKE_PREFIX_PATH pointing at installed/<triplet>.

cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/release_sha512.cmake")

function(step what)
  message(STATUS "[vcpkg] ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[vcpkg] ${what} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

function(fail)
  string(JOIN "" msg ${ARGN})
  message(FATAL_ERROR "[vcpkg] ${msg}")
endfunction()

# ---- what vcpkg defines before it runs a portfile -----------------------------
file(READ "${PORT_DIR}/vcpkg.json" manifest)
string(JSON PORT GET "${manifest}" name)
string(JSON VERSION GET "${manifest}" version)
set(TARGET_TRIPLET x64-linux)
set(VCPKG_TARGET_IS_LINUX ON)
set(CURRENT_PACKAGES_DIR "${WORK_DIR}/packages/${PORT}_${TARGET_TRIPLET}")
set(CURRENT_BUILDTREES_DIR "${WORK_DIR}/buildtrees/${PORT}")
set(CURRENT_INSTALLED_DIR "${WORK_DIR}/installed/${TARGET_TRIPLET}")
set(DOWNLOADS "${WORK_DIR}/downloads")  # vcpkg's asset cache, filled by the release script
# FEATURES: "core" plus the requested ones, each declared by vcpkg.json.
set(requested ${FEATURES})
set(FEATURES core)
foreach(feature IN LISTS requested)
  string(JSON declared ERROR_VARIABLE missing GET "${manifest}" features ${feature})
  if(missing)
    fail("feature '${feature}' is not declared in vcpkg.json")
  endif()
  list(APPEND FEATURES ${feature})
endforeach()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${CURRENT_PACKAGES_DIR}" "${CURRENT_BUILDTREES_DIR}" "${DOWNLOADS}")

# ---- a release of the checked-out tree ----------------------------------------
execute_process(COMMAND git -C "${SOURCE_DIR}" stash create
                RESULT_VARIABLE rc OUTPUT_VARIABLE tree_commit OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT rc EQUAL 0)
  fail("${SOURCE_DIR} is not a git checkout: the release archive is made with git archive")
endif()
if(tree_commit STREQUAL "")
  set(tree_commit HEAD)  # nothing uncommitted
endif()
file(COPY "${PORT_DIR}/" DESTINATION "${WORK_DIR}/port")
step("release archive (tools/make_release.sh)" bash "${SOURCE_DIR}/tools/make_release.sh"
     --out "${DOWNLOADS}" --update-port "${WORK_DIR}/port" "${tree_commit}")
string(REGEX MATCH "[0-9a-f]+\n?$" release_sha512 "${step_output}")
string(STRIP "${release_sha512}" release_sha512)
file(STRINGS "${WORK_DIR}/port/portfile.cmake" hash_line REGEX "^set\\(MOEKIT_RELEASE_SHA512 ")
if(NOT hash_line STREQUAL "set(MOEKIT_RELEASE_SHA512 \"${release_sha512}\")")
  fail("make_release.sh --update-port did not write the archive's SHA512 into the port: ${hash_line}")
endif()

# ---- vcpkg's helpers, emulated -------------------------------------------------
function(vcpkg_from_github)
  fail("the port called vcpkg_from_github: releases are archives made by tools/make_release.sh")
endfunction()

# Like vcpkg: SHA512 is required and must be a real one (a placeholder such as
# 0 is refused), and the file must have it. The file comes from the asset
# cache (DOWNLOADS) under FILENAME; the URL must name that file.
function(vcpkg_download_distfile out)
  cmake_parse_arguments(PARSE_ARGV 1 arg "SKIP_SHA512;SILENT_EXIT;QUIET;ALWAYS_REDOWNLOAD"
                        "FILENAME;SHA512" "URLS;HEADERS;PATCHES")
  if(NOT arg_FILENAME OR NOT arg_URLS OR arg_UNPARSED_ARGUMENTS)
    fail("vcpkg_download_distfile: bad arguments '${ARGN}'")
  endif()
  if(arg_SKIP_SHA512)
    fail("vcpkg_download_distfile: SKIP_SHA512 is for development only, not for a port")
  endif()
  check_release_sha512("${arg_SHA512}" "[vcpkg] vcpkg_download_distfile of ${arg_FILENAME}")
  foreach(url IN LISTS arg_URLS)
    if(NOT url MATCHES "^https://.+/${arg_FILENAME}$")
      fail("vcpkg_download_distfile: URL '${url}' does not name ${arg_FILENAME} over https")
    endif()
  endforeach()
  set(file "${DOWNLOADS}/${arg_FILENAME}")
  if(NOT EXISTS "${file}")
    fail("vcpkg_download_distfile: ${arg_FILENAME} is not in the asset cache; offline, nothing else")
  endif()
  file(SHA512 "${file}" actual)
  if(NOT actual STREQUAL arg_SHA512)
    fail("vcpkg_download_distfile: ${arg_FILENAME} has SHA512 ${actual}, the port expects ${arg_SHA512}")
  endif()
  message(STATUS "[vcpkg] downloaded ${arg_FILENAME} (${arg_URLS}), SHA512 checked")
  set(${out} "${file}" PARENT_SCOPE)
endfunction()

# Extracts ARCHIVE under buildtrees/<port>/src and drops its single top folder.
function(vcpkg_extract_source_archive out)
  cmake_parse_arguments(PARSE_ARGV 1 arg "NO_REMOVE_ONE_LEVEL;SKIP_PATCH_CHECK;Z_ALLOW_OLD_PARAMETER_NAMES"
                        "ARCHIVE;SOURCE_BASE;BASE_DIRECTORY;WORKING_DIRECTORY" "PATCHES")
  if(NOT arg_ARCHIVE OR arg_UNPARSED_ARGUMENTS OR arg_PATCHES)
    fail("vcpkg_extract_source_archive: bad arguments '${ARGN}'")
  endif()
  set(tmp "${CURRENT_BUILDTREES_DIR}/src/extract")
  file(MAKE_DIRECTORY "${tmp}")
  file(ARCHIVE_EXTRACT INPUT "${arg_ARCHIVE}" DESTINATION "${tmp}")
  file(GLOB top LIST_DIRECTORIES true "${tmp}/*")
  list(LENGTH top n)
  if(NOT n EQUAL 1 OR NOT IS_DIRECTORY "${top}")
    fail("vcpkg_extract_source_archive: ${arg_ARCHIVE} does not hold one top folder: ${top}")
  endif()
  set(${out} "${top}" PARENT_SCOPE)
endfunction()

# The cuda port's helper: nvcc from CUDA_PATH, CUDA_HOME, CUDA_BIN_PATH,
# CUDA_TOOLKIT_ROOT_DIR or /usr/local/cuda-<major>.<minor>, never from PATH;
# sets NVCC (cache) and the toolkit's root.
function(vcpkg_find_cuda)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "OUT_CUDA_TOOLKIT_ROOT;OUT_CUDA_VERSION" "")
  if(NOT arg_OUT_CUDA_TOOLKIT_ROOT)
    fail("vcpkg_find_cuda: OUT_CUDA_TOOLKIT_ROOT is required")
  endif()
  file(GLOB versioned LIST_DIRECTORIES true "/usr/local/cuda-[0-9]*.[0-9]*")
  find_program(NVCC nvcc NO_DEFAULT_PATH PATH_SUFFIXES bin bin64
               PATHS ENV CUDA_PATH ENV CUDA_HOME ENV CUDA_BIN_PATH ENV CUDA_TOOLKIT_ROOT_DIR ${versioned})
  if(NOT NVCC)
    fail("vcpkg_find_cuda: no CUDA toolkit (CUDA_PATH, CUDA_HOME, /usr/local/cuda-<version>)")
  endif()
  cmake_path(GET NVCC PARENT_PATH bin)
  cmake_path(GET bin PARENT_PATH root)
  message(STATUS "[vcpkg] vcpkg_find_cuda: ${root}")
  set(${arg_OUT_CUDA_TOOLKIT_ROOT} "${root}" PARENT_SCOPE)
  set_property(GLOBAL PROPERTY vcpkg_cuda_root "${root}")
endfunction()

# FEATURES <feature> <option>...: -D<option>=ON for each requested feature, =OFF otherwise.
function(vcpkg_check_features)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "OUT_FEATURE_OPTIONS;PREFIX" "FEATURES;INVERTED_FEATURES")
  if(arg_UNPARSED_ARGUMENTS OR NOT arg_OUT_FEATURE_OPTIONS)
    fail("vcpkg_check_features: bad arguments '${ARGN}'")
  endif()
  set(options "")
  foreach(kind FEATURES INVERTED_FEATURES)
    set(pairs ${arg_${kind}})
    list(LENGTH pairs n)
    math(EXPR odd "${n} % 2")
    if(odd)
      fail("vcpkg_check_features: ${kind} needs <feature> <option> pairs, got '${pairs}'")
    endif()
    while(pairs)
      list(POP_FRONT pairs feature option)
      string(JSON declared ERROR_VARIABLE missing GET "${manifest}" features ${feature})
      if(missing)
        fail("vcpkg_check_features: feature '${feature}' is not declared in vcpkg.json")
      endif()
      set(on ON)
      set(off OFF)
      if(kind STREQUAL "INVERTED_FEATURES")
        set(on OFF)
        set(off ON)
      endif()
      if(feature IN_LIST FEATURES)
        list(APPEND options "-D${option}=${on}")
      else()
        list(APPEND options "-D${option}=${off}")
      endif()
    endwhile()
  endforeach()
  set(${arg_OUT_FEATURE_OPTIONS} "${options}" PARENT_SCOPE)
endfunction()

function(vcpkg_cmake_configure)
  cmake_parse_arguments(PARSE_ARGV 0 arg "WINDOWS_USE_MSBUILD;NO_CHARSET_FLAG;DISABLE_PARALLEL_CONFIGURE"
                        "SOURCE_PATH;GENERATOR;LOGFILE_BASE"
                        "OPTIONS;OPTIONS_DEBUG;OPTIONS_RELEASE;MAYBE_UNUSED_VARIABLES")
  if(NOT arg_SOURCE_PATH OR arg_UNPARSED_ARGUMENTS)
    fail("vcpkg_cmake_configure: bad arguments '${ARGN}'")
  endif()
  if(NOT VCPKG_BUILD_TYPE STREQUAL "release")
    fail("a header-only port builds the release configuration only (set(VCPKG_BUILD_TYPE release))")
  endif()
  set(port_options ${arg_OPTIONS} ${arg_OPTIONS_RELEASE})
  message(STATUS "[vcpkg] the port's configure options: ${port_options}")
  set(toolchain "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")  # no CUDA compiler: the port finds it
  set(build "${CURRENT_BUILDTREES_DIR}/${TARGET_TRIPLET}-rel")
  # The variables vcpkg itself passes around the port's options that bear on
  # an install (its toolchain file and compiler flags aside).
  step("configure (vcpkg_cmake_configure)" ${CMAKE_COMMAND} -S "${arg_SOURCE_PATH}" -B "${build}"
       -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_INSTALL_PREFIX=${CURRENT_PACKAGES_DIR}"
       -DFETCHCONTENT_FULLY_DISCONNECTED=ON ${port_options}
       -DCMAKE_EXPORT_NO_PACKAGE_REGISTRY=ON -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
       -DCMAKE_FIND_PACKAGE_NO_SYSTEM_PACKAGE_REGISTRY=ON -DCMAKE_INSTALL_SYSTEM_RUNTIME_LIBS_SKIP=TRUE
       -DCMAKE_ERROR_ON_ABSOLUTE_INSTALL_DESTINATION=ON
       -DCMAKE_INSTALL_LIBDIR:STRING=lib -DCMAKE_INSTALL_BINDIR:STRING=bin ${toolchain})
  # vcpkg warns about options the project ignores; a port's option that does
  # nothing is a bug, so here it fails.
  if(step_output MATCHES "Manually-specified variables were not used by the project:(.*)")
    set(unused "${CMAKE_MATCH_1}")
    foreach(opt IN LISTS port_options)
      if(NOT opt MATCHES "^-D([A-Za-z0-9_]+)")
        continue()
      endif()
      set(var "${CMAKE_MATCH_1}")
      if(NOT var IN_LIST arg_MAYBE_UNUSED_VARIABLES AND unused MATCHES "\n    ${var}\n")
        fail("the port passes ${opt}, which moekit's CMakeLists.txt does not use")
      endif()
    endforeach()
  endif()
  get_property(cuda_root GLOBAL PROPERTY vcpkg_cuda_root)
  if("cuda" IN_LIST FEATURES)
    file(STRINGS "${build}/CMakeCache.txt" nvcc REGEX "^CUDAToolkit_NVCC_EXECUTABLE:")
    if(NOT cuda_root OR NOT nvcc MATCHES "=${cuda_root}/bin/nvcc$")
      fail("feature cuda: moekit used ${nvcc}, not the toolkit vcpkg_find_cuda found (${cuda_root})")
    endif()
  endif()
  set_property(GLOBAL PROPERTY vcpkg_build_dir "${build}")
endfunction()

function(vcpkg_cmake_install)
  get_property(build GLOBAL PROPERTY vcpkg_build_dir)
  if(NOT build)
    fail("vcpkg_cmake_install before vcpkg_cmake_configure")
  endif()
  step("build and install (vcpkg_cmake_install)" ${CMAKE_COMMAND} --build "${build}" --target install)
endfunction()

# Moves <CONFIG_PATH>/* to share/<PACKAGE_NAME>, drops a parent directory named
# cmake, and corrects the relative paths the package files use to find the
# prefix, which now is a different number of levels up.
function(vcpkg_cmake_config_fixup)
  cmake_parse_arguments(PARSE_ARGV 0 arg "DO_NOT_DELETE_PARENT_CONFIG_PATH;NO_PREFIX_CORRECTION"
                        "PACKAGE_NAME;CONFIG_PATH;TOOLS_PATH" "")
  if(arg_UNPARSED_ARGUMENTS)
    fail("vcpkg_cmake_config_fixup: bad arguments '${ARGN}'")
  endif()
  if(NOT arg_PACKAGE_NAME)
    set(arg_PACKAGE_NAME "${PORT}")
  endif()
  if(NOT arg_CONFIG_PATH)
    set(arg_CONFIG_PATH "share/${arg_PACKAGE_NAME}")
  endif()
  set(from "${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH}")
  set(to_rel "share/${arg_PACKAGE_NAME}")
  set(to "${CURRENT_PACKAGES_DIR}/${to_rel}")
  if(NOT IS_DIRECTORY "${from}")
    fail("vcpkg_cmake_config_fixup: '${arg_CONFIG_PATH}' does not exist in the package "
         "(is CONFIG_PATH the directory moekit installs its package files to?)")
  endif()
  file(GLOB from_files "${from}/*")
  if(NOT from STREQUAL to)
    file(COPY ${from_files} DESTINATION "${to}")
    file(REMOVE_RECURSE "${from}")
    cmake_path(GET from PARENT_PATH parent)
    cmake_path(GET parent FILENAME parent_name)
    if(parent_name STREQUAL "cmake" AND NOT arg_DO_NOT_DELETE_PARENT_CONFIG_PATH)
      file(REMOVE_RECURSE "${parent}")
    endif()
  endif()
  if(arg_NO_PREFIX_CORRECTION)
    return()
  endif()
  # share/<name> is two levels below the prefix.
  string(REGEX MATCHALL "[^/]+" levels "${to_rel}")
  list(LENGTH levels depth)
  set(up_targets "")
  set(up_config "")
  foreach(i RANGE 1 ${depth})
    string(APPEND up_targets "\nget_filename_component(_IMPORT_PREFIX \"\${_IMPORT_PREFIX}\" PATH)")
    string(APPEND up_config "../")
  endforeach()
  file(GLOB cmake_files "${to}/*.cmake")
  foreach(f IN LISTS cmake_files)
    file(READ "${f}" text)
    string(REGEX REPLACE
      "(get_filename_component\\(_IMPORT_PREFIX \"\\\${CMAKE_CURRENT_LIST_FILE}\" PATH\\))(\nget_filename_component\\(_IMPORT_PREFIX \"\\\${_IMPORT_PREFIX}\" PATH\\))*"
      "\\1${up_targets}" text "${text}")
    string(REGEX REPLACE
      "(get_filename_component\\(PACKAGE_PREFIX_DIR \"\\\${CMAKE_CURRENT_LIST_DIR}/)(\\.\\./)*\""
      "\\1${up_config}\"" text "${text}")
    file(WRITE "${f}" "${text}")
  endforeach()
endfunction()

function(vcpkg_install_copyright)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "COMMENT" "FILE_LIST")
  if(NOT arg_FILE_LIST)
    fail("vcpkg_install_copyright: no FILE_LIST")
  endif()
  set(text "")
  foreach(f IN LISTS arg_FILE_LIST)
    if(NOT EXISTS "${f}")
      fail("vcpkg_install_copyright: '${f}' does not exist")
    endif()
    file(READ "${f}" part)
    string(APPEND text "${part}")
  endforeach()
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright" "${text}")
endfunction()

# ---- the port --------------------------------------------------------------------
if("cuda" IN_LIST FEATURES)
  # No nvcc on PATH: the port must locate the toolkit itself.
  string(REPLACE ":" ";" path_dirs "$ENV{PATH}")
  set(kept "")
  foreach(dir IN LISTS path_dirs)
    if(NOT EXISTS "${dir}/nvcc")
      list(APPEND kept "${dir}")
    endif()
  endforeach()
  string(REPLACE ";" ":" kept "${kept}")
  set(ENV{PATH} "${kept}")
  unset(ENV{CUDACXX})
endif()
message(STATUS "[vcpkg] ${PORT} ${VERSION}, features: ${FEATURES}")
include("${WORK_DIR}/port/portfile.cmake")

# ---- vcpkg's post-build checks that apply to a header-only port ------------------
set(pkg "${CURRENT_PACKAGES_DIR}")
foreach(must IN ITEMS include/moekit/moekit.hpp share/${PORT}/moekitConfig.cmake
                      share/${PORT}/moekitConfigVersion.cmake share/${PORT}/moekitTargets.cmake
                      share/${PORT}/moekitIoTargets.cmake share/${PORT}/copyright share/${PORT}/usage)
  if(NOT EXISTS "${pkg}/${must}")
    fail("post-build check: ${must} is missing from the package")
  endif()
endforeach()
foreach(must_not IN ITEMS lib bin debug share/cmake)
  if(EXISTS "${pkg}/${must_not}")
    fail("post-build check: a header-only package must not contain ${must_not}/")
  endif()
endforeach()
if("cuda" IN_LIST FEATURES AND NOT EXISTS "${pkg}/share/${PORT}/moekitCudaTargets.cmake")
  fail("post-build check: feature cuda requested, but moekitCudaTargets.cmake was not installed")
endif()
file(GLOB_RECURSE package_files "${pkg}/share/*")
foreach(f IN LISTS package_files)
  file(READ "${f}" text)
  string(FIND "${text}" "${pkg}" at)
  if(NOT at EQUAL -1)
    fail("post-build check: ${f} contains the absolute package path ${pkg}")
  endif()
endforeach()
file(READ "${pkg}/share/${PORT}/usage" usage)
if(NOT usage MATCHES "find_package\\(moekit CONFIG REQUIRED\\)" OR NOT usage MATCHES "moekit::moekit")
  fail("the usage file does not show find_package(moekit CONFIG REQUIRED) and moekit::moekit")
endif()

# vcpkg copies packages/<port>_<triplet>/ into installed/<triplet>/.
file(MAKE_DIRECTORY "${CURRENT_INSTALLED_DIR}")
file(GLOB pkg_entries "${pkg}/*")
file(COPY ${pkg_entries} DESTINATION "${CURRENT_INSTALLED_DIR}")
file(REMOVE_RECURSE "${pkg}")

# ---- a consumer, as the usage file tells ---------------------------------------
set(common -G "${GENERATOR}" -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release)
set(cuda OFF)
if("cuda" IN_LIST FEATURES)
  set(cuda ON)
  list(APPEND common "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}"
       "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}")
endif()
step("configure consumer" ${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer-build" ${common}
     -DMOEKIT_CONSUMER_MODE=find_package -DMOEKIT_CONSUMER_CUDA=${cuda} -DMOEKIT_CONSUMER_IO=ON
     "-DCMAKE_PREFIX_PATH=${CURRENT_INSTALLED_DIR}")
# The package found must be the one just installed, not another on the system.
file(STRINGS "${WORK_DIR}/consumer-build/CMakeCache.txt" found_dir REGEX "^moekit_DIR:")
if(NOT found_dir STREQUAL "moekit_DIR:PATH=${CURRENT_INSTALLED_DIR}/share/${PORT}")
  fail("the consumer found moekit elsewhere: ${found_dir}")
endif()
step("build consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
step("run consumer" "${WORK_DIR}/consumer-build/consumer")
message(STATUS "${step_output}")
step("run io consumer" "${WORK_DIR}/consumer-build/consumer_io" "${WORK_DIR}/consumer-build")
message(STATUS "${step_output}")
if(cuda)
  step("run CUDA consumer" "${WORK_DIR}/consumer-build/consumer_cuda")
  message(STATUS "${step_output}")
endif()
