"""megatron_spin: Online DPO / SPIN on Megatron-core with an SGLang rollout fleet.

``install_requires`` names ranges that any torch >= 2.6 satisfies, so it never chooses a torch
build for you: the CPU set-up (``bash tools/setup_venv.sh``) pins the CPU wheel through
``constraints/cpu.txt``; a GPU install brings its CUDA torch first, or takes the one SGLang pins.
GPU-only pieces are extras whose versions resolve together (README, "Installing on GPU machines"):

    sglang  SGLang 0.5.23 (pins torch 2.14.1, transformers 5.19.0; Python >= 3.11)
    te      TransformerEngine 2.11 for CUDA 13 (megatron-core 0.16.1's tested range); its PyTorch
            extension has no wheel on PyPI and compiles (nvcc + cuDNN, --no-build-isolation) —
            or use an NGC PyTorch container, which ships TE
    dev     the test tools
"""

from setuptools import find_packages, setup

setup(
    name="megatron_spin",
    version="0.1.0",
    description="Online DPO / SPIN trainer on Megatron-core with SGLang rollouts",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # enum.StrEnum
    packages=find_packages(include=["megatron_spin", "megatron_spin.*"]),
    include_package_data=True,
    package_data={"megatron_spin.config.conf": ["*.yaml", "*/*.yaml"]},
    entry_points={"console_scripts": ["megatron-spin-train = megatron_spin.main:main",
                                      "megatron-spin-serve = megatron_spin.serve:main"]},
    install_requires=[
        "torch>=2.6",  # megatron-core 0.16.1's floor; the CPU set-up pins 2.13.0+cpu (constraints/cpu.txt)
        "megatron-core==0.16.1",  # what platform/cpu_patches.py and the converters are written against
        "packaging>=24.2",  # undeclared by some megatron-core builds, imported at `import megatron.core`
        "psutil>=5.9",  # undeclared by megatron-core, needed by its checkpoint writer
        "numpy>=1.26",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "gguf>=0.10",  # reads the embedded model's GGUF
        "accelerate>=1.0",
        "hydra-core>=1.3,<1.4",
        "ray[default]>=2.40",
        "wandb>=0.18",
        # The embedded rollout engine (SGLang's HTTP API on the CPU) and the engine client.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "requests>=2.31",
        # Rewards and data that ship in packages (the embedded default uses VADER).
        "vaderSentiment>=3.3.2",
        "reasoning-gym>=0.1.19",
        "pyarrow>=14",  # Parquet prompt files
        # Logging and run reports.
        "tensorboard>=2.16",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        # The rollout fleet on GPUs (pins torch 2.14.1 CUDA 13.0, driver >= 580).  0.5.20-0.5.22 pin a
        # `cuda-tile` stub that downloads from NVIDIA's index at build time: not installable from PyPI.
        "sglang": ["sglang==0.5.23"],
        # TransformerEngine (FP8 GEMMs, the TE layer spec) in megatron-core 0.16.1's tested range.  The
        # PyTorch part is sdist-only: install it after torch with --no-build-isolation on a host with
        # nvcc and cuDNN (README), or use the TE an NGC container ships.  Unverified on GPU here.
        "te": ["transformer-engine[pytorch,core_cu13]==2.11.0"],
        # trl (+ datasets, which it imports) is the reference the loss tests compare against; the
        # official openai client and EleutherAI's lm-eval are the clients the serve tests talk to.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "trl>=1.16,<1.17", "datasets>=5",
                "openai>=1.40", "lm-eval[api]>=0.4.8,<0.5"],
    },
)
