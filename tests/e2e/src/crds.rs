//! Installing the project's CRDs (`config/crd/*.yaml`, written by `crdgen`) into the sandbox
//! with server-side apply, then waiting until the apiserver serves them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::wait::{await_condition, conditions},
};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Field manager of everything the sandbox applies.
pub const FIELD_MANAGER: &str = "trellis-sandbox";

/// One CRD read from disk.
#[derive(Debug, Clone)]
pub struct CrdFile {
    pub path: PathBuf,
    pub crd: CustomResourceDefinition,
}

/// Every `CustomResourceDefinition` in the `*.yaml` / `*.yml` files of `dir` (each file may hold
/// several documents), sorted by file name. A missing directory yields none; documents of
/// other kinds are skipped with a warning.
pub fn load(dir: &Path) -> Result<Vec<CrdFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io("list", dir, e))?.path();
        if path.is_file()
            && path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files.sort();

    let mut crds = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
        for crd in parse(&path, &text)? {
            crds.push(CrdFile {
                path: path.clone(),
                crd,
            });
        }
    }
    Ok(crds)
}

/// The CRDs among the YAML documents of `text` (read from `path`, named in errors).
pub fn parse(path: &Path, text: &str) -> Result<Vec<CustomResourceDefinition>> {
    let mut crds = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let parse_err = |source| Error::CrdParse {
            path: path.to_path_buf(),
            index,
            source,
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(parse_err)?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
        match kind {
            Some("CustomResourceDefinition") => {}
            // kustomize's index of the directory.
            Some("Kustomization") => continue,
            _ => {
                tracing::warn!(path = %path.display(), index, ?kind, "skipping a document that is not a CustomResourceDefinition");
                continue;
            }
        }
        crds.push(serde_yaml::from_value(value).map_err(parse_err)?);
    }
    Ok(crds)
}

/// Apply every CRD in `dir` (server-side, forced, field manager [`FIELD_MANAGER`]) and wait
/// up to `timeout` in total until each is `Established`. Returns the names installed.
pub async fn install(client: &kube::Client, dir: &Path, timeout: Duration) -> Result<Vec<String>> {
    let crds = load(dir)?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for CrdFile { path, crd } in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(crd))
            .await
            .map_err(|e| {
                Error::kube(format!("applying CRD {name:?} from {}", path.display()), e)
            })?;
        names.push(name);
    }

    let deadline = Instant::now() + timeout;
    for name in &names {
        let left = deadline.saturating_duration_since(Instant::now());
        let established = await_condition(api.clone(), name, conditions::is_crd_established());
        match tokio::time::timeout(left, established).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Error::CrdNotEstablished {
                    name: name.clone(),
                    timeout,
                    detail: Some(e.to_string()),
                });
            }
            Err(_) => {
                let detail = api
                    .get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|crd| crd.status)
                    .and_then(|s| s.conditions)
                    .map(|conds| {
                        conds
                            .iter()
                            .map(|c| {
                                format!(
                                    "{}={} ({})",
                                    c.type_,
                                    c.status,
                                    c.message.as_deref().unwrap_or("")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    });
                return Err(Error::CrdNotEstablished {
                    name: name.clone(),
                    timeout,
                    detail,
                });
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_DOCS: &str = r#"
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.trellis.dev
spec:
  group: example.trellis.dev
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}
  scope: Cluster
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-a-crd}
---
"#;

    #[test]
    fn parses_multi_document_files_and_skips_other_kinds() {
        let crds = parse(Path::new("x.yaml"), TWO_DOCS).unwrap();
        assert_eq!(crds.len(), 1);
        assert_eq!(
            crds[0].metadata.name.as_deref(),
            Some("widgets.example.trellis.dev")
        );
        assert_eq!(crds[0].spec.names.kind, "Widget");
    }

    #[test]
    fn reports_the_file_and_document_of_bad_yaml() {
        let err = parse(
            Path::new("bad.yaml"),
            "kind: CustomResourceDefinition\n---\n: : :\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("bad.yaml: document"), "{msg}");
    }

    #[test]
    fn missing_or_empty_directory_has_no_crds() {
        assert!(
            load(Path::new("/nonexistent/trellis/crd"))
                .unwrap()
                .is_empty()
        );
        let dir = tempfile::Builder::new()
            .prefix("trellis-crd-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("README.md"), "not yaml").unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        std::fs::write(dir.path().join("widgets.yaml"), TWO_DOCS).unwrap();
        assert_eq!(load(dir.path()).unwrap().len(), 1);
    }
}
