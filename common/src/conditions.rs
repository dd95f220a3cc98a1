//! Building status conditions: the writer says what each condition is now;
//! `lastTransitionTime` is carried over from the previous status unless the
//! condition's status changed, so rewriting an unchanged status is a no-op.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What a condition is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Cond {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions to write, given the previous ones, `now` and the
/// generation they describe.
pub fn merge(
    previous: &[Condition],
    next: Vec<Cond>,
    now: &Time,
    generation: Option<i64>,
) -> Vec<Condition> {
    next.into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: status.to_owned(),
                reason: c.reason.to_owned(),
                message: c.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let t0 = time("2026-01-01T00:00:00Z");
        let t1 = time("2026-01-02T00:00:00Z");
        let first = merge(
            &[],
            vec![Cond::new("Ready", true, "Ok", "fine")],
            &t0,
            Some(1),
        );
        assert_eq!(first[0].last_transition_time, t0);
        // Same status, new message and generation: the transition time stays.
        let same = merge(
            &first,
            vec![Cond::new("Ready", true, "Ok", "still fine")],
            &t1,
            Some(2),
        );
        assert_eq!(
            (
                same[0].last_transition_time.clone(),
                same[0].observed_generation
            ),
            (t0, Some(2))
        );
        // Status flips: the transition time is now.
        let flipped = merge(
            &same,
            vec![Cond::new("Ready", false, "Broken", "not fine")],
            &t1,
            Some(2),
        );
        assert_eq!(
            (
                flipped[0].status.as_str(),
                flipped[0].last_transition_time.clone()
            ),
            ("False", t1)
        );
    }
}
