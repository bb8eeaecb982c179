//! Which query rows and key columns a thread's score accumulators hold.

use crate::ptx::Reg;

/// One thread's accumulators in the C-fragment layout that `mma.sync`
/// m16n8 and `wgmma` m64nN share.
///
/// A warp's accumulator covers 16 rows (an m-tile; `wgmma` m64nN gives each
/// of the four warps of a warpgroup its own 16 rows) and any number of
/// 8-column n-tiles. Lane `4·g + tq` holds, for n-tile `t`, four registers
/// at `4t .. 4t + 4`: element `e` is row `g + 8·(e / 2)` and column
/// `8t + 2·tq + e % 2`. A thread with several m-tiles (16 rows apart)
/// holds one such vector per m-tile.
///
/// Rows are named by slot: slot `2·mt + h` is row `g + 16·mt + 8·h` of
/// the thread's first m-tile ([`AccFragment::row_offset`]); columns are
/// relative to the thread's first column `2·tq` ([`AccFragment::elems`]).
/// FlashAttention's `mask.h` and `softmax.h` serve its sm80 and sm90
/// main loops through the same kind of row/column view.
#[derive(Clone, Copy, Debug)]
pub struct AccFragment<'a> {
    /// Per m-tile, its registers, n-tile `t`'s four at `4t .. 4t + 4`.
    m_tiles: &'a [Vec<Reg>],
}

impl<'a> AccFragment<'a> {
    /// The fragment whose m-tile `mt` is `m_tiles[mt]` (4 registers per
    /// n-tile, n-tile-major).
    pub fn new(m_tiles: &'a [Vec<Reg>]) -> AccFragment<'a> {
        assert!(m_tiles.iter().all(|t| t.len().is_multiple_of(4)));
        AccFragment { m_tiles }
    }

    /// Row slots: two per m-tile.
    pub fn rows(&self) -> usize {
        2 * self.m_tiles.len()
    }

    /// The distance of row slot `r` from the thread's first row.
    pub fn row_offset(r: usize) -> usize {
        16 * (r / 2) + 8 * (r % 2)
    }

    /// Every register with its row slot and its column relative to `2·tq`,
    /// m-tile by m-tile, n-tile by n-tile, element by element.
    pub fn elems(&self) -> impl Iterator<Item = (usize, usize, Reg)> + 'a {
        self.m_tiles.iter().enumerate().flat_map(|(mt, regs)| {
            regs.iter()
                .enumerate()
                .map(move |(i, &x)| (2 * mt + (i % 4) / 2, 8 * (i / 4) + i % 2, x))
        })
    }

    /// The registers of row slot `r`, in column order.
    pub fn row(&self, r: usize) -> Vec<Reg> {
        let h = r % 2;
        self.m_tiles[r / 2]
            .chunks(4)
            .flat_map(|t| [t[2 * h], t[2 * h + 1]])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptx::{Kernel, Ty};

    #[test]
    fn rows_and_columns_follow_the_c_fragment() {
        let mut k = Kernel::new("t");
        let tiles: Vec<Vec<Reg>> = (0..2).map(|_| k.regs(Ty::F32, 8)).collect();
        let acc = AccFragment::new(&tiles);
        assert_eq!(acc.rows(), 4);
        let e: Vec<(usize, usize)> = acc.elems().map(|(r, c, _)| (r, c)).take(8).collect();
        assert_eq!(
            e,
            [
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 8),
                (0, 9),
                (1, 8),
                (1, 9)
            ]
        );
        assert_eq!(acc.elems().nth(8).map(|(r, c, _)| (r, c)), Some((2, 0)));
        let t = &tiles[1];
        assert_eq!(acc.row(3), [t[2], t[3], t[6], t[7]]);
        assert_eq!(
            (0..4).map(AccFragment::row_offset).collect::<Vec<_>>(),
            [0, 8, 16, 24]
        );
    }
}
