"""User rewards named on the command line: `path/to/file.py:name` or `package.module:name`.

`name` may be dotted (`module:obj.method`) and may point at

* a function or any callable object `(images [B,3,H,W] in [0,1], prompts: list[str]) -> B numbers`, or
  `(images) -> B numbers` for a reward that ignores the prompts (told apart by the signature, checked when
  the spec is loaded);
* a class, which is instantiated with no arguments (so its `__init__` can load a model once) and must give a
  callable instance.

The result is wrapped with `as_reward` into a `FunctionReward`, so inputs are validated and the output is
checked by `check_output` (one finite number per image, as float32 on the images' device; errors name the
spec). A `differentiable = True` attribute (on the function, object or class) marks it differentiable; a
`name` attribute names it, else the attribute's name does. A file is imported by path under a unique module
name, so two files called `reward.py` in different folders do not clash; its folder is not added to
`sys.path`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

from diffalign.rewards.protocol import Reward, as_reward, call_style

SPEC_FORMAT = "'path/to/file.py:function' or 'package.module:function'"


def _split(spec: str) -> tuple[str, str]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"reward spec {spec!r} must look like {SPEC_FORMAT} (a colon before the callable's name)"
        )
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"reward spec {spec!r}: {attr!r} is not a Python attribute name")
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def import_file(path: str | Path) -> ModuleType:
    """Import a Python file by path under a unique module name (`diffalign_user_<stem>_<hash>`)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"reward file {file} does not exist (from {str(path)!r})")
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:10]
    module_name = f"diffalign_user_{''.join(c if c.isalnum() else '_' for c in file.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[module_name]
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise ImportError(f"importing reward file {file} failed: {type(err).__name__}: {err}") from err
    return module


def import_target(target: str) -> ModuleType:
    """Import a file path or a dotted module name, with errors that say which and why."""
    if _is_file_target(target):
        return import_file(target)
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise ImportError(
            f"cannot import module {target!r} for the reward ({type(err).__name__}: {err}); "
            "is it installed or on PYTHONPATH? A file is given as path/to/file.py"
        ) from err


def public_callables(module: ModuleType) -> list[str]:
    """Names of the public callables defined in `module` (not imported into it)."""
    names = []
    for key, value in vars(module).items():
        if key.startswith("_") or not callable(value) or inspect.ismodule(value):
            continue
        if getattr(value, "__module__", None) == module.__name__:
            names.append(key)
    return sorted(names)


def load_callable_reward(spec: str, name: str | None = None, differentiable: bool | None = None) -> Reward:
    """Load `path/to/file.py:attr` or `package.module:attr` as a Reward (see the module docstring).

    `name` / `differentiable` override what the object declares. Errors: `ValueError` for a malformed spec,
    `FileNotFoundError` for a missing file, `ImportError` when the module cannot be imported (with the cause),
    `AttributeError` listing the module's callables when `attr` is missing, `TypeError` when it is not
    callable or a class cannot be built with no arguments.
    """
    target, attr = _split(spec)
    module = import_target(target)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = public_callables(module)
            listing = ", ".join(available) if available else "none defined there"
            raise AttributeError(
                f"reward spec {spec!r}: {target!r} has no attribute {attr!r}; callables: {listing}"
            )
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        try:
            obj = obj()
        except TypeError as err:
            raise TypeError(
                f"reward spec {spec!r}: class {attr!r} is instantiated with no arguments, which failed: {err}"
            ) from err
        except Exception as err:
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(f"raised while building the reward {spec!r} (class {attr!r}, no arguments)")
            raise
    if not callable(obj):
        raise TypeError(
            f"reward spec {spec!r}: {attr!r} is a {type(obj).__name__}, "
            "not a callable (images, prompts) -> rewards"
        )
    label = name or getattr(obj, "name", None) or attr.rsplit(".", 1)[-1]
    diff = differentiable if differentiable is not None else bool(getattr(obj, "differentiable", False))
    # Always wrap (explicit name/differentiable), so even an object that already satisfies the Reward protocol
    # has its inputs and outputs checked; its signature is checked now, not at the first call.
    try:
        call_style(obj)
    except TypeError as err:
        raise TypeError(f"reward spec {spec!r}: {err}") from None
    return as_reward(obj, name=str(label), differentiable=diff, source=spec)
