# Subordinate CAs that Castellan's root signs: POST /api/v1/ca/intermediates
# (admin only). Input and decision documents (version 1) are in
# policies/README.md. Whatever this returns, the host limits every
# subordinate to path length 0, to this trust domain's SPIFFE IDs (no DNS
# name or IP address) and to the root's life.
package castellan.ca

import rego.v1

cfg := data.castellan.ca

deny contains msg if {
	not regex.match(`^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$`, input.request.name)
	msg := "the subordinate's name must be 1 to 64 letters, digits, spaces, `.`, `_` or `-`"
}

ttl := cfg.default_ttl_seconds if input.request.ttl_seconds == null

ttl := min({input.request.ttl_seconds, cfg.max_ttl_seconds}) if is_number(input.request.ttl_seconds)

decision := {"allow": false, "reasons": sort([m | some m in deny])} if count(deny) > 0

decision := {"allow": true, "ttl_seconds": ttl, "reasons": []} if count(deny) == 0
