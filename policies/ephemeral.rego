# Ephemeral, approval-gated issuance: POST /api/v1/ephemeral.
# Input and decision documents (version 1) are described in policies/README.md.
package castellan.ephemeral

import data.castellan.sources
import rego.v1


# A person or CI principal (an API token, or an OIDC login linked to one)
# gets a user identity; an OIDC login linked to no token gets one in its
# issuer's namespace, which can never equal a token holder's; a workload
# gets the identity its attestation proves, never one it names itself.
identity := sprintf("spiffe://%s/user/%s", [input.trust_domain, substring(input.requester.id, 5, -1)]) if {
	input.requester.kind != "evidence"
	startswith(input.requester.id, "user:")
}

identity := sprintf("spiffe://%s/oidc/%s/%s", [input.trust_domain, parts[1], concat(":", array.slice(parts, 2, count(parts)))]) if {
	input.requester.kind == "oidc"
	parts := split(input.requester.id, ":")
	parts[0] == "oidc"
}

identity := sprintf("spiffe://%s/%s", [
	input.trust_domain,
	sources.path(input.attestation.claims.trust_source, sprintf("ns/%s/sa/%s", [
		input.attestation.claims.namespace,
		input.attestation.claims.service_account,
	])),
]) if {
	input.requester.kind == "evidence"
	input.attestation.method == "k8s_sat"
}

deny contains "no identity is defined for this requester" if not identity

deny contains msg if {
	is_string(input.request.spiffe_id)
	input.request.spiffe_id != identity
	msg := sprintf("%s may not ask for %s", [input.requester.name, input.request.spiffe_id])
}

ttl_seconds := min([input.request.ttl_seconds, data.castellan.ephemeral.max_ttl_seconds]) if is_number(input.request.ttl_seconds)

ttl_seconds := data.castellan.ephemeral.default_ttl_seconds if not is_number(input.request.ttl_seconds)

decision := {"outcome": "deny", "reasons": sort([m | some m in deny])} if count(deny) > 0

decision := {
	"outcome": "approve",
	"spiffe_id": identity,
	"ttl_seconds": ttl_seconds,
	"dns_names": [],
	"approval": {
		"required_approvals": data.castellan.ephemeral.required_approvals,
		"approver_groups": data.castellan.ephemeral.approver_groups,
		"deny_threshold": 1,
		"pending_ttl_seconds": data.castellan.ephemeral.pending_ttl_seconds,
	},
	"emergency": data.castellan.ephemeral.emergency,
} if count(deny) == 0
