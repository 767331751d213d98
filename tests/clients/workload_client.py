"""A Workload API client on gRPC C-core (grpcio), with default channel
options, as py-spiffe and C++/Ruby/PHP clients are built: it calls every
Workload API RPC with raw protobuf bytes and prints one line per call.

    workload_client.py TARGET
"""

import sys

import grpc


def fields(buf):
    """(field number, bytes) of the length-delimited fields of a message."""
    out, i = [], 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 2:
            n = varint()
            out.append((number, buf[i : i + n]))
            i += n
        elif wire == 0:
            varint()
        else:
            raise ValueError(f"wire type {wire}")
    return out


def string_field(number, text):
    data = text.encode()
    return bytes([number << 3 | 2, len(data)]) + data


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    meta = [("workload.spiffe.io", "true")]

    def call(kind, path, request):
        rpc = getattr(channel, kind)(path, request_serializer=lambda m: m, response_deserializer=lambda b: b)
        if kind == "unary_unary":
            return rpc(request, metadata=meta, timeout=20)
        for response in rpc(request, metadata=meta, timeout=20):
            return response

    x509 = call("unary_stream", "/SpiffeWorkloadAPI/FetchX509SVID", b"")
    print("FetchX509SVID svids", sum(1 for n, _ in fields(x509) if n == 1))
    bundles = call("unary_stream", "/SpiffeWorkloadAPI/FetchX509Bundles", b"")
    print("FetchX509Bundles bundles", sum(1 for n, _ in fields(bundles) if n == 2))
    # JWTSVIDRequest{audience: ["relying-party"]}
    jwt = call("unary_unary", "/SpiffeWorkloadAPI/FetchJWTSVID", string_field(1, "relying-party"))
    svid = dict(fields(dict(fields(jwt))[1]))
    token = svid[2].decode()
    print("FetchJWTSVID", svid[1].decode())
    jwt_bundles = call("unary_stream", "/SpiffeWorkloadAPI/FetchJWTBundles", b"")
    print("FetchJWTBundles bundles", sum(1 for n, _ in fields(jwt_bundles) if n == 1))
    # ValidateJWTSVIDRequest{audience, svid}
    valid = call(
        "unary_unary",
        "/SpiffeWorkloadAPI/ValidateJWTSVID",
        string_field(1, "relying-party") + bytes([2 << 3 | 2]) + varint_bytes(len(token)) + token.encode(),
    )
    print("ValidateJWTSVID", dict(fields(valid))[1].decode())


def varint_bytes(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


main()
