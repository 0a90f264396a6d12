"""A Kubernetes sidecar reverse proxy that protects and observes its pod's application."""

__version__ = "0.1.0"


def compiled() -> bool:
    """True when the hot modules run compiled (``GATEWAY_COMPILE=1`` at install, as the
    image is built: see ``setup.py``), False for the pure-Python install."""
    from gateway.pipeline import handler  # noqa: PLC0415 - not on import of the package

    return not (handler.__file__ or "").endswith(".py")


def build_name() -> str:
    """The version and the build, as ``gateway --version`` and the startup log say them."""
    return f"{__version__} ({'compiled' if compiled() else 'pure Python'})"
