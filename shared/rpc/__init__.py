"""Generated gRPC stubs of `proto/baton/v1` (regenerate with `python -m baton.shared.rpc.codegen`).

`common_pb2`: shared messages; `router_pb2(_grpc)`: the public Router API;
`worker_pb2(_grpc)`: the internal DecodeWorker and PrefillWorker APIs.
"""
