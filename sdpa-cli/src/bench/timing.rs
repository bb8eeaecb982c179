//! The timing both benches share: warm-up, then timed passes until a count
//! or a time [`Budget`] is reached, and their median; plus the output
//! helpers (throughput text, `--json`).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{CliError, Result};

/// Timed passes made at least when the count is chosen by time.
pub const MIN_RUNS: usize = 10;
/// Timed passes made at least, even for a slow shape.
pub const FLOOR_RUNS: usize = 3;
/// How long the warm-up passes of one case run at least (at least one pass).
pub const WARMUP_TIME: Duration = Duration::from_millis(150);
/// The seed of the random inputs.
pub const SEED: u64 = 0x5d9a;

/// How long the timed passes of one case may run when `--iters` is not
/// given.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Time at least this long (and at least [`MIN_RUNS`] passes).
    pub target: Duration,
    /// Stop after this long once [`FLOOR_RUNS`] passes are in.
    pub max: Duration,
}

/// The budget of a single shape or preset.
pub const SINGLE: Budget = Budget {
    target: Duration::from_millis(1000),
    max: Duration::from_millis(2000),
};

/// The budget of each row of a preset table.
pub const TABLE: Budget = Budget {
    target: Duration::from_millis(500),
    max: Duration::from_millis(1000),
};

/// The outcome of timing one case: the median pass and how many passes
/// were timed.
pub(crate) struct Timing {
    /// The median of the timed passes.
    pub(crate) median: Duration,
    /// How many passes were timed.
    pub(crate) runs: usize,
}

/// Runs `pass` for warm-up, then times it (the durations it returns) until
/// `iters` or the budget is reached, and returns the median.
pub(crate) fn time_passes(
    mut pass: impl FnMut() -> Result<Duration>,
    warmup: Option<usize>,
    iters: Option<u64>,
    budget: Budget,
) -> Result<Timing> {
    match warmup {
        Some(n) => {
            for _ in 0..n {
                pass()?;
            }
        }
        None => {
            let start = Instant::now();
            pass()?;
            while start.elapsed() < WARMUP_TIME {
                pass()?;
            }
        }
    }

    let mut times = Vec::new();
    let start = Instant::now();
    loop {
        times.push(pass()?);
        let (runs, elapsed) = (times.len(), start.elapsed());
        let done = match iters {
            Some(n) => runs as u64 >= n,
            None => {
                (runs >= MIN_RUNS && elapsed >= budget.target)
                    || (runs >= FLOOR_RUNS && elapsed >= budget.max)
            }
        };
        if done {
            break;
        }
    }
    times.sort_unstable();
    let mid = times.len() / 2;
    let median = if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2
    };
    Ok(Timing {
        median,
        runs: times.len(),
    })
}

/// `12.3 GFLOP/s` below a TFLOP/s, `1.23 TFLOP/s` from there on.
pub(crate) fn throughput(flops_per_s: f64) -> String {
    if flops_per_s >= 1e12 {
        format!("{:.2} TFLOP/s", flops_per_s / 1e12)
    } else {
        format!("{:.1} GFLOP/s", flops_per_s / 1e9)
    }
}

/// Writes the records as a JSON array.
pub(crate) fn write_json<R: serde::Serialize>(path: &Path, records: &[R]) -> Result<()> {
    let write = |source: Box<dyn std::error::Error + Send + Sync>| CliError::Write {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_string_pretty(records).map_err(|e| write(e.into()))?;
    std::fs::write(path, text + "\n").map_err(|e| write(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_units() {
        assert_eq!(throughput(152.34e9), "152.3 GFLOP/s");
        assert_eq!(throughput(585.0e12), "585.00 TFLOP/s");
    }
}
