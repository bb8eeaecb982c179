//! `sdpa bench`: times the forward pass (or, with `--backward`, the
//! backward pass alone and the forward and backward together) on model
//! shapes or a shape given by flags, and reports the median time and
//! throughput.
//!
//! - [`args`]: the flags and the cases they ask for;
//! - [`timing`]: warm-up, timed passes and their median, the output helpers;
//! - [`single`]: the forward (or backward) pass on one device (CPU or
//!   CUDA device 0);
//! - [`sp`]: sequence-parallel attention on `--world-size` ranks;
//! - [`plot`]: the results as an SVG bar chart (`--plot`), beside torch's
//!   (`--compare`);
//! - [`workload`]: masks (`--mask`) and packed variable-length batches
//!   (`--varlen`), and the useful FLOPs they count;
//! - [`extra`]: a case's mask or offsets, drawn once, on the host or the
//!   device.
//!
//! Imports go one way: `single` and `sp` use `args` and `timing`, and this
//! module dispatches to them.
//!
//! Without `--iters`, the number of timed passes follows the time a pass
//! takes: at least [`MIN_RUNS`](timing::MIN_RUNS) passes and the budget's
//! `target` time, but no more once the budget's `max` time has passed and
//! [`FLOOR_RUNS`](timing::FLOOR_RUNS) passes are in. One or two cases get
//! [`SINGLE`](timing::SINGLE) (about 2 s each at most); the preset table gets
//! [`TABLE`](timing::TABLE), so that the CPU table stays well under 30 s on
//! two cores.

mod args;
mod extra;
mod plot;
mod single;
mod sp;
mod timing;
mod workload;

pub use args::BenchArgs;

use crate::error::Result;
use crate::presets;

/// Runs `sdpa bench`: `--preset list`, the sequence-parallel bench for
/// `--world-size`, or the single-device bench.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.preset.as_deref() == Some("list") {
        print!("{}", presets::listing());
        return Ok(());
    }
    if let Some(worlds) = &args.world_size {
        return sp::run(args, worlds);
    }
    single::run(args)
}
