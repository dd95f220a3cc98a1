//! Status the operator writes: `IPPool.status` from a pool's usage, and the
//! `BlocksAssigned` condition of a `NodeNetwork` from the node's problems.

use trellis_api::v1alpha1::{
    IPPOOL_ALLOCATABLE, IPPOOL_NEARLY_EXHAUSTED, IPPOOL_OVERLAPPING, NODENETWORK_BLOCKS_ASSIGNED,
};

use crate::conditions::Cond;
use crate::ipam::{NodeBlocks, Pool, PoolUsage, Problem};

/// The share of blocks in use at which `NearlyExhausted` turns True.
pub const NEARLY_EXHAUSTED_PERCENT: u128 = 80;

/// Condition reasons, one place for all of them.
pub mod reason {
    pub const AVAILABLE: &str = "Available";
    pub const DISABLED: &str = "Disabled";
    pub const DELETING: &str = "Deleting";
    pub const OVERLAPPING: &str = "Overlapping";
    pub const EXHAUSTED: &str = "Exhausted";
    pub const NO_OVERLAP: &str = "NoOverlap";
    pub const ABOVE_THRESHOLD: &str = "AboveThreshold";
    pub const BELOW_THRESHOLD: &str = "BelowThreshold";
    pub const ASSIGNED: &str = "Assigned";
    pub const NO_MATCHING_POOL: &str = "NoMatchingPool";
    pub const POOL_EXHAUSTED: &str = "PoolExhausted";
    pub const NO_ALLOCATABLE_POOL: &str = "NoAllocatablePool";
    pub const CONFLICT: &str = "BlockConflict";
}

/// The numbers of `IPPool.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolNumbers {
    pub blocks_total: i64,
    pub blocks_in_use: i64,
    pub utilization_percent: i32,
}

pub fn pool_numbers(usage: &PoolUsage) -> PoolNumbers {
    let clamp = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
    let percent = if usage.total == 0 {
        0
    } else {
        // Rounded up, so a pool with any block in use never shows 0 %.
        usage
            .used
            .saturating_mul(100)
            .div_ceil(usage.total)
            .min(100)
    };
    PoolNumbers {
        blocks_total: clamp(usage.total),
        blocks_in_use: clamp(usage.used),
        utilization_percent: i32::try_from(percent).unwrap_or(100),
    }
}

/// `Allocatable`, `Overlapping` and `NearlyExhausted`.
pub fn pool_conditions(pool: &Pool, usage: &PoolUsage) -> Vec<Cond> {
    let numbers = pool_numbers(usage);
    let in_use = format!(
        "{} of {} blocks in use ({}%)",
        usage.used, usage.total, numbers.utilization_percent
    );
    let allocatable = if pool.deleting {
        Cond::new(
            IPPOOL_ALLOCATABLE,
            false,
            reason::DELETING,
            format!("being deleted; waits until its blocks are released: {in_use}"),
        )
    } else if pool.disabled {
        Cond::new(
            IPPOOL_ALLOCATABLE,
            false,
            reason::DISABLED,
            format!("spec.disabled is true; nodes keep their blocks: {in_use}"),
        )
    } else if !usage.yields_to.is_empty() {
        Cond::new(
            IPPOOL_ALLOCATABLE,
            false,
            reason::OVERLAPPING,
            format!(
                "overlaps older pool(s) {}, which take precedence",
                usage.yields_to.join(", ")
            ),
        )
    } else if usage.used >= usage.total {
        let waiting = if usage.starved.is_empty() {
            String::new()
        } else {
            format!(
                "; {} node(s) waiting for a block: {}",
                usage.starved.len(),
                first_names(&usage.starved)
            )
        };
        Cond::new(
            IPPOOL_ALLOCATABLE,
            false,
            reason::EXHAUSTED,
            format!("{in_use}{waiting}"),
        )
    } else {
        Cond::new(IPPOOL_ALLOCATABLE, true, reason::AVAILABLE, in_use.clone())
    };
    let overlapping = if usage.overlaps.is_empty() {
        Cond::new(
            IPPOOL_OVERLAPPING,
            false,
            reason::NO_OVERLAP,
            "no other pool overlaps this one",
        )
    } else {
        let verdict = if usage.yields_to.is_empty() {
            "this pool is the older and keeps precedence"
        } else {
            "this pool is newer than some of them and gives out no blocks"
        };
        Cond::new(
            IPPOOL_OVERLAPPING,
            true,
            reason::OVERLAPPING,
            format!(
                "spec.cidr overlaps pool(s) {}; {verdict}",
                usage.overlaps.join(", ")
            ),
        )
    };
    let nearly =
        usage.total > 0 && usage.used.saturating_mul(100) >= NEARLY_EXHAUSTED_PERCENT * usage.total;
    let nearly_exhausted = Cond::new(
        IPPOOL_NEARLY_EXHAUSTED,
        nearly,
        if nearly {
            reason::ABOVE_THRESHOLD
        } else {
            reason::BELOW_THRESHOLD
        },
        format!("{in_use}; the threshold is {NEARLY_EXHAUSTED_PERCENT}%"),
    );
    vec![allocatable, overlapping, nearly_exhausted]
}

