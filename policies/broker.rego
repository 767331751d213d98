# The AI-agent broker: POST /api/v1/broker/agent-identities and RFC 8693 token
# exchange. Input and decision documents (version 1) are in policies/README.md.
# The host intersects `scopes` with the request and the parent's, and caps the
# lifetime by the parent's, whatever this returns.
package castellan.broker

import data.castellan.sources
import rego.v1


claims := input.attestation.claims

# An agent is its service account: it may only be the agent it was attested as.
agent_id := input.request.agent_id if is_string(input.request.agent_id)

agent_id := claims.service_account if not is_string(input.request.agent_id)

deny contains msg if {
	input.attestation.method != "k8s_sat"
	msg := sprintf("agents must be attested by k8s_sat, not %s", [input.attestation.method])
}

deny contains msg if {
	input.attestation.method == "k8s_sat"
	claims.namespace != data.castellan.broker.agent_namespace
	msg := sprintf("namespace %q may not use the broker", [claims.namespace])
}

deny contains msg if {
	agent_id != claims.service_account
	msg := sprintf("agent_id %q is not the attested service account %q", [agent_id, claims.service_account])
}

deny contains msg if {
	input.delegation.depth >= data.castellan.broker.max_delegation_depth
	msg := sprintf("delegation chain depth %d reaches the limit of %d", [input.delegation.depth, data.castellan.broker.max_delegation_depth])
}

# What could be granted: requested, allowed here, and held by the parent agent
# when there is one (the host enforces the same intersection afterwards).
granted := [s | some s in input.request.scopes; s in data.castellan.broker.allowed_scopes; held_by_parent(s)]

held_by_parent(_) if input.delegation.parent == null

held_by_parent(s) if s in input.delegation.parent.scopes

deny contains "none of the requested scopes is allowed" if count(granted) == 0

needs_approval if {
	some s in granted
	s in data.castellan.broker.approval_scopes
}

base := {
	"agent_id": agent_id,
	"spiffe_id": sprintf("spiffe://%s/%s", [
		input.trust_domain,
		sources.path(claims.trust_source, sprintf("agent/%s", [agent_id])),
	]),
	"scopes": data.castellan.broker.allowed_scopes,
	"ttl_seconds": data.castellan.broker.max_ttl_seconds,
}

decision := {"outcome": "deny", "reasons": sort([m | some m in deny])} if count(deny) > 0

decision := object.union(base, {"outcome": "issue"}) if {
	count(deny) == 0
	not needs_approval
}

decision := object.union(base, {"outcome": "approve", "approval": data.castellan.broker.approval}) if {
	count(deny) == 0
	needs_approval
}
