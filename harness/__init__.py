"""What tests and benchmarks share: real child processes on loopback ports (``process``), waiting on
conditions and the real Prometheus / Alertmanager (``support``), the bigger live stacks
(``alert_stack``, ``dashboard_stack``, ``docker_stack``), one hand-moved clock (``clock``) and a real
hook push (``payloads``).

An ordinary package at the repository root: pytest finds it through ``pythonpath`` in pyproject.toml,
benchmarks run as ``python -m benchmarks.NAME`` from the root. Nothing here edits ``sys.path``.
"""
