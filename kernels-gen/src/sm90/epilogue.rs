//! The epilogue: `O / sum` rounded to the element type and stored
//! straight from the accumulators, and the rows' log-sum-exp where the
//! caller asked for it.

use super::emitter::{Core, Emitter};
use super::schedule::TileScheduler;
use crate::attention::store::{lse_rows, quad_writer, store_output, OutputRows};
use crate::attention::{sequence_of, AccFragment, SeqSide};
use crate::contract::Args;
use crate::ptx::Ty;

impl Emitter {
    /// Writes `O / sum` of this thread's rows (rows that saw no key are 0)
    /// from the accumulators to `out`, 4 bytes a store
    /// ([`store_output`]), and, where the contract's `lse` (in `args`) is
    /// not null, at the query sequence's tokens, each row's log-sum-exp from the quad's
    /// first lane. The running max `m_run` is the shift the running sum is
    /// relative to: the lazy rescale skips only `O`'s rescale, and only
    /// where the max did not move. (Staging the rows through shared memory
    /// for 16-byte stores made no difference beyond run-to-run noise on
    /// any shape measured, `docs/hopper.md`.)
    pub(super) fn epilogue(
        &mut self,
        c: &Core,
        out: &OutputRows,
        args: &Args,
        sched: TileScheduler,
    ) {
        let k = &mut self.k;
        let (head, batch) = sched.epilogue_head_batch(k);
        let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
        let writer = quad_writer(k, out.tq);
        // The query sequence read again: no register holds it across the
        // mainloop.
        let q_seq = sequence_of(k, args, batch, SeqSide::Queries);
        let out = out.in_sequence(k, q_seq);
        let lse = lse_rows(
            k,
            args.lse,
            args.lse_strides,
            b64,
            h64,
            q_seq.start,
            Some(writer),
        );
        let o = AccFragment::new(std::slice::from_ref(&c.o_acc));
        store_output(k, &o, &c.m_run, &c.l_run, &out, &lse, self.cfg.packed());
    }
}
