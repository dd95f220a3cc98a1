//! Pieces shared by several kinds: label selectors with schema validation
//! and the CEL building blocks the schemas use.
//!
//! Every list and string that a CEL rule walks carries a `maxItems` /
//! `maxLength` bound: the apiserver estimates the worst-case cost of each rule
//! from those bounds and refuses a CRD whose rules could cost too much.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A label selector, with the same meaning and JSON shape as Kubernetes'
/// `metav1.LabelSelector`: every `matchLabels` entry and every
/// `matchExpressions` requirement must hold (AND). An empty selector selects
/// everything.
///
/// Unlike the built-in type, its schema rejects malformed keys, values and
/// operators at admission time.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}))]
    #[x_kube(validation = kube::core::Rule::new(CEL_LABEL_KEYS).message("matchLabels keys must be label keys: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters of [A-Za-z0-9-_.] starting and ending with an alphanumeric"))]
    pub match_labels: BTreeMap<String, String>,

    /// Set-based requirements on labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One set-based requirement of a label selector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)"
).message("values must be non-empty when operator is In or NotIn, and empty when operator is Exists or DoesNotExist"))]
pub struct LabelSelectorRequirement {
    /// The label key the requirement applies to.
    #[schemars(length(min = 1, max = 317), regex(pattern = LABEL_KEY_PATTERN))]
    pub key: String,
    /// How the key relates to `values`.
    pub operator: SelectorOperator,
    /// For `In` and `NotIn`, the non-empty set of values; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 63), regex(pattern = LABEL_VALUE_PATTERN)))]
    pub values: Vec<String>,
}

/// Operators of a [`LabelSelectorRequirement`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum SelectorOperator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent, or its value is none of `values`.
    NotIn,
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters of `[A-Za-z0-9-_.]` starting and ending with an
/// alphanumeric. (An OpenAPI `pattern`, not CEL: patterns cost nothing in the
/// apiserver's CEL budget, and selectors sit deep inside nested lists.)
pub const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A label value: empty, or at most 63 characters of `[A-Za-z0-9-_.]`
/// starting and ending with an alphanumeric.
pub const LABEL_VALUE_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";

/// CEL over a map: every key is a label key ([`LABEL_KEY_PATTERN`]; OpenAPI
/// cannot constrain map keys, so this one is CEL).
pub(crate) const CEL_LABEL_KEYS: &str = "self.all(k, k.size() <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))";

/// CEL: a well-formed IPv4 or IPv6 CIDR whose address is the network address
/// (no host bits set), e.g. `10.244.0.0/16`, not `10.244.1.7/16`.
pub(crate) const CEL_CANONICAL_CIDR: &str = "isCIDR(self) && cidr(self) == cidr(self).masked()";
