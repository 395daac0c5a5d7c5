"""GPU and training-job exporter for Prometheus.

This package must stay importable without the server's dependencies: the training hook
(``exporter.hook``) is imported inside training processes, which must not pull FastAPI, uvicorn,
docker or NVML. Import nothing heavy here.
"""

__version__ = "0.1.0"