/// `BlocksAssigned` of a `NodeNetwork`.
pub fn node_condition(node: &NodeBlocks) -> Cond {
    let Some(problem) = node.problems.first() else {
        let blocks: Vec<String> = node.blocks.iter().map(ToString::to_string).collect();
        return Cond::new(
            NODENETWORK_BLOCKS_ASSIGNED,
            true,
            reason::ASSIGNED,
            format!("holds {}", blocks.join(", ")),
        );
    };
    let reason = match problem {
        Problem::NoMatchingPool => reason::NO_MATCHING_POOL,
        Problem::PoolsExhausted { .. } => reason::POOL_EXHAUSTED,
        Problem::NoAllocatablePool { .. } => reason::NO_ALLOCATABLE_POOL,
        Problem::Conflict { .. } => reason::CONFLICT,
    };
    let message: Vec<String> = node.problems.iter().map(ToString::to_string).collect();
    Cond::new(
        NODENETWORK_BLOCKS_ASSIGNED,
        false,
        reason,
        message.join("; "),
    )
}

/// Up to 10 names, then a count of the rest: messages stay small at scale.
fn first_names(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut out = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        out.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{Family, Pool};
    use trellis_policy::selector::Selector;

    fn pool(disabled: bool, deleting: bool) -> Pool {
        Pool {
            name: "p".into(),
            cidr: "10.0.0.0/22".parse().unwrap(),
            block_prefix: 24,
            selector: Selector::everything(),
            disabled,
            deleting,
            created: 0,
        }
    }

    fn usage(used: u128, total: u128) -> PoolUsage {
        PoolUsage {
            total,
            used,
            overlaps: vec![],
            yields_to: vec![],
            allocating: true,
            starved: vec![],
        }
    }

    fn find<'a>(conds: &'a [Cond], type_: &str) -> &'a Cond {
        conds.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn numbers_round_utilization_up_and_saturate() {
        assert_eq!(pool_numbers(&usage(1, 65536)).utilization_percent, 1);
        assert_eq!(pool_numbers(&usage(0, 256)).utilization_percent, 0);
        assert_eq!(pool_numbers(&usage(256, 256)).utilization_percent, 100);
        assert_eq!(pool_numbers(&usage(3, u128::MAX)).blocks_total, i64::MAX);
    }

    #[test]
    fn nearly_exhausted_turns_true_at_80_percent() {
        for (used, want) in [(3, false), (4, true), (5, true)] {
            let conds = pool_conditions(&pool(false, false), &usage(used, 5));
            assert_eq!(
                find(&conds, IPPOOL_NEARLY_EXHAUSTED).status,
                want,
                "{used} of 5"
            );
        }
    }

    #[test]
    fn allocatable_explains_each_reason() {
        let cases = [
            (pool(false, false), usage(1, 4), true, reason::AVAILABLE),
            (pool(true, false), usage(1, 4), false, reason::DISABLED),
            (pool(false, true), usage(1, 4), false, reason::DELETING),
            (pool(false, false), usage(4, 4), false, reason::EXHAUSTED),
            (
                pool(false, false),
                PoolUsage {
                    yields_to: vec!["old".into()],
                    overlaps: vec!["old".into()],
                    allocating: false,
                    ..usage(0, 4)
                },
                false,
                reason::OVERLAPPING,
            ),
        ];
        for (p, u, status, why) in cases {
            let c = find(&pool_conditions(&p, &u), IPPOOL_ALLOCATABLE).clone();
            assert_eq!((c.status, c.reason), (status, why), "{}", c.message);
        }
    }

    #[test]
    fn exhaustion_names_waiting_nodes_but_only_the_first_ten() {
        let starved: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
        let u = PoolUsage {
            starved,
            ..usage(4, 4)
        };
        let c = find(
            &pool_conditions(&pool(false, false), &u),
            IPPOOL_ALLOCATABLE,
        )
        .clone();
        assert!(c.message.contains("12 node(s) waiting"), "{}", c.message);
        assert!(c.message.contains("n9 and 2 more"), "{}", c.message);
        assert!(!c.message.contains("n10"), "{}", c.message);
    }

    #[test]
    fn node_condition_reports_the_first_problem_as_reason() {
        let ok = NodeBlocks {
            blocks: vec!["10.0.0.0/24".parse().unwrap()],
            problems: vec![],
        };
        assert_eq!(node_condition(&ok).reason, reason::ASSIGNED);
        let full = NodeBlocks {
            blocks: vec![],
            problems: vec![Problem::PoolsExhausted {
                family: Family::V4,
                pools: vec!["p".into()],
            }],
        };
        let c = node_condition(&full);
        assert_eq!((c.status, c.reason), (false, reason::POOL_EXHAUSTED));
        assert!(
            c.message
                .contains("every IPv4 pool that selects this node is full: p"),
            "{}",
            c.message
        );
    }
}
