//! The truth table of one (protocol, port): every pod to every pod, what the oracle expects
//! and what the probes saw, printed the way the upstream NetworkPolicy e2e tests print it.
//!
//! ```text
//! TCP/80: 2 of 81 cells differ
//! expected (rows: from, columns: to; . allowed, X denied)
//!        x/a  x/b  x/c  y/a …
//!   x/a   .    .    .    X
//! observed (* where it differs from expected)
//!        x/a  x/b  x/c  y/a …
//!   x/a   .    X*   .    .*
//! differences
//!   x/a → x/b: expected allowed (egress: …; ingress: …), observed no answer before the
//!              timeout (3 tries)
//! ```

use std::fmt::{self, Write as _};

use super::{
    oracle::{Protocol, Verdict},
    traffic::Observed,
};

/// One table: a protocol and a destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grid {
    pub protocol: Protocol,
    pub port: u16,
}

impl Grid {
    pub const fn new(protocol: Protocol, port: u16) -> Self {
        Grid { protocol, port }
    }
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

/// One pair of pods.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The oracle's answer.
    pub expected: Verdict,
    /// What the last probe saw; `None` until probed.
    pub observed: Option<Observed>,
    /// Probes run for this cell in the last round.
    pub tries: u32,
}

/// Every pod to every pod for one [`Grid`]. Pods are named `namespace/name`, and a server
/// answers with its pod's name, so a cell is observed allowed only when the right pod
/// answered.
#[derive(Debug, Clone)]
pub struct Reachability {
    pub grid: Grid,
    pub pods: Vec<String>,
    /// Row-major: `from * pods.len() + to`.
    cells: Vec<Cell>,
}

impl Reachability {
    /// A table over `pods` whose expected answers are `expected(from, to)` (indices).
    pub fn new(grid: Grid, pods: Vec<String>, expected: impl Fn(usize, usize) -> Verdict) -> Self {
        let n = pods.len();
        let cells = (0..n * n)
            .map(|i| Cell {
                expected: expected(i / n, i % n),
                observed: None,
                tries: 0,
            })
            .collect();
        Reachability { grid, pods, cells }
    }

    pub fn cell(&self, from: usize, to: usize) -> &Cell {
        &self.cells[from * self.pods.len() + to]
    }

    /// Record what probing `from → to` saw, after `tries` probes.
    pub fn observe(&mut self, from: usize, to: usize, observed: Observed, tries: u32) {
        let n = self.pods.len();
        let cell = &mut self.cells[from * n + to];
        cell.observed = Some(observed);
        cell.tries = tries;
    }

    pub fn expected_allowed(&self, from: usize, to: usize) -> bool {
        self.cell(from, to).expected.allowed()
    }

    /// Whether the probe got through to the right pod; `None` if not probed.
    pub fn observed_allowed(&self, from: usize, to: usize) -> Option<bool> {
        self.cell(from, to)
            .observed
            .as_ref()
            .map(|o| o.is_allowed(&self.pods[to]))
    }

    /// Every (from, to) whose observation differs from the expectation (or is missing).
    pub fn mismatches(&self) -> Vec<(usize, usize)> {
        let n = self.pods.len();
        (0..n * n)
            .map(|i| (i / n, i % n))
            .filter(|&(f, t)| self.observed_allowed(f, t) != Some(self.expected_allowed(f, t)))
            .collect()
    }

    pub fn matches(&self) -> bool {
        self.mismatches().is_empty()
    }

    /// How many cells the oracle expects allowed.
    pub fn expected_allowed_count(&self) -> usize {
        self.cells.iter().filter(|c| c.expected.allowed()).count()
    }

    /// The expected table alone.
    pub fn render_expected(&self) -> String {
        self.render_table(|f, t| mark(self.expected_allowed(f, t)).to_string())
    }

    /// The observed table, `*` after every cell that differs (`?`: not probed).
    pub fn render_observed(&self) -> String {
        self.render_table(|f, t| {
            let seen = match self.observed_allowed(f, t) {
                Some(allowed) => mark(allowed),
                None => '?',
            };
            let differs = self.observed_allowed(f, t) != Some(self.expected_allowed(f, t));
            format!("{seen}{}", if differs { "*" } else { "" })
        })
    }

