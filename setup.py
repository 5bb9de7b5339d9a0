"""gpd_jax: Gap Preserving Distillation (ICLR 2025) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="gpd_jax",
    version="0.1.0",
    description="Gap Preserving Distillation and knowledge-distillation baselines in JAX/Flax",
    packages=setuptools.find_packages(include=["gpd_jax", "gpd_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.10",
        "pillow>=10",
        "absl-py>=2",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",  # PyTorch weights in and out without torch (gpd_jax.interop)
    ],
    extras_require={
        # nbclient + nbformat + ipykernel: tests/test_notebook.py executes notebooks/ in a kernel.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.89", "nbclient>=0.10", "nbformat>=5.9",
                 "ipykernel>=6.29"],
        "cuda12": ["jax[cuda12]>=0.7"],
        # Reading/writing .pth files (gpd_jax.interop); .safetensors and .npz need no torch. The
        # tests also need torchvision (.ci/run installs both, CPU builds, pinned).
        "torch": ["torch>=2.1"],
    },
)
