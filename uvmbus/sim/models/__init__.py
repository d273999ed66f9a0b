"""Registry of device models (VSPs) the simulator can offer.

Built-in: ``echo`` (the example and test device) and ``null`` (integration-component
stand-ins).  Every other module of this package is imported too, so a model only has to
live here and decorate its class with :func:`register_model` (the netvsc and storvsc models
do); ``--nic`` / ``--disk`` fail with a clear message while no model claims them.  A module
that fails to import is skipped with a warning (its error is named by that message).  Users
load their own with ``uvmbus sim --load-model MODULE``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from uvmbus.errors import SimulatorError
from uvmbus.sim.models.base import DeviceModel

__all__ = ["LOAD_ERRORS", "DeviceModel", "MODELS", "find_model", "load_models", "model_for_option", "register_model"]

MODELS: dict[str, type[DeviceModel]] = {}

#: modules imported at start; every other module of this package is optional
BUILTIN_MODULES = ("uvmbus.sim.models.echo", "uvmbus.sim.models.null")
#: optional model modules that failed to import: module -> error
LOAD_ERRORS: dict[str, str] = {}


def register_model(cls: type[DeviceModel]) -> type[DeviceModel]:
    """Class decorator: make ``cls`` available as ``--device <cls.name>``."""
    if not cls.name or not cls.class_id:
        raise SimulatorError(f"device model {cls.__name__} needs a name and a class_id")
    MODELS[cls.name] = cls
    return cls


def load_models(extra: list[str] | tuple[str, ...] = ()) -> None:
    """Import the built-in, optional and user model modules (registering their models)."""
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for info in pkgutil.iter_modules(__path__, __name__ + "."):
        if info.name in BUILTIN_MODULES or info.name.endswith(".base"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:   # a model being written must not stop the simulator
            LOAD_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
            print(f"uvmbus-sim: warning: device model module {info.name} not loaded: "
                  f"{LOAD_ERRORS[info.name]}", file=sys.stderr)
    for mod in extra:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise SimulatorError(f"--load-model {mod}: cannot import it ({exc})") from exc


def find_model(name: str) -> type[DeviceModel]:
    cls = MODELS.get(name)
    if cls is None:
        raise SimulatorError(f"no device model {name!r}; available: {', '.join(sorted(MODELS)) or 'none'}")
    return cls


def model_for_option(option: str) -> type[DeviceModel]:
    """The model behind ``--nic`` / ``--disk``; a clear error while none is registered."""
    for cls in MODELS.values():
        if cls.cli_option == option:
            return cls
    what = {"nic": "netvsc (synthetic NIC)", "disk": "storvsc (synthetic SCSI)"}.get(option, option)
    broken = "".join(f"; {m} failed to load ({e})" for m, e in LOAD_ERRORS.items())
    raise SimulatorError(f"--{option}: the {what} device model is not available yet in this "
                         f"version of the simulator; use --echo or --device for now{broken}")
