"""edit2deploy: fix facts inside a local LLM, export it, and verify the edits in the real runtime.

The Python API mirrors the CLI (names are imported on first use, so `import edit2deploy` stays light):

    import edit2deploy
    result = edit2deploy.run("smollm2-135m", "examples/edits.jsonl", "gguf:Q4_K_M", "out/run")   # `edit2deploy run`
    art = edit2deploy.export("out/run/model", "out/model.gguf", "gguf:Q8_0")                   # `edit2deploy export`
    ver = edit2deploy.verify(art, "out/run/model")                                            # `edit2deploy verify`
    editor = edit2deploy.Editor(...)                                                          # the editing engine

`edit2deploy.verify` is also the name of the verification module (`from edit2deploy.verify import Gates` keeps
working): the module object is callable and calling it runs `edit2deploy.api.verify`.
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

_LAZY = {
    "run": ("api", "run"),
    "export": ("api", "export"),
    "predict": ("api", "predict"),
    "Editor": ("methods", "Editor"),
    "EditConfig": ("methods", "EditConfig"),
    "EditRequest": ("requests", "EditRequest"),
    "Gates": ("verify", "Gates"),
    "RunResult": ("pipeline", "RunResult"),
    "Target": ("pipeline", "Target"),
}

__all__ = [
    "EditConfig",
    "EditRequest",
    "Editor",
    "Gates",
    "RunResult",
    "Target",
    "__version__",
    "export",
    "predict",
    "run",
    "verify",
]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(_importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _CallableVerifyModule(_types.ModuleType):
    """`edit2deploy.verify`: the verification module, callable as the API's `verify(artifact, model, ...)`."""

    def __call__(self, *args, **kwargs):
        from .api import verify

        return verify(*args, **kwargs)


def _callable(module):
    if isinstance(module, _types.ModuleType) and type(module) is _types.ModuleType:
        module.__class__ = _CallableVerifyModule
    return module


class _Package(_types.ModuleType):
    @property
    def verify(self):
        module = self.__dict__.get("_verify_module")
        if module is None:
            module = _importlib.import_module(".verify", self.__name__)
        return _callable(module)

    @verify.setter
    def verify(self, module):  # the import system binds the submodule here when it is first imported
        self.__dict__["_verify_module"] = _callable(module)


_sys.modules[__name__].__class__ = _Package
