# Adds the `ci_job` method to castellan.issuance: a CI job gets
# spiffe://<td>/ci/<repository> for jobs on the main branch only.
package castellan.issuance

import rego.v1

supported_methods contains "ci_job"

identity[method] := id if {
	method := "ci_job"
	input.attestation.method == method
	id := sprintf("spiffe://%s/ci/%s", [input.trust_domain, input.attestation.claims.repository])
}

deny contains msg if {
	input.attestation.method == "ci_job"
	input.attestation.claims.ref != "refs/heads/main"
	msg := sprintf("CI identities are only for refs/heads/main, not %s", [input.attestation.claims.ref])
}
