"""Compile protos/ with grpcio-tools whenever the package is built or installed.

The generated modules are not committed: they are written next to their package
(extauthz/admin/v1/) before the build copies the package, so wheels, plain installs and
editable installs all contain them.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for proto in sorted(PROTOS.rglob("*.proto")):
        arguments = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
                     f"--grpc_python_out={ROOT}", str(proto)]
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
