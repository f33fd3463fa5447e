"""Public names that a package imports from its modules on first use (a module `__getattr__`)."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """`__getattr__` and `__dir__` for `package`, whose public names (`exports`: name -> module)
    are imported from its modules when first looked up, and kept on the package after that."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)  # the next lookup does not come here
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
