package castellan.cloud_ci_test

import rego.v1

req(method, claims) := {
	"version": 1,
	"trust_domain": "example.org",
	"attestation": {"method": method, "subject": "s", "selectors": [], "claims": claims},
	"request": {"ttl_seconds": null},
}

github := {"repository": "acme/api", "environment": "production", "ref": "refs/heads/main"}

github_data := {"allow": [
	{"repository": "acme/api", "environments": ["production"]},
	{"repository": "acme/docs"},
]}

test_github_is_denied_by_default if {
	d := data.castellan.issuance.decision with input as req("github_oidc", github)
	not d.allow
	d.reasons == ["repository \"acme/api\" (environment \"production\") is not in data.castellan.issuance.github_oidc.allow"]
}

test_github_allowed_repository_and_environment if {
	d := data.castellan.issuance.decision with input as req("github_oidc", github)
		with data.castellan.issuance.github_oidc as github_data
	d.allow
	d.spiffe_id == "spiffe://example.org/github/acme/api"
}

test_github_other_environment_is_denied if {
	staging := object.union(github, {"environment": "staging"})
	d := data.castellan.issuance.decision with input as req("github_oidc", staging)
		with data.castellan.issuance.github_oidc as github_data
	not d.allow
}

test_github_rule_without_environments_allows_any if {
	docs := {"repository": "acme/docs", "ref": "refs/heads/main"}
	d := data.castellan.issuance.decision with input as req("github_oidc", docs)
		with data.castellan.issuance.github_oidc as github_data
	d.allow
}

test_github_rule_can_require_key_binding if {
	bound_data := {"allow": [{"repository": "acme/api", "require_key_binding": true}]}
	unbound := data.castellan.issuance.decision with input as req("github_oidc", object.union(github, {"key_bound": false}))
		with data.castellan.issuance.github_oidc as bound_data
	not unbound.allow
	some reason in unbound.reasons
	contains(reason, "needs a token bound to the requested key")
	bound := data.castellan.issuance.decision with input as req("github_oidc", object.union(github, {"key_bound": true}))
		with data.castellan.issuance.github_oidc as bound_data
	bound.allow
}

gce := {"project_id": "acme-prod", "zone": "europe-west1-b", "instance_id": "123", "instance_name": "web-1"}

test_gcp_project_allow_list if {
	denied := data.castellan.issuance.decision with input as req("gcp_iit", gce)
	not denied.allow
	d := data.castellan.issuance.decision with input as req("gcp_iit", gce)
		with data.castellan.issuance.gcp_iit.allowed_projects as ["acme-prod"]
	d.allow
	d.spiffe_id == "spiffe://example.org/gcp/acme-prod/instance/123"
}

azure := {"tenant": "t-1", "principal_id": "p-1", "subscription": "s-1", "resource_group": "rg"}

test_azure_tenant_and_subscription_allow_list if {
	denied := data.castellan.issuance.decision with input as req("azure_msi", azure)
	not denied.allow
	d := data.castellan.issuance.decision with input as req("azure_msi", azure)
		with data.castellan.issuance.azure_msi.allow as [{"tenant": "t-1", "subscriptions": ["s-1"]}]
	d.allow
	d.spiffe_id == "spiffe://example.org/azure/t-1/principal/p-1"
	other := data.castellan.issuance.decision with input as req("azure_msi", azure)
		with data.castellan.issuance.azure_msi.allow as [{"tenant": "t-1", "subscriptions": ["s-2"]}]
	not other.allow
}
