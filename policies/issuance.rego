# Attested issuance: who gets an X.509-SVID from POST /api/v1/workloads/attested-issuance.
# Input and decision documents (version 1) are described in policies/README.md.
package castellan.issuance

import data.castellan.sources
import rego.v1


namespace := input.attestation.claims.namespace

service_account := input.attestation.claims.service_account

deny contains msg if {
	input.attestation.method == "k8s_sat"
	namespace in data.castellan.issuance.denied_namespaces
	msg := sprintf("namespace %q may not receive identities", [namespace])
}

deny contains msg if {
	not input.attestation.method in supported_methods
	msg := sprintf("no issuance rule for attestation method %q", [input.attestation.method])
}

supported_methods contains "k8s_sat"

# One entry per attestation method; bundles that add a method add an entry
# (a partial object may be extended from several files, a `:=` rule may not).
identity[method] := id if {
	method := "k8s_sat"
	input.attestation.method == method
	rest := sprintf("ns/%s/sa/%s", [namespace, service_account])
	id := sprintf("spiffe://%s/%s", [input.trust_domain, sources.path(input.attestation.claims.trust_source, rest)])
}

spiffe_id := identity[input.attestation.method]

# The requested TTL, capped by the maximum; the default when none was asked for.
ttl_seconds := min([input.request.ttl_seconds, data.castellan.issuance.max_ttl_seconds]) if {
	is_number(input.request.ttl_seconds)
}

ttl_seconds := data.castellan.issuance.default_ttl_seconds if {
	not is_number(input.request.ttl_seconds)
}

decision := {
	"allow": true,
	"spiffe_id": spiffe_id,
	"ttl_seconds": ttl_seconds,
	"reasons": [],
} if {
	count(deny) == 0
}

decision := {
	"allow": false,
	"reasons": sort([m | some m in deny]),
} if {
	count(deny) > 0
}
