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

/// Most conditions one object carries: harness-mesh writes at most eight types per kind, so
/// twice that leaves room for others' without letting a writer inflate the object.
pub const MAX_CONDITIONS: u64 = 16;

/// Longest condition message. metav1 allows 32768; harness-mesh's messages are a sentence or a
/// bounded list, so a smaller bound keeps a whole status far below etcd's 1.5 MB object limit.
pub const MAX_CONDITION_MESSAGE: u64 = 8192;

/// Most entries in a peer entry's `allowedIPs`: the node's own /32 and one per service it
/// hosts. The controller hosts at most [`MAX_PLACED_SERVICES_PER_NODE`] `spec.node` services on
/// one node, which leaves room for pod-backed services there.
pub const MAX_ALLOWED_IPS: u64 = 1024;

/// Most MeshServices that may name one MeshNode in `spec.node` and be hosted there; the others
/// get a `PlacementDenied` condition. Keeps the node's peer entry within [`MAX_ALLOWED_IPS`].
pub const MAX_PLACED_SERVICES_PER_NODE: usize = 512;

/// Longest `a.b.c.d/32` CIDR.
const MAX_CIDR_LEN: u64 = 18;

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
    // Label keys: a prefix of at most 253 and a name of at most 63, as Kubernetes bounds them.
    add_rule(
        schema,
        Rule::new("self.all(k, size(k) <= 317)").message("a selector label key must be at most 317 characters"),
    );
}

/// A WireGuard public key: 32 bytes in standard base64 (44 characters ending in `=`).
pub(crate) fn wireguard_key(schema: &mut Schema) {
    schema.insert("maxLength".into(), json!(44));
    schema.insert("pattern".into(), json!(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"));
}

/// A plain IPv4 address written by a component (status fields): bounded and shaped, not judged
/// against the pool (the readers check what they use).
pub(crate) fn ipv4(schema: &mut Schema) {
    schema.insert("maxLength".into(), json!(15));
    schema.insert("pattern".into(), json!(IPV4_REGEX));
}

/// A DNS name such as `<service>.<namespace>.mesh.local`.
pub(crate) fn dns_name(schema: &mut Schema) {
    schema.insert("maxLength".into(), json!(253));
}

/// `allowedIPs`: at most [`MAX_ALLOWED_IPS`] IPv4 CIDRs of at most 18 characters each.
pub(crate) fn allowed_ips(schema: &mut Schema) {
    schema.insert("maxItems".into(), json!(MAX_ALLOWED_IPS));
    schema.insert("items".into(), json!({"type": "string", "maxLength": MAX_CIDR_LEN}));
}

/// A list of namespace names (DNS labels), or `*` for every namespace: at most 64.
pub(crate) fn namespace_list(schema: &mut Schema) {
    schema.insert("maxItems".into(), json!(64));
    schema.insert("x-kubernetes-list-type".into(), json!("set"));
    schema.insert(
        "items".into(),
        json!({"type": "string", "maxLength": 63, "pattern": r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"}),
    );
}

/// The applied-peers digest: 16 hex digits.
pub(crate) fn digest(schema: &mut Schema) {
    schema.insert("maxLength".into(), json!(16));
    schema.insert("pattern".into(), json!("^[0-9a-f]{16}$"));
}

/// `status.conditions`: at most [`MAX_CONDITIONS`] metav1.Conditions, each field bounded as
/// Kubernetes bounds it (type 316, reason 1024, status True/False/Unknown) and the message at
/// [`MAX_CONDITION_MESSAGE`].
pub(crate) fn conditions(schema: &mut Schema) {
    schema.insert("maxItems".into(), json!(MAX_CONDITIONS));
    let Some(properties) = schema
        .get_mut("items")
        .and_then(|items| items.as_object_mut())
        .and_then(|items| items.get_mut("properties"))
        .and_then(|p| p.as_object_mut())
    else {
        panic!("metav1.Condition's schema is inlined with its properties");
    };
    let mut bound = |field: &str, extra: serde_json::Value| {
        if let Some(serde_json::Value::Object(prop)) = properties.get_mut(field)
            && let serde_json::Value::Object(extra) = extra
        {
            prop.extend(extra);
        }
    };
    bound("type", json!({"maxLength": 316, "minLength": 1}));
    bound("reason", json!({"maxLength": 1024, "minLength": 1}));
    bound("status", json!({"enum": ["True", "False", "Unknown"]}));
    bound("message", json!({"maxLength": MAX_CONDITION_MESSAGE}));
}
