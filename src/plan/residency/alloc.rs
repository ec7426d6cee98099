//! Per-layer slot counts: one VRAM budget for slots split across the host layers so that
//! layers with flatter routing get more slots where that buys more time per MiB, instead of the
//! same count in every layer.
//!
//! Owns the greedy allocation over per-layer cost curves (seconds per token at each candidate
//! slot count, from the provider's byte model replayed layer by layer). Each step gives one
//! layer the jump to a larger count with the most time saved per byte of slot memory among all
//! jumps that still fit — looking past the next count, so a curve that only starts paying after
//! a few slots (loads cost VRAM copies before hits save link bytes) is still reached. Counts
//! stay on the curves' grid, which ends at the model's experts per layer (the cap).
//!
//! The floor is 0: a layer whose slots would save nothing stays at 0 slots and is streamed by
//! the provider (every used expert host → destination, the bytes stock copies, counted). Under
//! residency every host layer's experts cross the link anyway, so a minimum above 0 would only
//! spend VRAM where the forecast says it loses time. Pure arithmetic; never fails.

/// One host layer's cost at each candidate slot count.
#[derive(Debug, Clone)]
pub struct LayerCurve {
    pub layer: u32,
    /// VRAM one slot takes in this layer (one slice plus padding in each expert tensor).
    pub row_bytes: u64,
    /// (slots, seconds per token this layer costs at that count), slots ascending and
    /// starting at 0.
    pub points: Vec<(u32, f64)>,
}

/// Splits `budget` bytes of slot memory: for each curve, the index of its chosen point. The
/// slots of the result never take more than `budget` (0 slots everywhere when nothing fits).
pub fn allocate(curves: &[LayerCurve], budget: u64) -> Vec<usize> {
    let mut at = vec![0usize; curves.len()];
    let spent: u64 = curves
        .iter()
        .map(|c| c.row_bytes * u64::from(c.points.first().map_or(0, |p| p.0)))
        .sum();
    let mut left = budget.saturating_sub(spent);
    // Each curve's best affordable jump from where it stands. A jump stays the best while it
    // is affordable (what is affordable only shrinks), so only the curve that moved and those
    // whose best no longer fits are looked at again.
    let mut best: Vec<Option<Jump>> = curves.iter().map(|c| best_jump(c, 0, left)).collect();
    loop {
        for (i, b) in best.iter_mut().enumerate() {
            if b.is_some_and(|j| j.bytes > left) {
                *b = best_jump(&curves[i], at[i], left);
            }
        }
        let Some((i, j)) = best
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|j| (i, j)))
            .max_by(|a, b| a.1.rate.total_cmp(&b.1.rate).then(b.0.cmp(&a.0)))
        else {
            return at;
        };
        at[i] = j.to;
        left -= j.bytes;
        best[i] = best_jump(&curves[i], at[i], left);
    }
}

/// A move of one curve to a larger count: time saved per byte, the point, the bytes.
#[derive(Debug, Clone, Copy)]
struct Jump {
    rate: f64,
    to: usize,
    bytes: u64,
}

