"""The kubelet's PodResources v1 gRPC API: its own .proto (vendored) and the modules protoc made from it.

Imported only by the server side when Kubernetes attribution is on (``grpcio`` and ``protobuf`` come
with the ``kubelet`` extra); the training hook never imports this package.
"""
