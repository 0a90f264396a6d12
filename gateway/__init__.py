"""A Kubernetes sidecar reverse proxy that protects and observes its pod's application."""

import importlib.util

__version__ = "0.1.0"


def compiled() -> bool:
    """True when the hot modules run compiled (``GATEWAY_COMPILE=1`` at install, as the
    image is built: see ``setup.py``), False for the pure-Python install. Asked of the
    import system (where the request handler's module would load from), not by importing
    it: the package's root depends on nothing of its own."""
    spec = importlib.util.find_spec("gateway.pipeline.handler")
    origin = spec.origin if spec is not None else None
    return origin is not None and not origin.endswith(".py")


def build_name() -> str:
    """The version and the build, as ``gateway --version`` and the startup log say them."""
    return f"{__version__} ({'compiled' if compiled() else 'pure Python'})"
