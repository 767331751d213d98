package castellan.ca_test

import rego.v1

ask(name, ttl) := {
	"version": 1,
	"trust_domain": "example.org",
	"requester": "admin",
	"request": {"name": name, "ttl_seconds": ttl, "public_key_sha256": "00"},
}

test_a_named_subordinate_gets_the_default_lifetime if {
	d := data.castellan.ca.decision with input as ask("team-payments CA", null)
	d.allow
	d.ttl_seconds == 2592000
}

test_the_lifetime_is_capped if {
	d := data.castellan.ca.decision with input as ask("team-payments", 999999999)
	d.ttl_seconds == 7776000
	e := data.castellan.ca.decision with input as ask("team-payments", 3600)
	e.ttl_seconds == 3600
}

test_a_bad_name_is_refused if {
	d := data.castellan.ca.decision with input as ask("", null)
	not d.allow
	count(d.reasons) == 1
	e := data.castellan.ca.decision with input as ask("evil\nname", null)
	not e.allow
}
