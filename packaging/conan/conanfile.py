# Conan 2 recipe for moekit, a header-only C++20 library.
#   conan create packaging/conan -s compiler.cppstd=20        # moekit::moekit
#   conan create packaging/conan -s compiler.cppstd=20 -o "moekit/*:with_cuda=True"
#                                               # also moekit::cuda (CUDA toolkit on the system)
# tests/packaging/conan_create.py runs `conan create` on it offline, with
# profiles/offline (see docs/packaging.md).
import os
import re

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeDeps, CMakeToolchain, cmake_layout
from conan.tools.files import copy, load

required_conan_version = ">=2.0"


class MoekitConan(ConanFile):
    name = "moekit"
    description = ("Header-only C++20 Mixture-of-Experts and adapter components: routing, load "
                   "balancing, dispatch and combine, expert FFNs, LoRA adapters and task heads, "
                   "on the CPU (Eigen) and CUDA")
    license = "Apache-2.0"
    topics = ("mixture-of-experts", "moe", "lora", "deep-learning", "eigen", "cuda", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {"with_cuda": [True, False]}
    default_options = {"with_cuda": False}
    no_copy_source = True

    # The recipe lives in packaging/conan/ of moekit's tree; the sources are two
    # levels up. The exports_sources attribute cannot reach outside the recipe's
    # folder, so export_sources() copies what the install needs.
    _source_root = os.path.join("..", "..")

    def set_version(self):
        # The version is written once, in include/moekit/version.hpp.
        if self.version:
            return
        header = load(self, os.path.join(self.recipe_folder, self._source_root,
                                         "include", "moekit", "version.hpp"))
        parts = []
        for part in ("MAJOR", "MINOR", "PATCH"):
            m = re.search(rf"#define MOEKIT_VERSION_{part} (\d+)", header)
            parts.append(m.group(1))
        self.version = ".".join(parts)

    def export_sources(self):
        root = os.path.join(self.recipe_folder, self._source_root)
        for pattern in ("CMakeLists.txt", "LICENSE", "cmake/*", "include/*"):
            copy(self, pattern, root, self.export_sources_folder)

    def layout(self):
        cmake_layout(self)

    def requirements(self):
        # Public headers include Eigen's and nlohmann/json's: consumers need them too.
        self.requires("eigen/3.4.0", transitive_headers=True)
        self.requires("nlohmann_json/3.11.2", transitive_headers=True)

    def validate(self):
        check_min_cppstd(self, 20)

    def package_id(self):
        # Header-only: one package serves every compiler, architecture, build
        # type and dependency version. with_cuda stays in the id: it decides
        # whether the package ships moekit::cuda (moekitCudaTargets.cmake).
        self.info.settings.clear()
        self.info.requires.clear()

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["MOEKIT_BUILD_TESTS"] = False
        tc.cache_variables["MOEKIT_BUILD_EXAMPLES"] = False
        tc.cache_variables["MOEKIT_BUILD_BENCHMARKS"] = False
        tc.cache_variables["MOEKIT_INSTALL"] = True
        tc.cache_variables["MOEKIT_ENABLE_CUDA"] = "ON" if self.options.with_cuda else "OFF"
        tc.generate()
        CMakeDeps(self).generate()

    def build(self):
        # Nothing to compile: configuring generates the package config files.
        cmake = CMake(self)
        cmake.configure()

    def package(self):
        copy(self, "LICENSE", self.source_folder, os.path.join(self.package_folder, "licenses"))
        cmake = CMake(self)
        cmake.install()

    def package_info(self):
        # CMake consumers get moekit's own installed package config
        # (share/cmake/moekit/moekitConfig.cmake) rather than one CMakeDeps would
        # generate: cmake_find_mode "none", and that folder on CMAKE_PREFIX_PATH
        # through builddirs. This is the more robust choice because the installed
        # config is the one find_package, the vcpkg port and their tests use, and
        # it carries what generated files would lose or have to repeat by hand:
        # cxx_std_20 as a compile feature, the Eigen >= 3.4 check, the optional
        # `cuda` component (CUDAToolkit, CCCL, moekit::cuda) with its error
        # messages, and moekit_target_cuda_cxx20() from moekitHelpers.cmake. It is
        # relocatable (tests/install moves it), so it works from the Conan cache.
        # Its find_dependency(Eigen3 / nlohmann_json) calls are answered by the
        # files CMakeDeps generates for those two, or by the system's packages
        # where a profile's [platform_requires] provides them.
        config_dir = os.path.join("share", "cmake", "moekit")
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.set_property("cmake_file_name", "moekit")
        self.cpp_info.set_property("cmake_target_name", "moekit::moekit")
        self.cpp_info.builddirs = [config_dir]
        # Header-only. includedirs keeps its default (include) for other generators.
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
