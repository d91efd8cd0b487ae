"""Reads a running gateway the way Python's grpcio clients do: server reflection over
`grpc.reflection.v1alpha` (the only version grpcio-reflection's client speaks) and the standard
health service. Exits non-zero, saying what failed, when any answer is not the expected one.

Usage: python3 scripts/grpcio_reflection_check.py HOST:PORT
"""

import sys

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "pushgate.v1.PushGateway"
# Services that must be listed (reflection lists every service of the registered descriptors).
EXPECTED = {
    SERVICE,
    "pushgate.v1.PushGatewayPolicy",
    "pushgate.v1.PushGatewayInsights",
    "grpc.health.v1.Health",
}
METHODS = {"SendBatch", "StreamSend", "SubscribeReceipts"}


def fail(message):
    print(f"grpcio-reflection: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def ask(stub, request):
    """One request on the bidirectional ServerReflectionInfo stream, one answer."""
    try:
        answers = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    except grpc.RpcError as error:
        fail(f"grpc.reflection.v1alpha answered {error.code()}: {error.details()}")
    if len(answers) != 1:
        fail(f"{len(answers)} answers to one reflection request")
    answer = answers[0]
    if answer.HasField("error_response"):
        fail(f"reflection error {answer.error_response.error_code}: {answer.error_response.error_message}")
    return answer


def main():
    if len(sys.argv) != 2:
        fail("usage: grpcio_reflection_check.py HOST:PORT")
    channel = grpc.insecure_channel(sys.argv[1])
    grpc.channel_ready_future(channel).result(timeout=10)

    # The raw v1alpha protocol: list the services, then the file that defines PushGateway.
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed = ask(stub, reflection_pb2.ServerReflectionRequest(list_services=""))
    services = {s.name for s in listed.list_services_response.service}
    missing = EXPECTED - services
    if missing:
        fail(f"v1alpha list_services lacks {sorted(missing)} (got {sorted(services)})")
    found = ask(stub, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in found.file_descriptor_response.file_descriptor_proto
    ]
    defining = [f for f in files if any(f"{f.package}.{s.name}" == SERVICE for s in f.service)]
    if not defining:
        fail(f"file_containing_symbol {SERVICE} returned {[f.name for f in files]}, none defines it")
    print(f"grpcio-reflection: v1alpha lists {len(services)} services; {SERVICE} is in {defining[0].name}")

    # What grpcio clients build on: a descriptor pool fed by reflection, resolving the service's
    # methods and their message types (dependencies fetched on demand).
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)
    methods = {m.name for m in service.methods}
    if not METHODS <= methods:
        fail(f"{SERVICE} resolved with methods {sorted(methods)}, expected {sorted(METHODS)}")
    send = service.methods_by_name["SendBatch"]
    if send.input_type.full_name != "pushgate.v1.SendBatchRequest" or "recipients" not in send.input_type.fields_by_name:
        fail(f"SendBatch's input resolved as {send.input_type.full_name}")
    print(f"grpcio-reflection: descriptor pool resolved {SERVICE} ({', '.join(sorted(methods))})")

    # Health per service, and for the server as a whole; an unknown service is NOT_FOUND.
    health = health_pb2_grpc.HealthStub(channel)
    for name in (SERVICE, ""):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            fail(f"health of {name!r} is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    try:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        fail("health of an unknown service answered instead of NOT_FOUND")
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            fail(f"health of an unknown service: {error.code()}, expected NOT_FOUND")
    print(f"grpcio-reflection: health SERVING for {SERVICE!r} and ''")
    print("grpcio-reflection: OK")


if __name__ == "__main__":
    main()
