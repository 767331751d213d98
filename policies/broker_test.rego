package castellan.broker_test

import rego.v1


agent(ns, sa, scopes) := {
	"version": 1,
	"trust_domain": "example.org",
	"attestation": {"method": "k8s_sat", "subject": sprintf("ns/%s/sa/%s", [ns, sa]), "selectors": [], "claims": {"namespace": ns, "service_account": sa, "trust_source": "dev-cluster"}},
	"request": {"agent_id": sa, "scopes": scopes, "audience": ["tools"], "ttl_seconds": null, "task": null},
	"delegation": {"chain": [], "depth": 0, "parent": null},
}

test_an_agent_gets_its_identity_and_allowed_scopes if {
	d := data.castellan.broker.decision with input as agent("agents", "triage-bot", ["tickets:read"])
	d.outcome == "issue"
	d.spiffe_id == "spiffe://example.org/agent/triage-bot"
	d.ttl_seconds == 900
	"tickets:read" in d.scopes
}

test_payments_write_goes_to_approval if {
	d := data.castellan.broker.decision with input as agent("agents", "pay-bot", ["payments:write"])
	d.outcome == "approve"
	d.approval.required_approvals == 1
}

test_other_namespaces_are_denied if {
	d := data.castellan.broker.decision with input as agent("default", "bot", ["tickets:read"])
	d.outcome == "deny"
}

test_an_agent_cannot_claim_another_agents_id if {
	i := object.union(agent("agents", "bot", ["tickets:read"]), {"request": {"agent_id": "admin-bot", "scopes": ["tickets:read"], "audience": ["t"]}})
	d := data.castellan.broker.decision with input as i
	d.outcome == "deny"
}

test_unknown_scopes_alone_are_denied if {
	d := data.castellan.broker.decision with input as agent("agents", "bot", ["root:all"])
	d.outcome == "deny"
}

test_the_chain_depth_is_limited if {
	i := object.union(agent("agents", "bot", ["tickets:read"]), {"delegation": {"chain": [], "depth": 3, "parent": null}})
	d := data.castellan.broker.decision with input as i
	d.outcome == "deny"
}

test_a_scope_the_parent_lacks_does_not_escalate if {
	i := object.union(agent("agents", "bot", ["tickets:read", "payments:write"]), {"delegation": {"chain": [], "depth": 1, "parent": {"scopes": ["tickets:read"]}}})
	d := data.castellan.broker.decision with input as i
	d.outcome == "issue"
}
