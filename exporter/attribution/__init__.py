"""Who owns a GPU process: its container (``containers``, with the Docker engine behind ``docker``) and
its training job and rank (``training``), both read from the host's /proc through ``procfs``, the one
module that knows where /proc is (``--proc-root``). Each part is a poller enricher.

Importing this package imports nothing else: the training hook uses ``procfs.namespace_inode``.
"""
