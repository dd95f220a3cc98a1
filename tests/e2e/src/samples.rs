//! The samples in `config/samples/` as tests and benchmarks apply them, the
//! way a user does: server-side apply of what the file says.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt as _};
use serde::Deserialize as _;
use trellis_api::v1alpha1::IPPool;

use crate::controlplane::repo_root;
use crate::error::{Error, Result};

/// The IPPool sample: `default-ipv4` (10.244.0.0/16 in /24 blocks) and the
/// dual-stack IPv6 pool for nodes labelled `trellis.dev/dual-stack=true`.
pub const IPPOOL_SAMPLE: &str = "network.trellis.dev_v1alpha1_ippool.yaml";

/// Every document of `config/samples/<file>`, each an IPPool.
pub fn ippools(file: &str) -> Result<Vec<IPPool>> {
    let path = repo_root().join("config/samples").join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(index, doc)| {
            IPPool::deserialize(doc).map_err(|source| Error::CrdParse {
                path: path.clone(),
                index,
                source,
            })
        })
        .collect()
}

/// Server-side apply of `pools` (forced, as `field_manager`); their names, in order.
pub async fn apply_ippools(
    client: &Client,
    pools: &[IPPool],
    field_manager: &str,
) -> Result<Vec<String>> {
    let api: Api<IPPool> = Api::all(client.clone());
    let params = PatchParams::apply(field_manager).force();
    let mut names = Vec::new();
    for pool in pools {
        let name = pool.name_any();
        api.patch(&name, &params, &Patch::Apply(pool))
            .await
            .map_err(|e| Error::kube(format!("apply IPPool {name}"), e))?;
        names.push(name);
    }
    Ok(names)
}
