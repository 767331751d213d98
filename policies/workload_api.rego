# The Workload API: whether a caller that matched a registration entry gets
# its SVID. Input (version 1): {"trust_domain", "attestation" (the `unix`
# module's: selectors unix:uid:, unix:gid:, unix:user:, unix:group:,
# unix:path:), "entry": {"id", "spiffe_id", "selectors"}}.
package castellan.workload_api

import rego.v1

deny contains "the entry's SPIFFE ID is outside this trust domain" if {
	not startswith(input.entry.spiffe_id, sprintf("spiffe://%s/", [input.trust_domain]))
}

decision := {"allow": count(deny) == 0, "reasons": sort([m | some m in deny])}
