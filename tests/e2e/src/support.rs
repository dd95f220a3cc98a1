//! What the sandbox's command-line tools share: their logging, how a
//! benchmark ends, and the percentiles the benchmarks report.

/// Logs to stderr, filtered by `RUST_LOG` or else `default_filter`; colour
/// for a terminal, plain text when the output is kept (scripts, CI logs).
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}

/// Runs a benchmark's body until it ends or Ctrl-C, printing its error.
/// On Ctrl-C the body is dropped, and with it the control plane it started,
/// which stops on drop and deletes every namespace it recorded.
pub async fn run_until_interrupted(
    body: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let result = tokio::select! {
        r = body => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The value at quantile `q` (nearest rank) of sorted `ms`; NaN when empty.
pub fn quantile(ms: &[f64], q: f64) -> f64 {
    if ms.is_empty() {
        return f64::NAN;
    }
    let rank = (q * ms.len() as f64).ceil() as usize;
    ms[rank.clamp(1, ms.len()) - 1]
}

/// p50, p99 and max of a set of durations in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    /// Percentiles of `ms` (in any order); NaN when empty.
    pub fn of(mut ms: Vec<f64>) -> Stats {
        ms.sort_by(f64::total_cmp);
        Stats {
            p50: quantile(&ms, 0.50),
            p99: quantile(&ms, 0.99),
            max: ms.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// `p50 … ms   p99 … ms   max … ms`, aligned for a report.
    pub fn line(&self) -> String {
        format!(
            "p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms",
            self.p50, self.p99, self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Stats, quantile};

    #[test]
    fn stats_sort_first() {
        let s = Stats::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((s.p50, s.p99, s.max), (50.0, 99.0, 100.0));
        let ten = Stats::of((1..=10).map(f64::from).collect());
        assert_eq!((ten.p50, ten.p99, ten.max), (5.0, 10.0, 10.0));
        assert!(Stats::of(Vec::new()).p50.is_nan());
    }

    #[test]
    fn nearest_rank_quantiles() {
        let ms: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&ms, 0.5), 50.0);
        assert_eq!(quantile(&ms, 0.99), 99.0);
        assert_eq!(quantile(&ms, 1.0), 100.0);
        assert_eq!(quantile(&ms, 0.0), 1.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