/// The jump from point `from` of `c` that saves the most time per byte within `left` bytes.
fn best_jump(c: &LayerCurve, from: usize, left: u64) -> Option<Jump> {
    let (s0, t0) = c.points[from];
    let mut best: Option<Jump> = None;
    for (j, &(s, t)) in c.points.iter().enumerate().skip(from + 1) {
        let bytes = c.row_bytes.saturating_mul(u64::from(s.saturating_sub(s0)));
        if bytes > left {
            break; // larger counts cost more still
        }
        let gain = t0 - t;
        if gain <= 0.0 || bytes == 0 {
            continue;
        }
        let rate = gain / bytes as f64;
        if best.map_or(true, |b| rate > b.rate) {
            best = Some(Jump { rate, to: j, bytes });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A curve from hit ratios at each count: a hit saves `save` seconds, every use not hit
    /// costs `miss`; `uses` per token.
    fn curve(layer: u32, row: u64, hits: &[(u32, f64)]) -> LayerCurve {
        LayerCurve {
            layer,
            row_bytes: row,
            points: hits.iter().map(|&(s, h)| (s, 8.0 * (1.0 - h))).collect(),
        }
    }

    fn spent(curves: &[LayerCurve], at: &[usize]) -> u64 {
        curves
            .iter()
            .zip(at)
            .map(|(c, &i)| c.row_bytes * u64::from(c.points[i].0))
            .sum()
    }

    /// A skewed layer (two hot experts: four slots catch nearly every use, more add little)
    /// beside a flat one (hits grow with every slot): at a budget past the skewed layer's hot
    /// set, the flat layer gets more slots.
    #[test]
    fn a_flat_layer_gets_more_slots_than_a_skewed_one_at_the_same_budget() {
        let n = 16u32;
        let skewed: Vec<(u32, f64)> = (0..=n)
            .map(|s| {
                (
                    s,
                    if s >= 4 {
                        0.9 + 0.1 * f64::from(s) / 16.0
                    } else {
                        0.22 * f64::from(s)
                    },
                )
            })
            .collect();
        let flat: Vec<(u32, f64)> = (0..=n).map(|s| (s, f64::from(s) / 16.0)).collect();
        let curves = [curve(0, 100, &skewed), curve(1, 100, &flat)];
        let at = allocate(&curves, 16 * 100);
        let (a, b) = (curves[0].points[at[0]].0, curves[1].points[at[1]].0);
        assert_eq!(a + b, 16, "the whole budget is used: {a} + {b}");
        assert!(b > a, "flat {b} slots, skewed {a}");
        assert!(a >= 4, "the skewed layer keeps its hot set: {a}");
        // Uniform (8 + 8) saves less time than this split.
        let time = |x: u32, y: u32| curves[0].points[x as usize].1 + curves[1].points[y as usize].1;
        assert!(time(a, b) < time(8, 8), "{} vs {}", time(a, b), time(8, 8));
    }

    /// Random curves and row sizes: the budget is never exceeded, no count passes the cap (the
    /// last point), and every chosen point lies on its curve.
    #[test]
    fn the_budget_and_the_cap_hold_for_any_curves() {
        let mut x: u64 = 0x9e37_79b9;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let layers = 1 + next() % 6;
            let cap = 1 + (next() % 20) as u32;
            let curves: Vec<LayerCurve> = (0..layers)
                .map(|l| {
                    let mut t = 10.0;
                    LayerCurve {
                        layer: l as u32,
                        row_bytes: 1 + next() % 1000,
                        points: (0..=cap)
                            .map(|s| {
                                // Mostly falling, sometimes rising (loads before hits).
                                t += (next() % 100) as f64 / 100.0 - 0.7;
                                (s, t)
                            })
                            .collect(),
                    }
                })
                .collect();
            let budget = next() % 20_000;
            let at = allocate(&curves, budget);
            assert_eq!(at.len(), curves.len());
            assert!(spent(&curves, &at) <= budget);
            for (c, &i) in curves.iter().zip(&at) {
                assert!(i < c.points.len() && c.points[i].0 <= cap);
                // Never worse than no slots at all.
                assert!(c.points[i].1 <= c.points[0].1);
            }
        }
        // No budget: no slots.
        let c = [curve(0, 10, &[(0, 0.0), (1, 0.5)])];
        assert_eq!(allocate(&c, 9), vec![0]);
        assert_eq!(allocate(&c, 10), vec![1]);
    }

    /// A curve that costs time for its first slots (loads without hits) and pays later is
    /// reached by one jump; one that never pays stays at 0 slots (the floor).
    #[test]
    fn a_curve_that_pays_only_past_a_few_slots_is_reached_and_one_that_never_pays_is_not() {
        let late = LayerCurve {
            layer: 0,
            row_bytes: 10,
            points: vec![(0, 5.0), (1, 5.5), (2, 5.2), (3, 1.0)],
        };
        let never = LayerCurve {
            layer: 1,
            row_bytes: 10,
            points: vec![(0, 5.0), (1, 5.1), (2, 5.3), (3, 5.4)],
        };
        let at = allocate(&[late, never], 1000);
        assert_eq!(at, vec![3, 0]);
    }
}
