"""Receiving the training hook's pushes: who may push (``auth``), limits before parsing (``guard``),
the route (``router``), the schema check (``validate``) and the per-process store (``store``).
The push format itself is exporter.hook.schema."""
