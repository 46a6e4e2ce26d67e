# Builds and runs a small program against the moekit package `conan create` made.
import os

from conan import ConanFile
from conan.tools.build import can_run
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout


class MoekitTestPackageConan(ConanFile):
    settings = "os", "arch", "compiler", "build_type"
    generators = "CMakeDeps"
    test_type = "explicit"

    def requirements(self):
        self.requires(self.tested_reference_str)

    def layout(self):
        cmake_layout(self)

    def _with_cuda(self):
        return bool(self.dependencies["moekit"].options.with_cuda)

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["MOEKIT_TEST_CUDA"] = self._with_cuda()
        tc.generate()

    def build(self):
        cmake = CMake(self)
        cmake.configure()
        cmake.build()

    def test(self):
        if can_run(self):
            self.run(os.path.join(self.cpp.build.bindir, "test_package"), env="conanrun")
            if self._with_cuda():
                self.run(os.path.join(self.cpp.build.bindir, "test_package_cuda"), env="conanrun")
