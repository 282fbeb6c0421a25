"""adapt_fast package. kernels/ is installed as adapt_fast.kernels; the native packer is optional."""

from setuptools import setup

setup(
    name="adapt_fast",
    version="0.1.0",
    description="Budget-constrained multi-task instruction tuning with a learned task mixture (ADAPT)",
    python_requires=">=3.11",
    packages=[
        "adapt_fast",
        "adapt_fast.data",
        "adapt_fast.mixture",
        "adapt_fast.model",
        "adapt_fast.kernels",
    ],
    package_dir={"adapt_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.17",
        "tokenizers",
        "datasets",
        "deepspeed",
        "numpy",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "pyyaml",
    ],
    extras_require={"bench": ["liger-kernel", "cut-cross-entropy"], "test": ["pytest", "ruff"]},
)
