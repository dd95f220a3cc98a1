//! Label selectors with Kubernetes' meaning: every `matchLabels` entry and
//! every `matchExpressions` requirement must hold; an empty selector selects
//! everything.

use std::collections::BTreeMap;

use trellis_api::v1alpha1::{LabelSelector, SelectorOperator};

/// A compiled label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
