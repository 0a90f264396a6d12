"""The background checks of the health monitor, one module a kind of component.

Each check runs one round at a time, bounded by its ``timeout_s``
(:class:`~gateway.health.checks.bounded.Bounded`), and reports a
:class:`~gateway.core.health.ComponentHealth` through the monitor's callback; the
monitor (:mod:`gateway.health.monitor`) schedules the rounds and keeps the results.
"""
