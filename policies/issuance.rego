# Attested issuance: who gets an X.509-SVID from POST /api/v1/workloads/attested-issuance.
# Input and decision documents (version 1) are described in policies/README.md.
package castellan.issuance

import rego.v1

settings := data.castellan.issuance

namespace := input.attestation.claims.namespace

service_account := input.attestation.claims.service_account

deny contains msg if {
	input.attestation.method == "k8s_sat"
	namespace in settings.denied_namespaces
	msg := sprintf("namespace %q may not receive identities", [namespace])
}

deny contains msg if {
	not input.attestation.method in supported_methods
	msg := sprintf("no issuance rule for attestation method %q", [input.attestation.method])
}

supported_methods := {"k8s_sat"}

spiffe_id := sprintf("spiffe://%s/ns/%s/sa/%s", [input.trust_domain, namespace, service_account]) if {
	input.attestation.method == "k8s_sat"
}

# The requested TTL, capped by the maximum; the default when none was asked for.
ttl_seconds := min([input.request.ttl_seconds, settings.max_ttl_seconds]) if {
	is_number(input.request.ttl_seconds)
}

ttl_seconds := settings.default_ttl_seconds if {
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
