from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path(__file__).with_name("xcli").joinpath("version.py").read_text(), version)

setup(
    name="xcli",
    version=version["__version__"],
    description="xc: command-line tools for sparse crosscoders across layers and models",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["xcli", "xcli.*"]),
    # zarr's v3 API (zarr>=3) needs Python 3.11 or newer.
    python_requires=">=3.11",
    install_requires=[
        "click>=8.1",
        # A range, so that an existing CUDA build of torch is kept as it is.
        "torch>=2.2,<3",
        "transformers>=4.44",
        "safetensors>=0.4",
        "zarr>=3.0,<4",
        "numcodecs>=0.13",
        "rich>=13",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "data": ["datasets>=2.18"],
        # triton: tests/test_kernels.py runs the CUDA kernels under Triton's interpreter on CPU (wheels
        # for Linux only; CUDA builds of torch already pin their own triton, which satisfies this).
        "test": ["pytest>=7", "tokenizers>=0.15",
                 'triton; platform_system == "Linux" and platform_machine == "x86_64"'],
    },
    entry_points={"console_scripts": ["xc=xcli.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
