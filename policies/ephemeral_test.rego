package castellan.ephemeral_test

import rego.v1


person(name) := {
	"version": 1,
	"trust_domain": "example.org",
	"requester": {"kind": "token", "id": sprintf("user:%s", [name]), "name": name, "role": "requester", "groups": []},
	"attestation": null,
	"request": {"spiffe_id": null, "ttl_seconds": null, "dns_names": [], "justification": "incident 42", "emergency": false},
}

test_a_person_needs_two_sre_approvals if {
	d := data.castellan.ephemeral.decision with input as person("alice")
	d.outcome == "approve"
	d.spiffe_id == "spiffe://example.org/user/alice"
	d.approval.required_approvals == 2
	d.approval.approver_groups == ["sre"]
	d.approval.pending_ttl_seconds == 900
	d.ttl_seconds == 900
}

test_ttl_is_capped if {
	i := object.union(person("alice"), {"request": object.union(person("alice").request, {"ttl_seconds": 99999})})
	d := data.castellan.ephemeral.decision with input as i
	d.ttl_seconds == 3600
}

test_asking_for_someone_elses_identity_is_denied if {
	r := object.union(person("alice").request, {"spiffe_id": "spiffe://example.org/user/bob"})
	d := data.castellan.ephemeral.decision with input as object.union(person("alice"), {"request": r})
	d.outcome == "deny"
}

test_break_glass_is_off_by_default if {
	d := data.castellan.ephemeral.decision with input as person("alice")
	d.emergency.allowed == false
}

test_a_workload_gets_its_attested_identity if {
	i := object.union(person("x"), {
		"requester": {"kind": "evidence", "id": "workload:k8s_sat:ns/ci/sa/deployer", "name": "ns/ci/sa/deployer", "role": "requester", "groups": []},
		"attestation": {"method": "k8s_sat", "subject": "ns/ci/sa/deployer", "selectors": [], "claims": {"namespace": "ci", "service_account": "deployer", "trust_source": "dev-cluster"}},
	})
	d := data.castellan.ephemeral.decision with input as i
	d.spiffe_id == "spiffe://example.org/ns/ci/sa/deployer"
}

test_an_unlinked_oidc_login_gets_its_issuers_namespace if {
	i := object.union(person("x"), {"requester": {
		"kind": "oidc", "id": "oidc:corp:bob", "name": "bob",
		"role": "approver", "groups": [],
	}})
	d := data.castellan.ephemeral.decision with input as i
	d.spiffe_id == "spiffe://example.org/oidc/corp/bob"
}

test_an_oidc_login_linked_to_a_token_is_that_person if {
	i := object.union(person("x"), {"requester": {
		"kind": "oidc", "id": "user:bob", "name": "bob",
		"role": "approver", "groups": [],
	}})
	d := data.castellan.ephemeral.decision with input as i
	d.spiffe_id == "spiffe://example.org/user/bob"
}