    fn render_table(&self, cell: impl Fn(usize, usize) -> String) -> String {
        let width = self.pods.iter().map(String::len).max().unwrap_or(1).max(3) + 2;
        // The mark sits in the middle of its column, any `*` after it.
        let (pad, rest) = (width.div_ceil(2), width - width.div_ceil(2));
        let mut lines = Vec::new();
        let mut header = format!("{:width$}", "");
        for pod in &self.pods {
            let _ = write!(header, "{pod:^width$}");
        }
        lines.push(header);
        for (f, from) in self.pods.iter().enumerate() {
            let mut line = format!("{from:>width$}");
            for t in 0..self.pods.len() {
                let text = cell(f, t);
                let (mark, after) = text.split_at(1);
                let _ = write!(line, "{mark:>pad$}{after:<rest$}");
            }
            lines.push(line);
        }
        let mut out = String::new();
        for line in lines {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn mark(allowed: bool) -> char {
    if allowed { '.' } else { 'X' }
}

fn yes_no(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

impl fmt::Display for Reachability {
    /// The upstream printout: both tables and, for each difference, what the oracle said and
    /// why, and what the probe saw.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mismatches = self.mismatches();
        let total = self.pods.len() * self.pods.len();
        if mismatches.is_empty() {
            return writeln!(
                f,
                "{}: all {total} cells as expected ({} allowed)",
                self.grid,
                self.expected_allowed_count()
            );
        }
        writeln!(
            f,
            "{}: {} of {total} cells differ",
            self.grid,
            mismatches.len()
        )?;
        writeln!(f, "expected (rows: from, columns: to; . allowed, X denied)")?;
        f.write_str(&self.render_expected())?;
        writeln!(f, "observed (* where it differs from expected)")?;
        f.write_str(&self.render_observed())?;
        writeln!(f, "differences")?;
        for (from, to) in mismatches {
            let cell = self.cell(from, to);
            let seen = match &cell.observed {
                Some(o) => format!("{o} ({} tries)", cell.tries),
                None => "not probed".to_string(),
            };
            writeln!(
                f,
                "  {} → {}: expected {} ({}), observed {seen}",
                self.pods[from],
                self.pods[to],
                yes_no(cell.expected.allowed()),
                cell.expected,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::oracle::Side;

    fn verdict(allowed: bool) -> Verdict {
        Verdict {
            egress: Side::NotIsolated,
            ingress: if allowed {
                Side::NotIsolated
            } else {
                Side::Denied {
                    isolated_by: vec!["x/deny".into()],
                }
            },
        }
    }

    #[test]
    fn prints_both_tables_and_marks_differences() {
        let pods: Vec<String> = ["x/a", "x/b", "y/a"].map(String::from).to_vec();
        // Everything into x/b is denied, but for itself.
        let mut r = Reachability::new(Grid::new(Protocol::Tcp, 80), pods.clone(), |from, to| {
            verdict(to != 1 || from == to)
        });
        assert_eq!(r.expected_allowed_count(), 7);
        for from in 0..3 {
            for (to, pod) in pods.iter().enumerate() {
                let answer = if (from, to) == (2, 0) {
                    Observed::TimedOut
                } else {
                    Observed::Answered(pod.clone())
                };
                r.observe(from, to, answer, 1);
            }
        }
        // y/a → x/a timed out (expected allowed); x/a and y/a got into x/b (expected denied).
        assert_eq!(r.mismatches(), [(0, 1), (2, 0), (2, 1)]);
        let text = r.to_string();
        let expected = "\
TCP/80: 3 of 9 cells differ
expected (rows: from, columns: to; . allowed, X denied)
      x/a  x/b  y/a
  x/a  .    X    .
  x/b  .    .    .
  y/a  .    X    .
observed (* where it differs from expected)
      x/a  x/b  y/a
  x/a  .    .*   .
  x/b  .    .    .
  y/a  X*   .*   .
differences
";
        assert!(text.starts_with(expected), "{text}");
        assert!(
            text.contains(
                "  y/a → x/a: expected allowed (egress: not isolated; ingress: not isolated), \
                 observed no answer before the timeout (1 tries)"
            ),
            "{text}"
        );
        assert!(
            text.contains("  x/a → x/b: expected denied (egress: not isolated; ingress: isolated by x/deny and no rule matches), observed answered by x/b (1 tries)"),
            "{text}"
        );
    }

    #[test]
    fn the_wrong_pod_answering_is_not_allowed() {
        let pods: Vec<String> = ["x/a", "x/b"].map(String::from).to_vec();
        let mut r = Reachability::new(Grid::new(Protocol::Udp, 81), pods, |_, _| verdict(true));
        assert_eq!(r.mismatches().len(), 4, "nothing probed yet");
        r.observe(0, 0, Observed::Answered("x/a".into()), 1);
        r.observe(0, 1, Observed::Answered("x/a".into()), 1);
        r.observe(1, 0, Observed::Answered("x/a".into()), 1);
        r.observe(1, 1, Observed::Answered("x/b".into()), 1);
        assert_eq!(r.mismatches(), [(0, 1)]);
        r.observe(0, 1, Observed::Answered("x/b".into()), 2);
        assert!(r.matches());
        assert_eq!(
            r.to_string(),
            "UDP/81: all 4 cells as expected (4 allowed)\n"
        );
    }
}
