"""The backend registry: backend name (engine.json's "backend") -> the object that builds and loads its engines.

A backend is any object (a module or an instance) with the members of `PROTOCOL`:
  * `check_usable()`: raise WorkbenchError when it cannot build here;
  * `versions() -> {name: version, ...}`: its library versions, including one under its own registered name
    (that one is part of the build key);
  * `normalize_options(options) -> dict`: validated build options with defaults filled in;
  * `build_files(onnx_path, tmp, kind, shapes, options) -> ({role: file name}, extra engine.json fields)`;
  * `load(artifact, **options) -> runner` (an `engines.runner.EngineRunner`);
  * `UNKEYED_OPTIONS`: build options that do not change what is built (left out of the build key).

The built-in backends ("onnxruntime", "tensorrt", "tensorrt-rtx") are registered in `engines/__init__.py`;
`engines.build`, `engines.load`, `engines.resolve_backend` and `EngineArtifact.open` look names up here.
"""
from __future__ import annotations

from typing import Any

from core.errors import WorkbenchError

PROTOCOL = ("check_usable", "versions", "normalize_options", "build_files", "load", "UNKEYED_OPTIONS")
AUTO = "auto"  # not a backend: resolve_backend's choice of TensorRT when usable, else ONNX Runtime

_REGISTRY: dict[str, Any] = {}  # registration order kept (error messages list it)


def register_backend(name: str, backend: Any, *, replace: bool = False) -> None:
    """Make `backend` buildable and loadable as `name`. Registering the same object again is a no-op; another
    object under a registered name needs `replace=True`."""
    if not isinstance(name, str) or not name or name != name.strip() or name == AUTO:
        raise WorkbenchError(f"backend name must be a non-empty string other than {AUTO!r}, got {name!r}")
    missing = [m for m in PROTOCOL if not hasattr(backend, m)]
    if missing:
        raise WorkbenchError(f"backend {name!r} lacks {', '.join(missing)} (a backend needs {', '.join(PROTOCOL)})")
    old = _REGISTRY.get(name)
    if old is not None and old is not backend and not replace:
        raise WorkbenchError(f"backend {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = backend


def unregister_backend(name: str) -> None:
    """Forget `name` (for tests that register a fake backend)."""
    if _REGISTRY.pop(name, None) is None:
        raise WorkbenchError(f"backend {name!r} is not registered (registered: {', '.join(_REGISTRY) or 'none'})")


def backends() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Any:
    """The backend registered as `name`; one WorkbenchError listing the registered names otherwise."""
    backend = _REGISTRY.get(name) if isinstance(name, str) else None
    if backend is None:
        raise WorkbenchError(f"unknown backend {name!r}: the registered backends are {', '.join(_REGISTRY) or 'none'}"
                             f" (or {AUTO!r}: TensorRT when usable, else ONNX Runtime)")
    return backend
