//! Label selectors with Kubernetes' meaning: every `matchLabels` entry and
//! every `matchExpressions` requirement must hold; an empty selector selects
//! everything.
//!
//! Two sources: our CRDs' [`LabelSelector`] (already validated by its schema,
//! so the conversion cannot fail) and Kubernetes' own
//! [`metav1::LabelSelector`](K8sLabelSelector), whose operator is a free
//! string: [`Selector::try_from`] refuses exactly what the apiserver's
//! validation refuses, so a selector that reaches the compiler by another
//! road (a test, an older apiserver, a bug) is reported instead of guessed.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector;
use trellis_api::v1alpha1::{LabelSelector, SelectorOperator};

/// A compiled label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// A selector that selects everything.
    pub fn everything() -> Self {
        Selector::default()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            // Kubernetes: NotIn also matches when the label is absent.
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl From<&LabelSelector> for Selector {
    fn from(s: &LabelSelector) -> Self {
        let labels = s
            .match_labels
            .iter()
            .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()));
        let expressions = s.match_expressions.iter().map(|e| {
            let key = e.key.clone();
            match e.operator {
                SelectorOperator::In => Requirement::In(key, e.values.clone()),
                SelectorOperator::NotIn => Requirement::NotIn(key, e.values.clone()),
                SelectorOperator::Exists => Requirement::Exists(key),
                SelectorOperator::DoesNotExist => Requirement::DoesNotExist(key),
            }
        });
        Selector {
            requirements: labels.chain(expressions).collect(),
        }
    }
}

/// Why a Kubernetes label selector was refused: the field inside the
/// selector (`matchExpressions[1].values`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SelectorError {
    /// Path inside the selector, e.g. `matchLabels` or `matchExpressions[0].operator`.
    pub field: String,
    /// What is wrong there.
    pub reason: SelectorProblem,
}

/// What is wrong with a label selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum SelectorProblem {
    /// The operator is not one of the four Kubernetes knows.
    #[error("unknown operator {0:?} (want In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator(String),
    /// `In` and `NotIn` need at least one value.
    #[error("operator {0} needs at least one value")]
    MissingValues(&'static str),
    /// `Exists` and `DoesNotExist` take no values.
    #[error("operator {0} takes no values")]
    UnexpectedValues(&'static str),
    /// A label key that is not a qualified name.
    #[error("invalid label key {key:?}: {why}")]
    InvalidKey {
        /// The key as written.
        key: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// A label value that is not a valid label value.
    #[error("invalid label value {value:?}: {why}")]
    InvalidValue {
        /// The value as written.
        value: String,
        /// Which rule it breaks.
        why: &'static str,
    },
}

impl TryFrom<&K8sLabelSelector> for Selector {
    type Error = SelectorError;

    /// Refuses what the apiserver refuses: an unknown operator, `In`/`NotIn`
    /// without values, `Exists`/`DoesNotExist` with values, and keys or values
    /// that are not valid label keys or values.
    fn try_from(s: &K8sLabelSelector) -> Result<Self, Self::Error> {
        let mut requirements = Vec::new();
        for (key, value) in s.match_labels.iter().flatten() {
            let field = || format!("matchLabels[{key}]");
            check_key(key).map_err(|reason| SelectorError {
                field: field(),
                reason,
            })?;
            check_value(value).map_err(|reason| SelectorError {
                field: field(),
                reason,
            })?;
            requirements.push(Requirement::Equals(key.clone(), value.clone()));
        }
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let at = |what: &str| format!("matchExpressions[{i}].{what}");
            check_key(&e.key).map_err(|reason| SelectorError {
                field: at("key"),
                reason,
            })?;
            let values = e.values.clone().unwrap_or_default();
            let requirement = match e.operator.as_str() {
                op @ ("In" | "NotIn") => {
                    let op = if op == "In" { "In" } else { "NotIn" };
                    if values.is_empty() {
                        return Err(SelectorError {
                            field: at("values"),
                            reason: SelectorProblem::MissingValues(op),
                        });
                    }
                    for (j, v) in values.iter().enumerate() {
                        check_value(v).map_err(|reason| SelectorError {
                            field: at(&format!("values[{j}]")),
                            reason,
                        })?;
                    }
                    if op == "In" {
                        Requirement::In(e.key.clone(), values)
                    } else {
                        Requirement::NotIn(e.key.clone(), values)
                    }
                }
                op @ ("Exists" | "DoesNotExist") => {
                    let op = if op == "Exists" {
                        "Exists"
                    } else {
                        "DoesNotExist"
                    };
                    if !values.is_empty() {
                        return Err(SelectorError {
                            field: at("values"),
                            reason: SelectorProblem::UnexpectedValues(op),
                        });
                    }
                    if op == "Exists" {
                        Requirement::Exists(e.key.clone())
                    } else {
                        Requirement::DoesNotExist(e.key.clone())
                    }
                }
                other => {
                    return Err(SelectorError {
                        field: at("operator"),
                        reason: SelectorProblem::UnknownOperator(other.to_owned()),
                    });
                }
            };
            requirements.push(requirement);
        }
        Ok(Selector { requirements })
    }
}

impl fmt::Display for Selector {
    /// The `kubectl get -l` form: `app=web,zone in (a,b),!legacy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("<everything>");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain of at most 253
/// characters, the name at most 63 characters of `[A-Za-z0-9-_.]` starting
/// and ending with an alphanumeric (Kubernetes' qualified name).
fn check_key(key: &str) -> Result<(), SelectorProblem> {
    let invalid = |why| SelectorProblem::InvalidKey {
        key: key.to_owned(),
        why,
    };
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return Err(invalid("the prefix must be 1 to 253 characters"));
        }
        let labels_ok = prefix.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
        if !labels_ok {
            return Err(invalid(
                "the prefix must be a DNS subdomain (lowercase alphanumerics, '-' and '.')",
            ));
        }
    }
    if name.is_empty() {
        return Err(invalid("the name must not be empty"));
    }
    check_name(name).map_err(invalid)
}

