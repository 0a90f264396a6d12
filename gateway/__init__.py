"""A Kubernetes sidecar reverse proxy that protects and observes its pod's application."""

__version__ = "0.1.0"
