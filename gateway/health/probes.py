"""Kubernetes probe endpoints (SPEC section 5), answered from cached check results.

| path | 200 when |
|---|---|
| ``/livez`` | the event loop lag is under ``liveness.max_event_loop_lag_s`` (nothing else) |
| ``/startupz`` | the first round of every check has finished |
| ``/readyz`` | not draining and no critical component unhealthy |
| ``/healthz`` | the overall status (worst component) is healthy or degraded |

Otherwise 503.  ``/PROBE/NAME`` answers for one component (``/readyz/database``): 200
unless that component is unhealthy (``/startupz/NAME``: unless it was never checked);
an unknown NAME is a 404.

Formats, Kubernetes style:

- plain text: ``ok``; on failure one ``[-]NAME failed: MESSAGE`` line a failing check
  and a last line ``readyz check failed``;
- ``?verbose``: one line a check (``[+]upstream:api ok``, ``[+]database degraded: slow``,
  ``[-]database failed: timeout``, ``[+]redis excluded: ok``), ``/readyz`` adds
  ``[+]shutdown ok`` / ``[-]shutdown failed: draining``, and the last line is
  ``readyz check passed`` or ``readyz check failed``;
- JSON with ``?format=json`` or ``Accept: application/json``:
  ``{"status", "passed", "draining", "components": {NAME: {"status", "critical",
  "latency_ms", "message", "last_checked", "details"}}}`` where ``status`` is the worst
  status of the components shown and ``passed`` the probe's verdict;
- ``?exclude=NAME`` (repeatable, or comma-separated) leaves components out.

On the proxy port (``public=True``) the answer tells the internet nothing inside: the
text lines and the JSON give component names, statuses and ``critical`` only, never a
check's message (a connect error names an internal address), URL, latency or time;
the admin port gives the full detail.

Every answer carries ``Cache-Control: no-store``.  A probe only reads the monitor's
cached state: it never waits on a dependency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from gateway.core.health import NOT_CHECKED, ComponentHealth, Status, aggregate
from gateway.health.monitor import HealthMonitor

if TYPE_CHECKING:
    from gateway.downstream.messages import Request

__all__ = ["PROBE_PATHS", "probe_answer", "probe_response"]

PROBE_PATHS = ("/livez", "/startupz", "/readyz", "/healthz")
_KINDS = frozenset(p[1:] for p in PROBE_PATHS)
_ALLOWED_METHODS = frozenset({"GET", "HEAD"})
_NO_STORE = {"Cache-Control": "no-store"}
_FALSE = frozenset({"0", "false", "no", "off"})


def _problem(status: int, title: str, detail: str, **headers: str) -> web.Response:
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    return web.Response(
        body=body,
        status=status,
        headers={**_NO_STORE, **headers, "Content-Type": "application/problem+json"},
    )


def _livez_component(monitor: HealthMonitor) -> ComponentHealth:
    """The event-loop component as ``/livez`` sees it: the lag right now decides."""
    ok, message = monitor.live()
    cached = monitor.components().get("event_loop")
    if not ok:
        status = Status.UNHEALTHY
    elif cached is not None and cached.status is Status.DEGRADED:
        status = Status.DEGRADED
    else:
        status = Status.HEALTHY
    if cached is None:
        return ComponentHealth(
            "event_loop",
            status,
            critical=False,
            latency_ms=None,
            message=message,
            last_checked=None,
        )
    return ComponentHealth(
        "event_loop",
        status,
        cached.critical,
        cached.latency_ms,
        message,
        cached.last_checked,
        cached.details,
    )


def _passes(kind: str, comp: ComponentHealth, single: bool) -> bool:
    if kind == "startupz":
        return comp.last_checked is not None
    if kind == "readyz" and not single:
        return not (comp.critical and comp.status is Status.UNHEALTHY)
    return comp.status is not Status.UNHEALTHY


def _line(kind: str, comp: ComponentHealth, passed: bool, public: bool) -> str:
    name = comp.name
    if not passed:
        if public:
            return f"[-]{name} failed"
        message = NOT_CHECKED if kind == "startupz" else comp.message
        return f"[-]{name} failed: {message}"
    if kind == "startupz" or comp.status is Status.HEALTHY:
        return f"[+]{name} ok"
    suffix = " (not critical)" if comp.status is Status.UNHEALTHY else ""
    if public:
        return f"[+]{name} {comp.status.value}{suffix}"
    return f"[+]{name} {comp.status.value}: {comp.message}{suffix}"


def _wants_json(request: web.BaseRequest | Request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None:
        return fmt.lower() == "json"
    return "application/json" in request.headers.get("Accept", "")


def _excluded(request: web.BaseRequest | Request) -> set[str]:
    out: set[str] = set()
    for value in request.query.getall("exclude", ()):
        out.update(part for part in value.split(",") if part)
    return out


async def probe_response(
    request: web.BaseRequest | Request, monitor: HealthMonitor
) -> web.Response | None:
    """The answer to a probe request, or None when ``request.path`` is not a probe."""
    return probe_answer(request, monitor)


def probe_answer(
    request: web.BaseRequest | Request, monitor: HealthMonitor, *, public: bool = False
) -> web.Response | None:
    """:func:`probe_response` without the coroutine: it never waits on anything.

    ``public``: the proxy port's answer, with names, statuses and ``critical`` only.
    """
    path = request.path
    if not path.startswith(PROBE_PATHS):
        return None
    kind, _, name = path[1:].partition("/")
    if kind not in _KINDS:
        return None
    if request.method not in _ALLOWED_METHODS:
        return _problem(
            405, "Method Not Allowed", f"{path} answers GET and HEAD", Allow="GET, HEAD"
        )

    components = (
        {"event_loop": _livez_component(monitor)} if kind == "livez" else monitor.components()
    )
    single = bool(name)
    excluded: set[str] = set()
    if single:
        comp = components.get(name)
        if comp is None:
            return _problem(404, "Not Found", f"no health component named {name!r}")
        shown = [comp]
    else:
        excluded = _excluded(request)
        shown = [c for n, c in components.items() if n not in excluded]

    verdicts = [(c, _passes(kind, c, single)) for c in shown]
    all_pass = all(ok for _, ok in verdicts)
    if kind == "readyz" and not single:
        passed = all_pass and not monitor.draining
    elif kind == "startupz" and not single:
        passed = monitor.started or all_pass
    else:
        passed = all_pass
    status = 200 if passed else 503

    query = request.query
    if _wants_json(request):
        body = orjson.dumps(
            {
                "status": aggregate(shown).value,
                "passed": passed,
                "draining": monitor.draining,
                "components": {
                    c.name: c.to_public_json() if public else c.to_json() for c in shown
                },
            }
        )
        return web.Response(
            body=body,
            status=status,
            headers={**_NO_STORE, "Content-Type": "application/json"},
        )

    verbose = "verbose" in query and query["verbose"].lower() not in _FALSE
    if passed and not verbose:
        text = "ok\n"
    else:
        lines = [_line(kind, c, ok, public) for c, ok in verdicts if verbose or not ok]
        if kind == "readyz" and not single:
            if monitor.draining:
                lines.append("[-]shutdown failed: draining")
            elif verbose:
                lines.append("[+]shutdown ok")
        if verbose:
            lines.extend(f"[+]{n} excluded: ok" for n in components if n in excluded)
        lines.append(f"{kind} check {'passed' if passed else 'failed'}")
        text = "\n".join(lines) + "\n"
    return web.Response(
        body=text.encode(),
        status=status,
        headers={**_NO_STORE, "Content-Type": "text/plain; charset=utf-8"},
    )
