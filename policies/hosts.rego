# Attested issuance for hosts: AWS instance identity documents, one-time
# join tokens, and proof of possession of an existing X.509 certificate.
package castellan.issuance

import rego.v1

supported_methods contains "aws_iid"

supported_methods contains "join_token"

supported_methods contains "x509pop"

# --- aws_iid: spiffe://TD/aws/ACCOUNT/REGION/INSTANCE_ID -----------------
# Deny-by-default: AWS signs the documents of every account.

identity[method] := id if {
	method := "aws_iid"
	input.attestation.method == method
	id := sprintf("spiffe://%s/aws/%s/%s/%s", [input.trust_domain, claims.account, claims.region, claims.instance_id])
}

deny contains msg if {
	input.attestation.method == "aws_iid"
	not claims.account in data.castellan.issuance.aws_iid.allowed_accounts
	msg := sprintf("AWS account %q is not in data.castellan.issuance.aws_iid.allowed_accounts", [claims.account])
}

# --- join_token: spiffe://TD/host/NAME --------------------------------------
# An admin created the token for this host: the token is the authorisation.

identity[method] := id if {
	method := "join_token"
	input.attestation.method == method
	id := sprintf("spiffe://%s/host/%s", [input.trust_domain, claims.name])
}

# --- x509pop: spiffe://TD/x509pop/CN ----------------------------------------
# The trust source's roots are the operator's own CA: any certificate it
# issued for client authentication, with a common name, may receive an
# identity; `denied_common_names` withholds some.

identity[method] := id if {
	method := "x509pop"
	input.attestation.method == method
	id := sprintf("spiffe://%s/x509pop/%s", [input.trust_domain, claims.common_name])
}

deny contains msg if {
	input.attestation.method == "x509pop"
	not claims.common_name
	msg := "the certificate has no common name to name the identity by"
}

deny contains msg if {
	input.attestation.method == "x509pop"
	claims.common_name in data.castellan.issuance.x509pop.denied_common_names
	msg := sprintf("common name %q may not receive identities", [claims.common_name])
}

# --- tpm: spiffe://TD/tpm/EK_SHA256 ------------------------------------------
# A manufacturer's root vouches for every TPM it made: deny-by-default,
# `allowed_ek_sha256` lists the machines (the EK public area's SHA-256).

supported_methods contains "tpm"

identity[method] := id if {
	method := "tpm"
	input.attestation.method == method
	id := sprintf("spiffe://%s/tpm/%s", [input.trust_domain, claims.ek_sha256])
}

deny contains msg if {
	input.attestation.method == "tpm"
	not claims.ek_sha256 in data.castellan.issuance.tpm.allowed_ek_sha256
	msg := sprintf("TPM %q is not in data.castellan.issuance.tpm.allowed_ek_sha256", [claims.ek_sha256])
}
