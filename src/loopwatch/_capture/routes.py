"""The route template of a request (``/items/{item_id}``), when the framework exposes it.

FastAPI puts the matched route in ``scope["route"]``. Starlette's router puts only the
endpoint in the scope, so the routes of the app are indexed once by endpoint; a request
then costs a dictionary look-up, and a regex match only where several routes share one
endpoint.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

_MAX_APPS = 64
_indexes: dict[int, tuple[weakref.ref[Any], dict[Any, list[Any]]]] = {}


def route_template(scope: dict[str, Any], root_path: str) -> str | None:
    """The template of the route that served ``scope``; ``root_path`` is the scope's at entry."""
    route = scope.get("route")
    if route is None:
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return None
        route = _route_for(scope, endpoint)
        if route is None:
            return None
    fmt = getattr(route, "path_format", None)
    if not isinstance(fmt, str):
        fmt = getattr(route, "path", None)
        if not isinstance(fmt, str):
            return None
    # Under a Mount the route's template is relative to the mount point, which the router
    # appended to root_path.
    mounted = scope.get("root_path", "")
    prefix = mounted[len(root_path) :] if isinstance(mounted, str) else ""
    return prefix + fmt


def _route_for(scope: dict[str, Any], endpoint: Any) -> Any:
    app = scope.get("app")
    if app is None:
        return None
    # Keyed by id() and checked through a weak reference: a WeakKeyDictionary look-up
    # makes a new weak reference on every request.
    entry = _indexes.get(id(app))
    if entry is None or entry[0]() is not app:
        try:
            ref = weakref.ref(app)
        except TypeError:  # not weak-referenceable
            return None
        if len(_indexes) >= _MAX_APPS:
            _indexes.clear()
        entry = _indexes[id(app)] = (ref, {})
        _walk(getattr(app, "routes", ()), entry[1], depth=0)
    index = entry[1]
    try:
        candidates = index.get(endpoint)
    except TypeError:  # unhashable endpoint
        return None
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    path = scope.get("path", "")
    mounted = scope.get("root_path", "")
    if isinstance(path, str) and isinstance(mounted, str) and path.startswith(mounted):
        path = path[len(mounted) :]
    for route in candidates:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            return route
    return None


def _walk(routes: Any, index: dict[Any, list[Any]], depth: int) -> None:
    if depth > 16:
        return
    try:
        routes = list(routes)
    except TypeError:
        return
    for route in routes:
        endpoint = getattr(route, "endpoint", None)
        if endpoint is not None:
            with contextlib.suppress(TypeError):
                index.setdefault(endpoint, []).append(route)
        children = getattr(route, "routes", None)
        if children:
            _walk(children, index, depth + 1)
