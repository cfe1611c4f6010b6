"""The route template of a request (``/users/{user_id}``), when the framework exposes it.

Read after the app ran, from what its routers left in the scope, relative to the
``root_path`` the request came in with:

- the route that served it, found from ``scope["endpoint"]``: FastAPI's record of the route
  as included (``scope["fastapi"]["effective_route_context"]``: from FastAPI 0.137 on,
  ``scope["route"]`` is the route as declared, without the ``include_router`` prefixes),
  else ``scope["route"]`` (FastAPI's routes, and every Starlette route from 1.7), else the
  app's routes, indexed once by endpoint: a dictionary look-up, and a regex match only
  where several routes share one endpoint;
- the mounts above it: what they appended to ``root_path``, with a mount's path
  parameters put back as ``{name}``.

A path that no route matched has no template, even under a mount; an app mounted whole
(static files, another framework) has the mount's, ``/static/{path}``.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Any

from .. import _failures

_MAX_APPS = 64
_MAX_DEPTH = 16
# Distinct endpoints that may make an index be built again (routes added after the first
# request); past that, an endpoint missing from the index just has no template.
_MAX_MISSES = 256
_PARAM = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")

_indexes: dict[int, tuple[weakref.ref[Any], _Index]] = {}
_UNKNOWN = object()


def route_template(scope: dict[str, Any], root_path: str) -> str | None:
    """The template of the route that served ``scope``; ``root_path`` is the scope's at entry."""
    endpoint = scope.get("endpoint")
    if endpoint is None:  # no route matched
        return None
    fmt = None
    fastapi = scope.get("fastapi")
    if type(fastapi) is dict:
        included = fastapi.get("effective_route_context")
        if included is not None:
            # Set for the route an included router selected; a mounted app's own route
            # may have come after it.
            leaf = getattr(included, "starlette_route", None) or included
            if getattr(leaf, "endpoint", None) is endpoint:
                fmt = getattr(leaf, "path_format", None)
    if fmt is None:
        route = scope.get("route")
        # Starlette's router sets it for a mount too, and FastAPI's does not for its
        # Starlette routes: it may be an outer route.
        if route is not None and getattr(route, "endpoint", None) is endpoint:
            fmt = getattr(route, "path_format", None)
    index = None
    if not isinstance(fmt, str):
        index = _index_for(scope)
        if index is None:
            return None
        fmt = index.template(endpoint, scope)
        if fmt is _UNKNOWN:
            index = _rebuilt(scope, index, endpoint)
            fmt = None if index is None else index.template(endpoint, scope)
        if not isinstance(fmt, str):
            return None
    mounted = scope.get("root_path", "")
    if mounted == root_path or not isinstance(mounted, str) or not mounted.startswith(root_path):
        return fmt
    prefix = mounted[len(root_path) :]
    if index is None:
        index = _index_for(scope)
    if index is not None and index.param_prefixes and prefix not in index.literal_prefixes:
        for regex, template in index.param_prefixes.items():
            if regex.fullmatch(prefix):
                return template + fmt
    return prefix + fmt


def _index_for(scope: dict[str, Any]) -> _Index | None:
    # The outermost router (Starlette sets it once): its tree holds every mount.
    root = scope.get("router")
    if root is None:
        root = scope.get("app")
        if root is None:
            return None
    # Keyed by id() and checked through a weak reference: a WeakKeyDictionary look-up
    # makes a new weak reference on every request.
    entry = _indexes.get(id(root))
    if entry is not None and entry[0]() is root:
        return entry[1]
    try:
        ref = weakref.ref(root)
    except TypeError:  # not weak-referenceable
        return None
    if len(_indexes) >= _MAX_APPS:
        _indexes.clear()
    index = _Index(root, set())
    _indexes[id(root)] = (ref, index)
    return index


def _rebuilt(scope: dict[str, Any], index: _Index, endpoint: Any) -> _Index | None:
    """The index again, for an endpoint it lacks: routes may have been added since."""
    misses = index.misses
    if endpoint in misses or len(misses) >= _MAX_MISSES:
        return None
    misses.add(endpoint)
    root = scope.get("router")
    if root is None:
        root = scope.get("app")
    index = _Index(root, misses)
    _indexes[id(root)] = (weakref.ref(root), index)
    return index


