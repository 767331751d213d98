package castellan.hosts_test

import rego.v1

req(method, claims) := {
	"version": 1,
	"trust_domain": "example.org",
	"attestation": {"method": method, "subject": "s", "selectors": [], "claims": claims},
	"request": {"ttl_seconds": null},
}

aws := {"account": "123456789012", "region": "eu-west-1", "instance_id": "i-0abc", "image_id": "ami-1"}

test_aws_account_allow_list if {
	denied := data.castellan.issuance.decision with input as req("aws_iid", aws)
	not denied.allow
	d := data.castellan.issuance.decision with input as req("aws_iid", aws)
		with data.castellan.issuance.aws_iid.allowed_accounts as ["123456789012"]
	d.allow
	d.spiffe_id == "spiffe://example.org/aws/123456789012/eu-west-1/i-0abc"
}

test_join_token_names_the_host if {
	d := data.castellan.issuance.decision with input as req("join_token", {"name": "db-7", "jti": "x"})
	d.allow
	d.spiffe_id == "spiffe://example.org/host/db-7"
}

test_x509pop_needs_a_common_name_not_denied if {
	d := data.castellan.issuance.decision with input as req("x509pop", {"common_name": "edge-1"})
	d.spiffe_id == "spiffe://example.org/x509pop/edge-1"
	d.allow
	nocn := data.castellan.issuance.decision with input as req("x509pop", {"fingerprint": "ab"})
	not nocn.allow
	denied := data.castellan.issuance.decision with input as req("x509pop", {"common_name": "edge-1"})
		with data.castellan.issuance.x509pop.denied_common_names as ["edge-1"]
	not denied.allow
}

test_tpm_is_denied_unless_the_ek_is_listed if {
	tpm := {"ek_sha256": "ab12", "pcrs": {"7": "00"}}
	denied := data.castellan.issuance.decision with input as req("tpm", tpm)
	not denied.allow
	d := data.castellan.issuance.decision with input as req("tpm", tpm)
		with data.castellan.issuance.tpm.allowed_ek_sha256 as ["ab12"]
	d.allow
	d.spiffe_id == "spiffe://example.org/tpm/ab12"
}
