//! Rendering the CustomResourceDefinitions: what `make crds` writes to `crds/` and what
//! `make check-crds` compares against, so the YAML in the repository never drifts from the
//! Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use crate::{MeshNode, MeshService};

/// The file names under `crds/`, in the order of [`crds`].
pub const CRD_FILES: [&str; 2] = ["meshnodes.yaml", "meshservices.yaml"];

/// Every CRD of the API, in the order of [`CRD_FILES`].
pub fn crds() -> [CustomResourceDefinition; 2] {
    [tidy(MeshNode::crd()), tidy(MeshService::crd())]
}

/// Tidies the schema that schemars derives:
/// - drops the `nullable: true` it puts on every `Option` field. Our optional fields are simply
///   absent when unset; without `nullable`, the API server prunes an explicit `null` instead of
///   storing it, so `has(self.field)` in the CEL rules means "set to a value";
/// - unwraps the doc comments' hard line breaks in descriptions (paragraphs stay), so
///   `kubectl explain` can wrap the text itself.
fn tidy(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("nullable");
                if let Some(Value::String(text)) = map.get_mut("description") {
                    *text = unwrap_lines(text);
                }
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes to JSON");
    walk(&mut value);
    serde_json::from_value(value).expect("tidying keeps a valid CRD")
}

/// Joins the lines of each paragraph with spaces; blank lines separate paragraphs.
fn unwrap_lines(text: &str) -> String {
    text.split("\n\n")
        .map(|para| para.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The generated YAML of each CRD, paired with its file name under `crds/`.
pub fn render_crd_files() -> anyhow::Result<Vec<(&'static str, String)>> {
    const HEADER: &str = "# Generated from crates/mesh-api by `make crds`. Do not edit by hand.\n";
    CRD_FILES
        .into_iter()
        .zip(crds())
        .map(|(file, crd)| Ok((file, format!("{HEADER}{}", serde_saphyr::to_string(&crd)?))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a schema and collects the paths of properties that lack a description, so
    /// `kubectl explain` teaches every field.
    fn undocumented(path: &str, schema: &Value, out: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                let inherited = path.ends_with(".metadata") || here.ends_with(".metadata");
                if !inherited && prop.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
                    out.push(here.clone());
                }
                undocumented(&here, prop, out);
            }
        }
        if let Some(items) = schema.get("items") {
            undocumented(&format!("{path}[]"), items, out);
        }
    }

    #[test]
    fn every_field_has_a_description() {
        for crd in crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema serializes");
            let mut missing = Vec::new();
            undocumented(&crd.spec.names.kind, &schema["openAPIV3Schema"], &mut missing);
            // apiVersion and kind are described by Kubernetes itself.
            missing.retain(|p| !p.ends_with(".apiVersion") && !p.ends_with(".kind"));
            assert!(missing.is_empty(), "fields without a description: {missing:?}");
        }
    }

    #[test]
    fn names_and_scopes_are_the_fixed_ones() {
        let [node, service] = crds();
        assert_eq!(node.spec.group, "mesh.harness.dev");
        assert_eq!(node.spec.scope, "Cluster");
        assert_eq!(service.spec.scope, "Namespaced");
        assert_eq!(node.spec.names.short_names, Some(vec!["mn".to_owned()]));
        assert_eq!(service.spec.names.short_names, Some(vec!["ms".to_owned()]));
        for crd in [&node, &service] {
            assert_eq!(crd.spec.names.categories, Some(vec!["mesh".to_owned()]));
            assert!(crd.spec.versions[0].subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        }
    }

    #[test]
    fn rendered_yaml_parses_back_to_the_same_crd() {
        for ((_, yaml), crd) in render_crd_files().expect("renders").into_iter().zip(crds()) {
            let back: CustomResourceDefinition = serde_saphyr::from_str(&yaml).expect("parses");
            assert_eq!(back, crd);
        }
    }
}
