"""The HTTP side: the app and its routes (``app``), TLS and the web-config file (``webconfig``), basic
auth (``basic_auth``), limits below ASGI (``http_limits``). It serves what the poller and the metric
sources hold and never imports exporter.nvml or exporter.attribution."""
