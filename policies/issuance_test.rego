package castellan.issuance_test

import rego.v1


attestation(ns, sa) := {
	"method": "k8s_sat",
	"subject": sprintf("ns/%s/sa/%s", [ns, sa]),
	"selectors": [sprintf("k8s:ns:%s", [ns]), sprintf("k8s:sa:%s", [sa])],
	"claims": {"namespace": ns, "service_account": sa, "trust_source": "dev-cluster"},
}

req(ns, sa, ttl) := {
	"version": 1,
	"trust_domain": "example.org",
	"attestation": attestation(ns, sa),
	"request": {"ttl_seconds": ttl},
}

test_default_spiffe_id_and_ttl if {
	d := data.castellan.issuance.decision with input as req("prod", "api", null)
	d.allow
	d.spiffe_id == "spiffe://example.org/ns/prod/sa/api"
	d.ttl_seconds == 900
}

test_requested_ttl_is_honoured_below_the_maximum if {
	d := data.castellan.issuance.decision with input as req("prod", "api", 120)
	d.ttl_seconds == 120
}

test_requested_ttl_is_capped_at_the_maximum if {
	d := data.castellan.issuance.decision with input as req("prod", "api", 86400)
	d.ttl_seconds == 3600
}

test_kube_system_is_denied if {
	d := data.castellan.issuance.decision with input as req("kube-system", "default", null)
	not d.allow
	d.reasons == ["namespace \"kube-system\" may not receive identities"]
}

test_denied_namespaces_come_from_data if {
	d := data.castellan.issuance.decision with input as req("payments", "api", null)
		with data.castellan.issuance.denied_namespaces as ["payments"]
	not d.allow
}

test_unknown_method_is_denied if {
	base := req("prod", "api", null)
	i := object.union(base, {"attestation": object.union(base.attestation, {"method": "carrier_pigeon"})})
	d := data.castellan.issuance.decision with input as i
	not d.allow
}

from_source(source) := object.union(req("prod", "api", null), {"attestation": object.union(
	attestation("prod", "api"),
	{"claims": {"namespace": "prod", "service_account": "api", "trust_source": source}},
)})

test_identities_are_bound_to_their_trust_source if {
	# A source with no prefix of its own lives under its name: a second
	# cluster with the same namespaces never mints the first one's IDs.
	d := data.castellan.issuance.decision with input as from_source("staging-cluster")
	d.spiffe_id == "spiffe://example.org/staging-cluster/ns/prod/sa/api"

	# The operator maps sources to prefixes, "" for none.
	prefixes := {"prod-east": "", "prod-west": "west"}
	east := data.castellan.issuance.decision with input as from_source("prod-east")
		with data.castellan.source_prefixes as prefixes
	east.spiffe_id == "spiffe://example.org/ns/prod/sa/api"
	west := data.castellan.issuance.decision with input as from_source("prod-west")
		with data.castellan.source_prefixes as prefixes
	west.spiffe_id == "spiffe://example.org/west/ns/prod/sa/api"
	dev := data.castellan.issuance.decision with input as from_source("dev-cluster")
		with data.castellan.source_prefixes as prefixes
	dev.spiffe_id == "spiffe://example.org/dev-cluster/ns/prod/sa/api"
}
