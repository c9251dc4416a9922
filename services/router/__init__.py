"""Router: the public gRPC API; places requests on prefill and decode workers."""
