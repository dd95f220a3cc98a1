//! `PolicyBundle`: ordered, cluster-wide policy owned by the platform team.

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::Condition, util::intstr::IntOrString};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{CEL_CANONICAL_CIDR, LabelSelector};

/// Condition: the bundle is valid and compiled.
pub const POLICYBUNDLE_ACCEPTED: &str = "Accepted";
/// Condition: every node that hosts a subject pod enforces this generation.
pub const POLICYBUNDLE_REALIZED: &str = "Realized";
/// Condition: a bundle of the same tier and priority overlaps this one with a
/// different action.
pub const POLICYBUNDLE_CONFLICTING: &str = "Conflicting";

/// Cluster-wide, ordered policy. Evaluation order for a connection: `Admin`
/// bundles by ascending `priority`, then Kubernetes NetworkPolicy, then
/// `Baseline` bundles by ascending `priority`, then the enforcement mode's
/// default. Within a bundle, the first rule that matches decides; `Pass`
/// hands the decision to the next stage.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "network.trellis.dev",
    version = "v1alpha1",
    kind = "PolicyBundle",
    plural = "policybundles",
    shortname = "pb",
    category = "trellis",
    status = "PolicyBundleStatus",
    doc = "Ordered cluster-wide network policy (Admin before NetworkPolicy, Baseline after).",
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Realized",
        type_ = "integer",
        json_path = ".status.realizedNodes",
        description = "Nodes enforcing the current generation"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredNodes",
        description = "Nodes that host subject pods"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PolicyBundleSpec {
    /// `Admin`: evaluated before NetworkPolicy, so app teams cannot override
    /// it. `Baseline`: evaluated after NetworkPolicy, only where nothing
    /// decided. Default `Admin`.
    #[serde(default)]
    pub tier: Tier,

    /// Order within the tier, 0 to 1000; lower is evaluated first.
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,

    /// The pods this bundle applies to. Empty: every pod in every namespace.
    #[serde(default)]
    pub subject: Subject,

    /// Rules for traffic to subject pods, in order; the first match decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ingress: Vec<PolicyRule>,

    /// Rules for traffic from subject pods, in order; the first match decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub egress: Vec<PolicyRule>,
}

/// Where a bundle sits relative to Kubernetes NetworkPolicy.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum Tier {
    /// Before NetworkPolicy.
    #[default]
    Admin,
    /// After NetworkPolicy.
    Baseline,
}

/// Selects pods by their namespace's labels and their own labels (both must
/// match).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Namespaces whose labels match. Empty: every namespace.
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    /// Pods whose labels match, within those namespaces. Empty: every pod.
    #[serde(default)]
    pub pod_selector: LabelSelector,
}

/// One ordered rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// Optional name, shown wherever Trellis explains a verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: Option<String>,

    /// What happens to traffic that matches: `Allow`, `Deny`, or `Pass`
    /// (skip the rest of this tier and let the next stage decide).
    pub action: RuleAction,

    /// The other end of the traffic: at least one peer; a connection matches
    /// when it matches any of them.
    #[schemars(length(min = 1, max = 32))]
    pub peers: Vec<Peer>,

    /// Ports the rule applies to; a connection matches when it matches any of
    /// them. Empty: every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ports: Vec<PolicyPort>,
}

/// The action of a [`PolicyRule`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum RuleAction {
    /// Allow the traffic; no later stage is consulted.
    Allow,
    /// Drop the traffic; no later stage is consulted.
    Deny,
    /// Skip the remaining rules of this tier; the next stage decides.
    Pass,
}

/// The other end of a connection. Exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.pods), has(self.namespaces), has(self.ipBlock)].filter(x, x).size() == 1"
).message("a peer must set exactly one of pods, namespaces or ipBlock"))]
pub struct Peer {
    /// Pods matching both selectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Subject>,
    /// Every pod in the namespaces whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// Addresses outside the pod network (or any address) by CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// A CIDR with holes, as in NetworkPolicy's `ipBlock`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!isCIDR(self.cidr) || !has(self.except) || self.except.all(e, !isCIDR(e) || (cidr(self.cidr).containsCIDR(cidr(e)) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength()))"
).message("every ipBlock.except entry must be a CIDR strictly inside ipBlock.cidr, of the same IP family").field_path(".except"))]
pub struct IpBlock {
    /// The range, IPv4 or IPv6, with no host bits set.
    #[schemars(length(min = 4, max = 43))]
    #[x_kube(validation = kube::core::Rule::new(CEL_CANONICAL_CIDR).message(
        "ipBlock.cidr must be an IPv4 or IPv6 network in CIDR notation with no host bits set, e.g. 192.0.2.0/24"
    ))]
    pub cidr: String,
    /// Ranges inside `cidr` that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 4, max = 43)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(e, isCIDR(e) && cidr(e) == cidr(e).masked())").message(
        "ipBlock.except entries must be networks in CIDR notation with no host bits set"
    ))]
    pub except: Vec<String>,
}

/// A port, a port range, or a named container port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.endPort) || (has(self.port) && type(self.port) == int && self.endPort >= self.port)"
).message("endPort requires a numeric port and must be at least port").field_path(".endPort"))]
pub struct PolicyPort {
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Protocol,
    /// A port number (1–65535) or the name of a container port of the
    /// destination pod (an IANA service name: at most 15 lowercase letters,
    /// digits and '-', with at least one letter, '-' neither first, last nor
    /// doubled; so a quoted "8080" is not a name). Unset: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "port_schema")]
    pub port: Option<IntOrString>,
    /// Last port of a range starting at `port` (inclusive); needs a numeric `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
}

/// `port` is an int-or-string: a number 1–65535, or an IANA service name
/// (at most 15 lowercase letters, digits and '-', with at least one letter,
/// '-' neither first, last nor doubled). OpenAPI applies `minimum`/`maximum`
/// only to numbers and `maxLength`/`pattern` only to strings, so one flat
/// schema checks each form; CEL cannot, because a regular expression on an
/// int-or-string has no length bound for the apiserver's cost estimator.
fn port_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "nullable": true,
        "minimum": 1,
        "maximum": 65535,
        "maxLength": 15,
        "pattern": "^([a-z0-9]+-)*[a-z0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$"
    })
}

/// IP protocols a policy port can name.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
}

/// Whether the bundle is accepted and how far it is enforced. Counts and at
/// most 10 node names, never a full per-node list, so the object stays small
/// at 5,000 nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyBundleStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes that host at least one subject pod.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub desired_nodes: i32,
    /// Of those, nodes enforcing the current generation.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub realized_nodes: i32,
    /// Up to 10 names of nodes that do not enforce the current generation yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(max = 253)))]
    pub lagging_nodes: Vec<String>,
    /// `Accepted`, `Realized`, `Conflicting`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