/// A label value: empty, or a name as in [`check_key`].
fn check_value(value: &str) -> Result<(), SelectorProblem> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value).map_err(|why| SelectorProblem::InvalidValue {
        value: value.to_owned(),
        why,
    })
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.len() > 63 {
        return Err("at most 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only alphanumerics, '-', '_' and '.'");
    }
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !alnum(name.bytes().next()) || !alnum(name.bytes().last()) {
        return Err("must start and end with an alphanumeric");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::v1alpha1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn empty_selects_everything() {
        let s = Selector::from(&LabelSelector::default());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    /// The table is Kubernetes' documented semantics for each operator.
    #[test]
    fn operators_follow_kubernetes() {
        use SelectorOperator::*;
        let zone_a = labels(&[("zone", "a")]);
        let zone_c = labels(&[("zone", "c")]);
        let none = labels(&[]);
        let cases = [
            (expr("zone", In, &["a", "b"]), [true, false, false]),
            (expr("zone", NotIn, &["a", "b"]), [false, true, true]),
            (expr("zone", Exists, &[]), [true, true, false]),
            (expr("zone", DoesNotExist, &[]), [false, false, true]),
        ];
        for (requirement, want) in cases {
            let s = Selector::from(&LabelSelector {
                match_expressions: vec![requirement.clone()],
                ..Default::default()
            });
            let got = [s.matches(&zone_a), s.matches(&zone_c), s.matches(&none)];
            assert_eq!(got, want, "{requirement:?}");
        }
    }

    mod k8s {
        use super::*;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement as K8sReq;

        fn k8s_expr(key: &str, operator: &str, values: Option<&[&str]>) -> K8sLabelSelector {
            K8sLabelSelector {
                match_labels: None,
                match_expressions: Some(vec![K8sReq {
                    key: key.to_owned(),
                    operator: operator.to_owned(),
                    values: values.map(|vs| vs.iter().map(|v| (*v).to_owned()).collect()),
                }]),
            }
        }

        fn k8s_labels(pairs: &[(&str, &str)]) -> K8sLabelSelector {
            K8sLabelSelector {
                match_labels: Some(labels(pairs)),
                match_expressions: None,
            }
        }

        /// Same meaning as the CRD selector, operator by operator.
        #[test]
        fn operators_follow_kubernetes() {
            let zone_a = labels(&[("zone", "a")]);
            let zone_c = labels(&[("zone", "c")]);
            let none = labels(&[]);
            let cases = [
                (
                    k8s_expr("zone", "In", Some(&["a", "b"])),
                    [true, false, false],
                ),
                (
                    k8s_expr("zone", "NotIn", Some(&["a", "b"])),
                    [false, true, true],
                ),
                (k8s_expr("zone", "Exists", None), [true, true, false]),
                (k8s_expr("zone", "Exists", Some(&[])), [true, true, false]),
                (k8s_expr("zone", "DoesNotExist", None), [false, false, true]),
                (k8s_labels(&[("zone", "a")]), [true, false, false]),
                (K8sLabelSelector::default(), [true, true, true]),
            ];
            for (selector, want) in cases {
                let s = Selector::try_from(&selector).unwrap();
                let got = [s.matches(&zone_a), s.matches(&zone_c), s.matches(&none)];
                assert_eq!(got, want, "{selector:?}");
            }
        }

        /// What the apiserver refuses, with the field that is wrong.
        #[test]
        fn refuses_what_the_apiserver_refuses() {
            use SelectorProblem::*;
            let cases = [
                (
                    k8s_expr("zone", "in", Some(&["a"])),
                    "matchExpressions[0].operator",
                    UnknownOperator("in".into()),
                ),
                (
                    k8s_expr("zone", "Equals", Some(&["a"])),
                    "matchExpressions[0].operator",
                    UnknownOperator("Equals".into()),
                ),
                (
                    k8s_expr("zone", "In", None),
                    "matchExpressions[0].values",
                    MissingValues("In"),
                ),
                (
                    k8s_expr("zone", "NotIn", Some(&[])),
                    "matchExpressions[0].values",
                    MissingValues("NotIn"),
                ),
                (
                    k8s_expr("zone", "Exists", Some(&["a"])),
                    "matchExpressions[0].values",
                    UnexpectedValues("Exists"),
                ),
                (
                    k8s_expr("zone", "DoesNotExist", Some(&["a"])),
                    "matchExpressions[0].values",
                    UnexpectedValues("DoesNotExist"),
                ),
                (
                    k8s_expr("", "Exists", None),
                    "matchExpressions[0].key",
                    InvalidKey {
                        key: "".into(),
                        why: "the name must not be empty",
                    },
                ),
                (
                    k8s_expr("-zone", "Exists", None),
                    "matchExpressions[0].key",
                    InvalidKey {
                        key: "-zone".into(),
                        why: "must start and end with an alphanumeric",
                    },
                ),
                (
                    k8s_expr("Example.com/zone", "Exists", None),
                    "matchExpressions[0].key",
                    InvalidKey {
                        key: "Example.com/zone".into(),
                        why: "the prefix must be a DNS subdomain (lowercase alphanumerics, '-' and '.')",
                    },
                ),
                (
                    k8s_expr("a/b/c", "Exists", None),
                    "matchExpressions[0].key",
                    InvalidKey {
                        key: "a/b/c".into(),
                        why: "only alphanumerics, '-', '_' and '.'",
                    },
                ),
                (
                    k8s_expr("zone", "In", Some(&["a", "b c"])),
                    "matchExpressions[0].values[1]",
                    InvalidValue {
                        value: "b c".into(),
                        why: "only alphanumerics, '-', '_' and '.'",
                    },
                ),
                (
                    k8s_labels(&[("zone", "a_")]),
                    "matchLabels[zone]",
                    InvalidValue {
                        value: "a_".into(),
                        why: "must start and end with an alphanumeric",
                    },
                ),
                (
                    k8s_labels(&[(&"k".repeat(64), "a")]),
                    &format!("matchLabels[{}]", "k".repeat(64)),
                    InvalidKey {
                        key: "k".repeat(64),
                        why: "at most 63 characters",
                    },
                ),
            ];
            for (selector, field, reason) in cases {
                let err = Selector::try_from(&selector).unwrap_err();
                assert_eq!(
                    err,
                    SelectorError {
                        field: field.to_owned(),
                        reason
                    },
                    "{selector:?}"
                );
            }
        }

        #[test]
        fn accepts_what_the_apiserver_accepts() {
            let ok = [
                k8s_labels(&[
                    ("app.kubernetes.io/name", "web"),
                    ("tier", ""),
                    ("A_b.c-9", "x.Y_z-1"),
                ]),
                k8s_expr("kubernetes.io/metadata.name", "In", Some(&["prod", ""])),
                k8s_expr("x", "DoesNotExist", Some(&[])),
            ];
            for selector in ok {
                assert!(Selector::try_from(&selector).is_ok(), "{selector:?}");
            }
        }

        #[test]
        fn displays_like_kubectl() {
            let s = Selector::try_from(&K8sLabelSelector {
                match_labels: Some(labels(&[("app", "web")])),
                match_expressions: Some(vec![
                    K8sReq {
                        key: "zone".into(),
                        operator: "In".into(),
                        values: Some(vec!["a".into(), "b".into()]),
                    },
                    K8sReq {
                        key: "legacy".into(),
                        operator: "DoesNotExist".into(),
                        values: None,
                    },
                ]),
            })
            .unwrap();
            assert_eq!(s.to_string(), "app=web,zone in (a,b),!legacy");
            assert_eq!(Selector::everything().to_string(), "<everything>");
        }
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = Selector::from(&LabelSelector {
            match_labels: labels(&[("role", "worker")]),
            match_expressions: vec![expr("zone", SelectorOperator::In, &["a"])],
        });
        assert!(s.matches(&labels(&[("role", "worker"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[("role", "worker"), ("zone", "b")])));
        assert!(!s.matches(&labels(&[("zone", "a")])));
    }
}
