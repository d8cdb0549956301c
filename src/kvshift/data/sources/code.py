"""Python code as corpus sources: the standard library of the running interpreter (no fetch) and the
pinned code packages (PyPI wheels, fetched by kvshift.data.sources.pypi.fetch_pypi_sources)."""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from kvshift.data.clean import looks_generated
from kvshift.data.sources.base import Doc, Source

__all__ = ["CODE_PACKAGES", "fetch_stdlib", "python_files", "extract_stdlib", "extract_code_tree"]


def fetch_stdlib(src: Source, cache: Path, offline: bool) -> tuple[Path, str, str]:
    """The running interpreter's standard library: nothing to fetch."""
    return Path(sysconfig.get_paths()["stdlib"]), sys.version.split()[0], "PSF-2.0"


_CODE_MAX_BYTES = 400_000


def python_files(base: Path, *, exclude: tuple[str, ...] = ()) -> Iterator[Doc]:
    """Python source files under `base` (sorted), skipping huge, non-UTF-8 and generated-looking files."""
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base)
        if any(part in exclude for part in rel.parts) or "__pycache__" in rel.parts:
            continue
        try:
            if not p.is_file() or p.stat().st_size > _CODE_MAX_BYTES:
                continue
            text = p.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 100 or looks_generated(text, max_line=2000, max_mean_line=100.0):
            continue
        yield str(rel), text


def extract_stdlib(root: Path) -> Iterator[Doc]:
    # test data directories hold deliberately broken/odd files; site-packages is not the stdlib
    yield from python_files(root, exclude=("site-packages", "dist-packages", "data", "badsyntax", "lib2to3"))


def extract_code_tree(root: Path) -> Iterator[Doc]:
    yield from python_files(root)


# Large hand-written Python code bases with permissive licences (largest first), pinned to the
# versions measured for the default corpus; only the *.py files of each wheel are used. Generated
# API clients (kubernetes, plotly validators) and GPL code (ansible, pylint) are left out.
CODE_PACKAGES: dict[str, str] = {
    "homeassistant": "homeassistant==2026.11.0",
    "transformers": "transformers==5.24.0",
    "sympy": "sympy==1.14.0",
    "pennylane": "pennylane==0.45.1",
    "tensorflow-probability": "tensorflow-probability==0.25.0",
    "pandas": "pandas==3.1.1",
    "scipy": "scipy==1.17.1",
    "statsmodels": "statsmodels==0.15.0",
    "astropy": "astropy==8.0.2",
    "scikit-learn": "scikit-learn==1.9.1",
    "jax": "jax==0.12.0.1",
    "twisted": "twisted==26.10.0",
    "keras": "keras==3.15.1",
    "numba": "numba==0.68.1",
    "numpy": "numpy==2.4.6",
    "sqlalchemy": "sqlalchemy==2.1.9",
    "matplotlib": "matplotlib==3.11.2",
    "mne": "mne==1.13.2",
    "cirq-core": "cirq-core==1.7.0",
    "networkx": "networkx==3.7",
    "mypy": "mypy==2.4.1",
    "xarray": "xarray==2026.9.0",
    "qiskit": "qiskit==2.6.2",
    "django": "django==6.1.3",
    "dask": "dask==2026.8.0",
    "nltk": "nltk==3.10.4",
    "pip": "pip==26.3",
    "pygments": "pygments==2.21.0",
    "sphinx": "sphinx==9.2.0",
    "bokeh": "bokeh==3.10.2",
    "cython": "cython==3.3.1",
    "sqlglot": "sqlglot==30.30.0",
    "setuptools": "setuptools==84.2.1",
    "lightning": "lightning==2.6.6",
    "ipython": "ipython==9.18.1",
    "tornado": "tornado==6.6.1",
    "docutils": "docutils==0.23",
    "pydantic": "pydantic==2.14.4",
    "hypothesis": "hypothesis==6.170.17",
    "botocore": "botocore==1.44.8",
}