class _Index:
    """The routes under one router, built once: by endpoint, mounted apps, mount paths."""

    def __init__(self, root: Any, misses: set[Any]) -> None:
        self.misses = misses
        self.leaves: dict[Any, list[Any]] = {}
        # A mounted app, and whether it routes (then what it did not match has no route).
        self.mounts: dict[Any, bool] = {}
        self.literal_prefixes: set[str] = set()
        self.param_prefixes: dict[re.Pattern[str], str] = {}
        self._walk(getattr(root, "routes", ()), (), 0)

    def template(self, endpoint: Any, scope: dict[str, Any]) -> str | object | None:
        try:
            candidates = self.leaves.get(endpoint)
            routes = self.mounts.get(endpoint)
        except TypeError:  # unhashable endpoint
            return None
        if candidates is None:
            if routes is None:
                return _UNKNOWN
            return None if routes else "/{path}"
        if len(candidates) == 1:
            return _format(candidates[0])
        path = scope.get("path", "")
        mounted = scope.get("root_path", "")
        # Starlette before 0.35 cut the mount's part off the path; later ones keep it.
        if isinstance(path, str) and isinstance(mounted, str) and path.startswith(mounted):
            path = path[len(mounted) :]
        for route in candidates:
            regex = getattr(route, "path_regex", None)
            if regex is not None and regex.match(path):
                return _format(route)
        return None

    def _walk(self, routes: Any, mounts: tuple[str, ...], depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        try:
            routes = list(routes)
        except TypeError:
            return
        for route in routes:
            contexts = getattr(route, "effective_route_contexts", None)
            if contexts is not None:
                # FastAPI 0.137 on: a router included with a prefix, whose routes carry
                # only their own paths; its contexts are the routes as included.
                try:
                    included = [getattr(c, "starlette_route", None) or c for c in contexts()]
                except Exception as exc:  # a FastAPI that changed what this reads
                    _failures.failed("reading the routes of an included router", exc)
                    continue
                self._walk(included, mounts, depth + 1)
                continue
            endpoint = getattr(route, "endpoint", None)
            if endpoint is not None:
                with contextlib.suppress(TypeError):
                    self.leaves.setdefault(endpoint, []).append(route)
                continue
            children = getattr(route, "routes", None)
            app = getattr(route, "app", None)
            if not children and app is not None:
                children = _routes_below(app)
            if app is not None:
                with contextlib.suppress(TypeError):
                    self.mounts[app] = self.mounts.get(app, False) or bool(children)
            inner = mounts
            path, fmt = getattr(route, "path", None), getattr(route, "path_format", None)
            if isinstance(path, str) and isinstance(fmt, str) and fmt.endswith("/{path}"):
                inner = (*mounts, path)  # a Mount; a Host adds no path
                self._add_prefixes(inner)
            if children:
                self._walk(children, inner, depth + 1)

    def _add_prefixes(self, mounts: tuple[str, ...]) -> None:
        # The request may have entered below the first mounts (LoopWatch inside a mounted
        # app), and ended in this one.
        for start in range(len(mounts)):
            prefix = "".join(mounts[start:])
            if "{" not in prefix:
                self.literal_prefixes.add(prefix)
                continue
            pattern, template, end = [], [], 0
            for param in _PARAM.finditer(prefix):
                pattern.append(re.escape(prefix[end : param.start()]))
                pattern.append(".+" if param.group(2) == "path" else "[^/]+")
                template.append(prefix[end : param.start()] + "{" + param.group(1) + "}")
                end = param.end()
            pattern.append(re.escape(prefix[end:]))
            template.append(prefix[end:])
            self.param_prefixes.setdefault(re.compile("".join(pattern)), "".join(template))


def _routes_below(app: Any) -> Any:
    """The routes of a mounted app wrapped in middleware (a LoopWatch of its own, say),
    which Starlette's Mount does not look through (before Starlette 1.7 sets
    ``scope["route"]``, this is how such a route is found)."""
    for _ in range(_MAX_DEPTH):
        app = getattr(app, "app", None)
        if app is None:
            return None
        routes = getattr(app, "routes", None)
        if routes:
            return routes
    return None


def _format(route: Any) -> str | None:
    fmt = getattr(route, "path_format", None)
    if not isinstance(fmt, str):
        fmt = getattr(route, "path", None)
    return fmt if isinstance(fmt, str) else None
