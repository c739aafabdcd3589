//! Shared pieces of the OpenAPI schema: the patterns and CEL rules that several fields use, so
//! that a mesh IP, a name or an endpoint is judged the same way wherever it appears. Each
//! public function here is a schemars `transform` applied to one field's schema.

use kube::core::{Rule, validate};
use schemars::Schema;
use serde_json::json;

/// A plain dotted-quad IPv4 address without leading zeros (RE2 syntax, as CEL `matches` uses).
pub(crate) const IPV4_REGEX: &str =
    r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$";

/// A DNS-1123 subdomain: what Kubernetes accepts as an object name (e.g. a node name).
pub(crate) const DNS1123_SUBDOMAIN_REGEX: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A DNS-1123 label: a single DNS label, as a service name must be to sit in `name.ns.mesh.local`.
pub(crate) const DNS1123_LABEL_REGEX: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A Kubernetes label value (may be empty).
const LABEL_VALUE_REGEX: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

/// `host:port`, where host is a bracketed IPv6 address, an IPv4 address or a DNS name.
const HOST_PORT_REGEX: &str = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?):[0-9]{1,5}$";

/// Longest endpoint: a 253-character DNS name, `:` and a five-digit port.
const MAX_ENDPOINT_LEN: u64 = 253 + 1 + 5;

/// Quotes `text` as a CEL single-quoted string literal.
pub(crate) fn cel_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', r"\\").replace('\'', r"\'"))
}

fn add_rule(schema: &mut Schema, rule: Rule) {
    validate(schema, rule).expect("a CEL rule always serializes to JSON");
}

/// `meshIP` fields: a plain IPv4 address. Whether it lies in the pool and is free is the
/// controller's to judge (it depends on the configured subnet), so it is not checked here.
pub(crate) fn mesh_ip(schema: &mut Schema) {
    schema.insert("maxLength".into(), json!(15));
    add_rule(
        schema,
        Rule::new(format!("self.matches({})", cel_string(IPV4_REGEX)))
            .message("must be a plain IPv4 address such as 10.42.7.7 (no prefix length, no leading zeros, not IPv6)"),
    );
}

/// `endpoint` fields: `host:port`. Each later rule is guarded by the first, so a malformed
/// value gets one clear message rather than an evaluation error.
pub(crate) fn endpoint(schema: &mut Schema) {
    schema.insert("maxLength".into(), json!(MAX_ENDPOINT_LEN));
    let well_formed = format!("self.matches({})", cel_string(HOST_PORT_REGEX));
    let host = "self.substring(0, self.lastIndexOf(':'))";
    let port = "int(self.substring(self.lastIndexOf(':') + 1))";
    add_rule(
        schema,
        Rule::new(well_formed.clone())
            .message("must be host:port, for example 203.0.113.10:51820, [2001:db8::1]:51820 or wg.example.com:51820"),
    );
    add_rule(
        schema,
        Rule::new(format!("!{well_formed} || ({port} >= 1 && {port} <= 65535)"))
            .message("the port must be within 1..65535"),
    );
    add_rule(
        schema,
        Rule::new(format!(
            "!{well_formed} || !{host}.startsWith('[') || ({inner} && ip({bracketed}).family() == 6)",
            inner = format_args!("isIP({host}.substring(1, size({host}) - 1))"),
            bracketed = format_args!("{host}.substring(1, size({host}) - 1)"),
        ))
        .message("the address in brackets must be an IPv6 address"),
    );
    add_rule(
        schema,
        Rule::new(format!(
            "!{well_formed} || !{host}.matches('^[0-9.]+$') || {host}.matches({})",
            cel_string(IPV4_REGEX)
        ))
        .message("a numeric host must be a valid IPv4 address"),
    );
}

/// Names of other objects (a MeshNode, a Node): DNS-1123 subdomains.
pub(crate) fn object_name(schema: &mut Schema) {
    schema.insert("maxLength".into(), json!(253));
    schema.insert("minLength".into(), json!(1));
    schema.insert("pattern".into(), json!(DNS1123_SUBDOMAIN_REGEX));
}

/// A label selector in `matchLabels` form: at least one label, values that are label values.
pub(crate) fn match_labels(schema: &mut Schema) {
    schema.insert("minProperties".into(), json!(1));
    schema.insert("maxProperties".into(), json!(32));
    schema.insert(
        "additionalProperties".into(),
        json!({"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_REGEX}),
    );
}

/// A WireGuard public key: 32 bytes in standard base64 (44 characters ending in `=`).
pub(crate) fn wireguard_key(schema: &mut Schema) {
    schema.insert("pattern".into(), json!(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"));
}
