"""Sample multi-task training workload that uses the training hook; the end-to-end tests run it.

``python -m workload.train --help`` lists the fault-injection flags; ``workload.token_server`` is the
bearer-token "dataset" server it can fetch batches from (answers 401 once the token has expired).
"""
