"""An SDS client as Envoy is one: gRPC C-core (grpcio) with default channel
options and code generated from Envoy's official protos (xds-protos).

    sds_client.py fetch  TARGET [--no-spiffe] NAME...
    sds_client.py stream TARGET COUNT NAME...

`fetch` calls FetchSecrets once; `stream` opens StreamSecrets, acknowledges
every response as Envoy does (version and nonce) and stops after COUNT
responses. Each response is printed as one JSON line; an RPC error as
{"error": CODE, "details": ...}. Private keys are never printed, only
their SHA-256.
"""

import hashlib
import json
import queue
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def node(no_spiffe):
    n = base_pb2.Node(id="sidecar~10.0.0.1~web~default", cluster="web", user_agent_name="envoy")
    n.user_agent_build_version.version.major_number = 1
    n.user_agent_build_version.version.minor_number = 31
    if no_spiffe:
        n.metadata.fields["disable_spiffe_cert_validation"].bool_value = True
    return n


def data(source):
    assert source.WhichOneof("specifier") == "inline_bytes", source
    return source.inline_bytes.decode()


def describe(response):
    secrets = []
    for resource in response.resources:
        assert resource.type_url == SECRET, resource.type_url
        s = secret_pb2.Secret()
        assert resource.Unpack(s)
        kind = s.WhichOneof("type")
        out = {"name": s.name, "kind": kind}
        if kind == "tls_certificate":
            key = data(s.tls_certificate.private_key)
            out["chain"] = data(s.tls_certificate.certificate_chain)
            out["key_sha256"] = hashlib.sha256(key.encode()).hexdigest()
            out["key_is_pkcs8_pem"] = key.startswith("-----BEGIN PRIVATE KEY-----\n")
        elif kind == "validation_context":
            vc = s.validation_context
            if vc.HasField("custom_validator_config"):
                out["validator"] = vc.custom_validator_config.name
                config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
                assert vc.custom_validator_config.typed_config.Unpack(config)
                out["trust_domains"] = {td.name: data(td.trust_bundle) for td in config.trust_domains}
            else:
                out["trusted_ca"] = data(vc.trusted_ca)
        secrets.append(out)
    return {
        "version": response.version_info,
        "nonce": response.nonce,
        "type_url": response.type_url,
        "secrets": secrets,
    }


def emit(obj):
    print(json.dumps(obj), flush=True)


def main():
    mode, target = sys.argv[1], sys.argv[2]
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(grpc.insecure_channel(target))
    try:
        if mode == "fetch":
            names = sys.argv[3:]
            no_spiffe = "--no-spiffe" in names
            names = [n for n in names if n != "--no-spiffe"]
            request = discovery_pb2.DiscoveryRequest(node=node(no_spiffe), resource_names=names, type_url=SECRET)
            emit(describe(stub.FetchSecrets(request, timeout=20)))
        else:
            count, names = int(sys.argv[3]), sys.argv[4:]
            requests = queue.Queue()
            requests.put(discovery_pb2.DiscoveryRequest(node=node(False), resource_names=names, type_url=SECRET))

            def outgoing():
                while True:
                    r = requests.get()
                    if r is None:
                        return
                    yield r

            responses = stub.StreamSecrets(outgoing(), timeout=60)
            for i, response in enumerate(responses):
                emit(describe(response))
                # Acknowledge, as Envoy does: the version applied, the nonce answered.
                requests.put(
                    discovery_pb2.DiscoveryRequest(
                        version_info=response.version_info,
                        resource_names=names,
                        type_url=SECRET,
                        response_nonce=response.nonce,
                    )
                )
                if i + 1 == count:
                    requests.put(None)
                    responses.cancel()
                    break
    except grpc.RpcError as e:
        emit({"error": e.code().name, "details": e.details()})


main()
