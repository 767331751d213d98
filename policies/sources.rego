# Identities are bound to the trust source that verified the evidence, so a
# second, less trusted cluster with the same namespaces cannot mint the
# first one's identities. A source's identities live under a path prefix:
# its entry in data.castellan.source_prefixes ("" for none), or, when it has
# no entry, its own name. Give two sources one prefix only if they are
# equally trusted.
package castellan.sources

import rego.v1

path(source, rest) := rest if {
	data.castellan.source_prefixes[source] == ""
}

path(source, rest) := concat("/", [p, rest]) if {
	p := data.castellan.source_prefixes[source]
	p != ""
}

path(source, rest) := concat("/", [source, rest]) if {
	not source in object.keys(data.castellan.source_prefixes)
}
