"""The server's version and dependencies, which pyproject.toml leaves dynamic.

The version is the SDK's: sdk/adjointdpm/_version.py in a checkout of the repository, or, when
the wheel is built from this distribution's sdist (which holds no sdk/), the sdist's own PKG-INFO.
The server depends on exactly that version of the SDK, plus what the server itself imports.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SDK_VERSION_FILE = HERE.parent / "sdk" / "adjointdpm" / "_version.py"

SERVER_DEPENDENCIES = [
    "torch>=2.4",
    "torchdiffeq>=0.2.4",
    "diffusers>=0.30",
    "transformers>=4.45",
    "peft>=0.13",
    "prometheus-client>=0.20",
    "tritonclient[grpc]>=2.50",
    "grpcio-health-checking>=1.75",
    "grpcio-reflection>=1.75",
    "scipy>=1.11",
    "scikit-learn>=1.4",
    "boto3>=1.34",    # --artifact-store s3://… (AWS S3, MinIO, Ceph RGW, GCS)
    "redis>=5",       # --coordination redis://… (N replicas)
]


def version() -> str:
    if SDK_VERSION_FILE.is_file():  # a checkout of the repository
        text, where = SDK_VERSION_FILE.read_text(encoding="utf-8"), SDK_VERSION_FILE
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    else:  # building the wheel from the sdist
        where = HERE / "PKG-INFO"
        if not where.is_file():
            raise SystemExit(f"adjointdpm-server: no version: neither {SDK_VERSION_FILE} nor {where}")
        text = where.read_text(encoding="utf-8")
        match = re.search(r"^Version:\s*(\S+)\s*$", text, re.M)
    if not match:
        raise SystemExit(f"adjointdpm-server: no version found in {where}")
    return match.group(1)


VERSION = version()

setup(version=VERSION, install_requires=[f"adjointdpm=={VERSION}", *SERVER_DEPENDENCIES])
