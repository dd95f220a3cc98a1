//! `kubectl trellis explain` checked on every cell of probed truth tables: the built
//! `kubectl-trellis` binary is asked about each (from, to, protocol, port) as a user would ask
//! it (`-o json`, the sandbox's kubeconfig), and its verdict must be what the probes saw, and
//! its deciding rule on each end the one the oracle names.
//!
//! ```text
//!  tables (probed, equal to the oracle's)  ─▶  every cell: kubectl-trellis explain -o json
//!     allowed            == observed (== expected)
//!     egress.rule        names the oracle's egress decision
//!     ingress.rule       names the oracle's ingress decision
//! ```
//!
//! How a rule names a decision: a bundle rule by `policybundle NAME (TIER PRIORITY)
//! spec.DIR[i]`; a NetworkPolicy allow by one of the allowing policies; isolation by every
//! isolating policy; nothing by "no networkpolicy isolates the pod"; a pod to itself by
//! "reaches itself".

use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use serde_json::Value;

use super::{Grid, Reachability, oracle::Side};
use crate::{
    binaries::KUBECTL_PLUGIN,
    controlplane::repo_root,
    error::{Error, Result},
};

/// Explanations running at once: each is a process reading the cluster and compiling.
const IN_FLIGHT: usize = 4;

/// The `kubectl-trellis` binary and the cluster it reads.
pub struct Explainer {
    binary: PathBuf,
    kubeconfig: PathBuf,
}

impl Explainer {
    /// Builds (or finds) the binary; it reads the cluster through `kubeconfig`.
    pub async fn new(kubeconfig: &Path) -> Result<Self> {
        Ok(Explainer {
            binary: KUBECTL_PLUGIN.resolve(&repo_root()).await?,
            kubeconfig: kubeconfig.to_path_buf(),
        })
    }

