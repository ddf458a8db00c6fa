"""Builds the C parts and the gRPC code at install time; nothing generated is
checked in.

- step_ssh/proto/stepssh_pb2*.py: generated from stepssh.proto by grpc_tools;

- step_ssh._native: cffi binding of the cache reader and NSS entry points
  (nss_shim/build_cffi.py);
- step_ssh/_lib/libnss_stepssh.so.2: the module glibc loads, compiled from the
  same sources with -Wall -Wextra -Werror and only the _nss_stepssh_* symbols
  exported;
- step_ssh/_lib/pam_stepssh.so: the PAM module (pam_module/, only pam_sm_*
  exported, links libpam);
- step_ssh/_lib/step-ssh-principals: sshd's AuthorizedPrincipalsCommand
  (pam_module/principals.c), over the same cache reader;
- step_ssh/_lib/stepssh_sudo_audit.so: the sudo audit plugin
  (pam_module/sudo_audit.c, only `stepssh_audit` exported), built when sudo's
  <sudo_plugin.h> is installed (Debian: package sudo; RHEL: sudo-devel).
"""
import os
import re
import shlex
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

VERSION = re.search(r'^version = "([^"]+)"', Path("pyproject.toml").read_text(), re.M).group(1)
CFLAGS = ["-std=gnu11", "-O2", "-g", "-fPIC", "-Wall", "-Wextra", "-Werror",
          "-fvisibility=hidden", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong"]

# (output name, sources, extra flags, libraries)
NATIVE = [
    ("libnss_stepssh.so.2", ["nss_shim/cache.c", "nss_shim/nss.c"],
     ["-shared", "-Wl,-soname,libnss_stepssh.so.2", "-Wl,--version-script=nss_shim/nss.map",
      "-Wl,-z,relro,-z,now"], ["-lz"]),
    ("pam_stepssh.so", ["nss_shim/cache.c", "pam_module/common.c", "pam_module/audit.c",
                        "pam_module/home.c", "pam_module/authinfo.c", "pam_module/pam_stepssh.c"],
     ["-shared", "-Ipam_module", "-Wl,--version-script=pam_module/pam.map",
      "-Wl,-z,relro,-z,now"], ["-lpam", "-lz"]),
    ("step-ssh-principals", ["nss_shim/cache.c", "pam_module/common.c", "pam_module/principals.c"],
     ["-fPIE", "-pie", "-Ipam_module", "-Wl,-z,relro,-z,now"], ["-lz"]),
    ("stepssh_sudo_audit.so", ["pam_module/audit.c", "pam_module/sudo_audit.c"],
     ["-shared", "-Ipam_module", "-Wl,--version-script=pam_module/sudo_audit.map", "-Wl,-z,relro,-z,now",
      f'-DSTEPSSH_VERSION="{VERSION}"'], []),
]
# built only where this header exists (sudo's plugin API)
OPTIONAL = {"stepssh_sudo_audit.so": "sudo_plugin.h"}


def have_header(cc: list[str], header: str) -> bool:
    r = subprocess.run(cc + ["-E", "-x", "c", "-"], input=f"#include <{header}>\n", text=True,
                       capture_output=True)
    return r.returncode == 0


class BuildNative(build_ext):
    def run(self):
        super().run()
        root = Path(".") if self.inplace else Path(self.build_lib)
        out_dir = root / "step_ssh" / "_lib"
        out_dir.mkdir(parents=True, exist_ok=True)
        cc = shlex.split(os.environ.get("CC", "cc"))
        for name, sources, flags, libs in NATIVE:
            if name in OPTIONAL and not have_header(cc, OPTIONAL[name]):
                self.warn(f"<{OPTIONAL[name]}> not found: {name} not built (sudo commands are not audited)")
                (out_dir / name).unlink(missing_ok=True)
                continue
            cmd = cc + CFLAGS + ["-Inss_shim"] + flags + ["-o", str(out_dir / name)] + sources + libs
            self.announce("building " + name, level=2)
            subprocess.run(cmd, check=True)


class BuildProto(build_py):
    """Generate the gRPC modules into the source tree, then copy as usual."""

    def run(self):
        from grpc_tools import protoc

        proto = "step_ssh/proto/stepssh.proto"
        args = ["protoc", "-I.", "--python_out=.", "--grpc_python_out=.", "--pyi_out=.", proto]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        super().run()


setup(
    cffi_modules=["nss_shim/build_cffi.py:ffibuilder"],
    cmdclass={"build_ext": BuildNative, "build_py": BuildProto},
)
