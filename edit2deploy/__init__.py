"""edit2deploy: fix facts inside a local LLM, export it, and verify the edits in the real runtime.

The Python API mirrors the CLI (names are imported on first use, so `import edit2deploy` stays light):

    import edit2deploy
    result = edit2deploy.run("smollm2-135m", "examples/edits.jsonl", "gguf:Q4_K_M", "out/run")   # `edit2deploy run`
    art = edit2deploy.export("out/run/model", "out/model.gguf", "gguf:Q8_0")                   # `edit2deploy export`
    ver = edit2deploy.verify(art, "out/run/model")                                            # `edit2deploy verify`
    preds = edit2deploy.predict("out/run/model", "Q4_K_M,onnx:int4")                          # `edit2deploy predict`
    editor = edit2deploy.Editor(...)                                                          # the editing engine
"""

import importlib as _importlib

__version__ = "0.1.0"

_LAZY = {
    "run": ("api", "run"),
    "export": ("api", "export"),
    "verify": ("api", "verify"),
    "predict": ("api", "predict"),
    "edit": ("api", "edit"),
    "Editor": ("methods", "Editor"),
    "EditConfig": ("methods", "EditConfig"),
    "EditRequest": ("requests", "EditRequest"),
    "Gates": ("gates", "Gates"),
    "RunResult": ("ops.results", "RunResult"),
    "Target": ("formats", "Target"),
}

__all__ = [
    "EditConfig",
    "EditRequest",
    "Editor",
    "Gates",
    "RunResult",
    "Target",
    "__version__",
    "edit",
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
