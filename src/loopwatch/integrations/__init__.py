"""Database drivers and ORMs, instrumented through proxies (no patching)."""
