"""Renderers: text helpers and the timeline. They do no I/O."""
