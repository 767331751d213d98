# Attested issuance for CI and cloud workloads: GitHub Actions OIDC tokens,
# Google instance identity tokens and Azure managed-identity tokens.
#
# A trust source for one of these methods accepts every job or instance its
# issuer vouches for (every GitHub repository, every GCE instance), so each
# method is deny-by-default: data.castellan.issuance.<method> lists who may
# receive an identity.
package castellan.issuance

import rego.v1

supported_methods contains "github_oidc"

supported_methods contains "gcp_iit"

supported_methods contains "azure_msi"

claims := input.attestation.claims

# --- github_oidc: spiffe://TD/github/OWNER/REPO --------------------------

identity[method] := id if {
	method := "github_oidc"
	input.attestation.method == method
	id := sprintf("spiffe://%s/github/%s", [input.trust_domain, claims.repository])
}

# `allow`: [{"repository": "acme/api", "environments": ["production"]}]. A
# rule without `environments` allows any environment, or none. A rule with
# `"require_key_binding": true` allows only tokens whose audience named the
# key being certified (the module's `key_bound` claim).
github_allowed if {
	some rule in data.castellan.issuance.github_oidc.allow
	rule.repository == claims.repository
	github_environment_allowed(rule)
	github_key_binding_allowed(rule)
}

github_environment_allowed(rule) if not rule.environments

github_environment_allowed(rule) if claims.environment in rule.environments

github_key_binding_allowed(rule) if not rule.require_key_binding

github_key_binding_allowed(rule) if claims.key_bound == true

deny contains msg if {
	input.attestation.method == "github_oidc"
	not github_allowed
	msg := sprintf(
		"repository %q (environment %q) is not in data.castellan.issuance.github_oidc.allow",
		[claims.repository, object.get(claims, "environment", "")],
	)
}

deny contains msg if {
	input.attestation.method == "github_oidc"
	not github_allowed
	some rule in data.castellan.issuance.github_oidc.allow
	rule.repository == claims.repository
	github_environment_allowed(rule)
	not github_key_binding_allowed(rule)
	msg := sprintf(
		"repository %q needs a token bound to the requested key (audience `<audience>/key/<hex SHA-256 of the key's DER SubjectPublicKeyInfo>`)",
		[claims.repository],
	)
}

# --- gcp_iit: spiffe://TD/gcp/PROJECT/instance/INSTANCE_ID ----------------

identity[method] := id if {
	method := "gcp_iit"
	input.attestation.method == method
	id := sprintf("spiffe://%s/gcp/%s/instance/%s", [input.trust_domain, claims.project_id, claims.instance_id])
}

deny contains msg if {
	input.attestation.method == "gcp_iit"
	not claims.project_id in data.castellan.issuance.gcp_iit.allowed_projects
	msg := sprintf("GCP project %q is not in data.castellan.issuance.gcp_iit.allowed_projects", [claims.project_id])
}

# --- azure_msi: spiffe://TD/azure/TENANT/principal/PRINCIPAL_ID ------------

identity[method] := id if {
	method := "azure_msi"
	input.attestation.method == method
	id := sprintf("spiffe://%s/azure/%s/principal/%s", [input.trust_domain, claims.tenant, claims.principal_id])
}

# `allow`: [{"tenant": "…", "subscriptions": ["…"]}]. A rule without
# `subscriptions` allows the whole tenant.
azure_allowed if {
	some rule in data.castellan.issuance.azure_msi.allow
	rule.tenant == claims.tenant
	azure_subscription_allowed(rule)
}

azure_subscription_allowed(rule) if not rule.subscriptions

azure_subscription_allowed(rule) if claims.subscription in rule.subscriptions

deny contains msg if {
	input.attestation.method == "azure_msi"
	not azure_allowed
	msg := sprintf(
		"Azure tenant %q subscription %q is not in data.castellan.issuance.azure_msi.allow",
		[claims.tenant, claims.subscription],
	)
}
