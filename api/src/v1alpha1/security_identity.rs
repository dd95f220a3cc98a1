//! `SecurityIdentity`: the label set one pod identity number stands for
//! (design 0005). Created by the first node that needs it, never changed,
//! deleted by the operator once no node has named it for a while.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{CEL_LABEL_KEYS, LABEL_VALUE_PATTERN};

/// The first pod identity number (0004: 0–255 are reserved, from
/// `0x0100_0000` on they are CIDR identities local to a node).
pub const POD_IDENTITY_FIRST: u32 = 256;
/// The last pod identity number (`0x00ff_ffff`).
pub const POD_IDENTITY_LAST: u32 = 0x00ff_ffff;
/// At most this many labels in each of `namespaceLabels` and `podLabels`: a
/// label takes at most 381 bytes (a 317-character key and a 63-character
/// value), so even a full identity stays under the 256 KiB object budget.
pub const MAX_IDENTITY_LABELS: usize = 256;

/// The label set of one pod identity. Pods whose namespace, namespace labels
/// and pod labels are all equal share the identity, and policy is compiled
/// against identities, so this is everything a policy selector can see of a
/// pod. Immutable: a pod whose labels change gets another identity.
///
/// Written by the nodes, never by users: a node that starts a pod with a
/// label set no identity holds yet creates one, named by a stable hash of the
/// label set so that two nodes racing for it pick the same name.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema,
)]
#[kube(
    group = "network.trellis.dev",
    version = "v1alpha1",
    kind = "SecurityIdentity",
    plural = "securityidentities",
    shortname = "secid",
    category = "trellis",
    doc = "The label set a numeric pod security identity stands for (name = the identity, in decimal; written by the nodes, immutable).",
    validation = kube::core::Rule::new(
        "self.metadata.name.matches('^[1-9][0-9]{2,7}$') && int(self.metadata.name) >= 256 && int(self.metadata.name) <= 16777215"
    ).message("metadata.name must be the identity number in decimal without leading zeros, 256 to 16777215 (the pod identity range)"),
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.namespace"),
    printcolumn(
        name = "Pod Labels",
        type_ = "string",
        json_path = ".spec.podLabels",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self == oldSelf").message(
    "spec is immutable: an identity number stands for one label set for its whole life (pods with other labels get another identity)"
))]
pub struct SecurityIdentitySpec {
    /// The namespace of the pods with this identity.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,

    /// The labels of that namespace, as the pods' nodes saw them (including
    /// `kubernetes.io/metadata.name`, which the apiserver sets). At most 256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = MAX_IDENTITY_LABELS, "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}))]
    #[x_kube(validation = kube::core::Rule::new(CEL_LABEL_KEYS).message(
        "namespaceLabels keys must be label keys: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters of [A-Za-z0-9-_.] starting and ending with an alphanumeric"
    ))]
    pub namespace_labels: BTreeMap<String, String>,

    /// The labels of the pods. At most 256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = MAX_IDENTITY_LABELS, "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}))]
    #[x_kube(validation = kube::core::Rule::new(CEL_LABEL_KEYS).message(
        "podLabels keys must be label keys: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters of [A-Za-z0-9-_.] starting and ending with an alphanumeric"
    ))]
    pub pod_labels: BTreeMap<String, String>,
}
