"""megatron_spin: Online DPO / SPIN on Megatron-core with an SGLang rollout fleet.

Pins what must not drift (torch, megatron-core); GPU-only pieces are extras.
Install the CPU stack with ``bash tools/setup_venv.sh`` (see README), which installs the
local CPU torch wheel first so that nothing here pulls a CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_spin",
    version="0.1.0",
    description="Online DPO / SPIN trainer on Megatron-core with SGLang rollouts",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_spin", "megatron_spin.*"]),
    include_package_data=True,
    package_data={"megatron_spin.config.conf": ["*.yaml", "*/*.yaml"]},
    entry_points={"console_scripts": ["megatron-spin-train = megatron_spin.main:main"]},
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
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
        # GPU-only: TransformerEngine (FP8 kernels, TE layer spec).  Unverified here (no GPU).
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # The rollout fleet on GPUs.  pip resolves a CUDA torch for it: install on GPU nodes.
        # >= 0.5.10: flattened-bucket byte offsets, sampling_seed, SGLANG_RETURN_ORIGINAL_LOGPROB.
        "sglang": ["sglang>=0.5.10"],
        # trl (+ datasets, which it imports) is the reference the loss tests compare against.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "trl>=1.16,<1.17", "datasets>=5"],
    },
)
