from setuptools import setup

# kernels/ is installed as the subpackage fastkd.kernels: no top-level module named "kernels" is ever installed.
setup(
    name="fastkd",
    version="0.1.0",
    description="Fast Spaced Knowledge Distillation: fused Triton KD loss, compiled steps, DALI data pipelines",
    python_requires=">=3.10",
    packages=["fastkd", "fastkd.analysis", "fastkd.data", "fastkd.models", "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    package_data={"fastkd.kernels": ["kd_loss_cpu.cpp"]},  # the CPU kernel's source, built on first use
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
                             "tensorboard>=2.14", "timm>=0.9", "mlxtend>=0.23"],
                    "study": ["matplotlib>=3.7"], "yaml": ["pyyaml>=6"], "tensorboard": ["tensorboard>=2.14"],
                    "timm": ["timm>=0.9"], "mnist": ["mlxtend>=0.23"]},
)
