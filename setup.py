"""Build vflow and its C++ CPU extension ``vflow._C`` (``pip install -e . --no-build-isolation``).

The extension is optional: set VFLOW_NO_EXT=1 to skip it; the package then runs on its
reference backend. No CUDA toolkit or GPU is needed (the GPU path is Triton, JIT-compiled).
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(glob.glob("csrc/*.cpp"))
ext_modules = []
if sources and os.environ.get("VFLOW_NO_EXT", "0") != "1":
    ext_modules.append(
        CppExtension(
            "vflow._C",
            sources,
            # No -march/-ffast-math: the kernels pick AVX-512 / AVX2 / baseline code at run
            # time (target attributes in csrc/coupling.cpp) and keep IEEE inf/NaN semantics.
            # -Wno-psabi: wide vector types are only passed between always_inline helpers.
            # -fvisibility=hidden: only PyInit__C is exported, so the per-ISA kernel symbols
            # can never be interposed by another copy of the library loaded in the process.
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-Wno-psabi", "-fvisibility=hidden"]},
            depends=sorted(glob.glob("csrc/*.h")),
            extra_link_args=["-fopenmp"],
        )
    )

setup(
    name="vflow",
    version="0.1.0",
    description="Fast VFlow: fused mixture-of-logistics coupling kernels and the VFlow model",
    packages=["vflow", "vflow.kernels"],
    package_dir={"vflow": "vflow", "vflow.kernels": "kernels"},
    python_requires=">=3.10",
    # What `vflow train` with no options imports (tests/test_packaging.py checks the imports of
    # vflow/ against this list). Ranges that requirements.txt's pins satisfy; developed and
    # tested on those pins. triton (the GPU kernels) comes with CUDA builds of torch and is
    # optional: without it vflow runs the C++ / reference backends.
    install_requires=[
        "torch>=2.5",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.2",
    ],
    # Optional integrations: vflow.transforms' zuko / pyro adapters import them only when used.
    extras_require={"zuko": ["zuko>=1.6"], "pyro": ["pyro-ppl>=1.9"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["vflow=vflow.cli:main"]},
)
