"""Grafana dashboards as code: ``python -m dashboards.generate`` writes the committed JSON files."""
