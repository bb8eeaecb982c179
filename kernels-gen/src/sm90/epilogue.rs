//! The epilogue: `O / sum` rounded to the element type and stored
//! straight from the accumulators.

use super::emitter::{Core, Emitter};
use crate::attention::store::{store_output, OutputRows};
use crate::attention::AccFragment;

impl Emitter {
    /// Writes `O / sum` of this thread's rows (rows that saw no key are 0)
    /// from the accumulators to `out`, 4 bytes a store
    /// ([`store_output`]). (Staging the rows through shared memory for
    /// 16-byte stores made no difference beyond run-to-run noise on any
    /// shape measured, `docs/hopper.md`.)
    pub(super) fn epilogue(&mut self, c: &Core, out: &OutputRows) {
        let o = AccFragment::new(std::slice::from_ref(&c.o_acc));
        store_output(&mut self.k, &o, &c.l_run, out, self.cfg.packed());
    }
}