    /// `kubectl-trellis explain --from FROM --to TO --port PORT/PROTO -o OUTPUT`: its standard
    /// output, or how it failed.
    pub async fn run(&self, from: &str, to: &str, grid: Grid, output: &str) -> Result<String> {
        let port = format!("{}/{}", grid.port, grid.protocol.as_k8s());
        let args = [
            "explain", "--from", from, "--to", to, "--port", &port, "-o", output,
        ];
        let out = tokio::process::Command::new(&self.binary)
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .output()
            .await
            .map_err(|e| Error::io("run kubectl-trellis", &self.binary, e))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("kubectl-trellis {}", args.join(" ")),
                reason: format!("exited with {}", out.status),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Explainer::run`] with `-o json`, parsed.
    pub async fn explain(&self, from: &str, to: &str, grid: Grid) -> Result<Value> {
        let out = self.run(from, to, grid, "json").await?;
        serde_json::from_str(&out).map_err(|e| Error::Command {
            command: format!(
                "kubectl-trellis explain --from {from} --to {to} --port {grid} -o json"
            ),
            reason: "succeeded, but its output is not JSON".into(),
            stderr: format!("{e}: {out}"),
        })
    }

    /// Explain every cell of `tables` (probed: [`Reachability::observed_allowed`] set) and
    /// say where the explanation disagrees with the probe or the oracle; empty when it never
    /// does.
    pub async fn check(&self, tables: &[Reachability]) -> Vec<String> {
        let mut jobs = Vec::new();
        for table in tables {
            let n = table.pods.len();
            for (from, to) in (0..n).flat_map(|f| (0..n).map(move |t| (f, t))) {
                jobs.push((table, from, to));
            }
        }
        futures::stream::iter(jobs)
            .map(|(table, from, to)| async move {
                let (f, t) = (&table.pods[from], &table.pods[to]);
                let cell = table.cell(from, to);
                let at = format!("{f} → {t} {}", table.grid);
                let json = match self.explain(f, t, table.grid).await {
                    Ok(json) => json,
                    Err(e) => return vec![format!("{at}: {e}")],
                };
                let mut wrong = Vec::new();
                let said = json["allowed"].as_bool();
                let observed = table.observed_allowed(from, to);
                if said.is_none() || said != observed {
                    wrong.push(format!(
                        "{at}: explain says allowed={said:?}, the probe saw {}",
                        cell.observed
                            .as_ref()
                            .map_or_else(|| "nothing (not probed)".into(), ToString::to_string)
                    ));
                }
                for (name, side) in [
                    ("egress", &cell.expected.egress),
                    ("ingress", &cell.expected.ingress),
                ] {
                    let rule = json[name]["rule"].as_str().unwrap_or_default();
                    if !names(side, rule) {
                        wrong.push(format!(
                            "{at}: explain's {name} rule is {rule:?}, the oracle says {side}"
                        ));
                    }
                }
                if !wrong.is_empty() {
                    wrong.push(format!("{at}: the explanation was {json:#}"));
                }
                wrong
            })
            .buffer_unordered(IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Whether explain's deciding `rule` (the text of its JSON `rule` field) names the oracle's
/// decision `side`.
pub fn names(side: &Side, rule: &str) -> bool {
    match side {
        Side::Loopback => rule.contains("reaches itself"),
        Side::NotIsolated => rule.starts_with("no networkpolicy isolates the pod"),
        Side::Allowed { by } => by
            .iter()
            .any(|p| rule.starts_with(&format!("networkpolicy {p} "))),
        Side::Denied { isolated_by } => {
            rule.starts_with("isolated by networkpolicy ")
                && rule.ends_with("nothing allowed")
                && isolated_by
                    .iter()
                    .all(|p| rule.contains(&format!(" {p},")) || rule.contains(&format!(" {p} (")))
        }
        Side::Bundle(b) => rule.starts_with(&format!(
            "policybundle {} ({:?} {}) spec.{}[{}]",
            b.bundle, b.tier, b.priority, b.direction, b.rule
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::oracle::BundleRule;
    use trellis_api::v1alpha1::Tier;

    #[test]
    fn rules_name_the_oracles_decisions() {
        let bundle = Side::Bundle(BundleRule {
            bundle: "trellis-no-z".into(),
            tier: Tier::Admin,
            priority: 10,
            direction: "ingress",
            rule: 1,
            allows: false,
        });
        assert!(names(
            &bundle,
            "policybundle trellis-no-z (Admin 10) spec.ingress[1] \"deny\" peers[0] (every port)"
        ));
        assert!(!names(
            &bundle,
            "policybundle trellis-no-z (Admin 10) spec.ingress[0] peers[0] (every port)"
        ));
        assert!(!names(
            &bundle,
            "policybundle trellis-no-z (Baseline 10) spec.ingress[1] peers[0]"
        ));
        let allowed = Side::Allowed {
            by: vec!["x/a".into(), "x/b".into()],
        };
        assert!(names(
            &allowed,
            "networkpolicy x/b spec.ingress[0] from[0] ports[0]"
        ));
        assert!(!names(
            &allowed,
            "networkpolicy x/bb spec.ingress[0] from[0] ports[0]"
        ));
        let denied = Side::Denied {
            isolated_by: vec!["x/a".into(), "x/b".into()],
        };
        assert!(names(
            &denied,
            "isolated by networkpolicy x/a, x/b (ingress), nothing allowed"
        ));
        assert!(!names(
            &denied,
            "isolated by networkpolicy x/a (ingress), nothing allowed"
        ));
        assert!(names(
            &Side::NotIsolated,
            "no networkpolicy isolates the pod (egress): allowed (enforcement Default)"
        ));
        assert!(!names(
            &Side::NotIsolated,
            "policybundle p (Admin 1) spec.egress[0]"
        ));
        assert!(names(
            &Side::Loopback,
            "the pod reaches itself: the packets never leave its network namespace, no policy applies"
        ));
    }
}
