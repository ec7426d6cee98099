//! The VRAM plan of experts under a byte budget ("placement" is another thing: which layers go
//! where, `plan::fit::Placement`): which experts are pinned in VRAM, how many dynamic slots each
//! layer gets, and how many slots are worth having at all (the knee of the miss curve).
//!
//! Owns the global choice across layers: every layer first gets its floor of dynamic slots, then
//! the pinned set is filled greedily by count per byte (count alone when expert sizes are equal)
//! until the budget is spent. Pure computation: no I/O. The only failure is a budget smaller
//! than the floors, which is a refusal, not a panic.

use crate::cache::Counts;

/// Why no VRAM plan fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VramPlanError {
    #[error("fit the budget: {budget} bytes cannot hold the per-layer floor of {floor} slots ({need} bytes)")]
    BudgetTooSmall { budget: u64, need: u64, floor: u32 },
    #[error("place experts: {layers} layers of counts but {sizes} expert sizes")]
    Geometry { layers: usize, sizes: usize },
}

/// What to place.
#[derive(Debug, Clone)]
pub struct VramPlanInput<'a> {
    /// Per-(layer, expert) counts that rank experts.
    pub counts: &'a Counts,
    /// Bytes of one expert of each layer.
    pub expert_bytes: &'a [u64],
    /// VRAM bytes for experts.
    pub budget: u64,
    /// Dynamic (cache) slots every layer gets before anything is pinned.
    pub floor: u32,
}

/// One layer's share.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerVram {
    /// Pinned experts, hottest first.
    pub pinned: Vec<u16>,
    /// Dynamic slots (the cache for the tail).
    pub dynamic: u32,
}

impl LayerVram {
    pub fn slots(&self) -> u32 {
        self.pinned.len() as u32 + self.dynamic
    }
}

/// The plan across layers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VramPlan {
    pub layers: Vec<LayerVram>,
    /// Bytes the plan uses.
    pub bytes: u64,
}

impl VramPlan {
    /// Total slots per layer (pinned + dynamic).
    pub fn slots(&self) -> Vec<u32> {
        self.layers.iter().map(LayerVram::slots).collect()
    }
}

/// Places experts under the budget: floors first, then pins by count per byte, globally.
pub fn place(input: &VramPlanInput<'_>) -> Result<VramPlan, VramPlanError> {
    let c = input.counts;
    if input.expert_bytes.len() != c.n_layer {
        return Err(VramPlanError::Geometry {
            layers: c.n_layer,
            sizes: input.expert_bytes.len(),
        });
    }
    let floor = input.floor.min(c.n_expert as u32);
    let need: u64 = input
        .expert_bytes
        .iter()
        .map(|&b| b * u64::from(floor))
        .sum();
    if need > input.budget {
        return Err(VramPlanError::BudgetTooSmall {
            budget: input.budget,
            need,
            floor,
        });
    }
    let mut left = input.budget - need;
    let mut layers: Vec<LayerVram> = (0..c.n_layer)
        .map(|_| LayerVram {
            pinned: Vec::new(),
            dynamic: floor,
        })
        .collect();
    // Candidates: each layer's experts by rank; a layer can pin at most n_expert - floor.
    let mut cands: Vec<(f64, usize, u16)> = Vec::new();
    for (l, &bytes) in input.expert_bytes.iter().enumerate() {
        let room = c.n_expert - floor as usize;
        for e in c.ranked(l).into_iter().take(room) {
            let value = c.get(l, usize::from(e)) as f64 / bytes.max(1) as f64;
            cands.push((value, l, e));
        }
    }
    cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for (_, l, e) in cands {
        let b = input.expert_bytes[l];
        if b <= left {
            left -= b;
            layers[l].pinned.push(e);
        }
    }
    Ok(VramPlan {
        layers,
        bytes: input.budget - left,
    })
}

/// The knee of a decreasing miss curve `(slots, miss ratio)` (points in any order): the point
/// farthest above the chord from the first to the last point after normalising both axes
/// (Kneedle). Beyond it, each added slot buys less than the average slot did. `None` for fewer
/// than three points or a curve with no bend.
pub fn knee(curve: &[(u32, f64)]) -> Option<u32> {
    let mut pts: Vec<(u32, f64)> = curve.to_vec();
    pts.sort_by_key(|p| p.0);
    pts.dedup_by_key(|p| p.0);
    if pts.len() < 3 {
        return None;
    }
    let (x0, y0) = (f64::from(pts[0].0), pts[0].1);
    let (xn, yn) = (f64::from(pts[pts.len() - 1].0), pts[pts.len() - 1].1);
    if xn <= x0 || y0 <= yn {
        return None;
    }
    let mut best = (0.0, None);
    for &(x, y) in &pts[1..pts.len() - 1] {
        let xn_ = (f64::from(x) - x0) / (xn - x0);
        let gain = (y0 - y) / (y0 - yn);
        let d = gain - xn_;
        if d > best.0 {
            best = (d, Some(x));
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(rows: &[&[u64]]) -> Counts {
        let mut c = Counts::zero(rows.len(), rows[0].len());
        for (l, r) in rows.iter().enumerate() {
            for (e, &v) in r.iter().enumerate() {
                c.set(l, e, v);
            }
        }
        c
    }

    #[test]
    fn pins_globally_by_count() {
        let c = counts(&[&[9, 1, 5, 0], &[2, 8, 0, 7]]);
        // Floor 1 each (2 slots), 3 more slots: pins 9 (l0 e0), 8 (l1 e1), 7 (l1 e3).
        let p = place(&VramPlanInput {
            counts: &c,
            expert_bytes: &[10, 10],
            budget: 50,
            floor: 1,
        })
        .unwrap();
        assert_eq!(p.layers[0].pinned, vec![0]);
        assert_eq!(p.layers[1].pinned, vec![1, 3]);
        assert_eq!(p.slots(), vec![2, 3]);
        assert_eq!(p.bytes, 50);
    }

    #[test]
    fn count_per_byte_when_sizes_differ() {
        let c = counts(&[&[10, 0], &[6, 0]]);
        // Layer 0 experts cost 4x: 10/40 < 6/10, so layer 1's expert is pinned first; the
        // 25 bytes left cannot hold a layer-0 expert.
        let p = place(&VramPlanInput {
            counts: &c,
            expert_bytes: &[40, 10],
            budget: 35,
            floor: 0,
        })
        .unwrap();
        assert_eq!(p.layers[0].pinned, Vec::<u16>::new());
        assert_eq!(p.layers[1].pinned, vec![0, 1]);
        assert_eq!(p.bytes, 20);
    }

    #[test]
    fn floor_that_does_not_fit_is_refused() {
        let c = counts(&[&[1, 1], &[1, 1]]);
        let e = place(&VramPlanInput {
            counts: &c,
            expert_bytes: &[10, 10],
            budget: 30,
            floor: 2,
        })
        .unwrap_err();
        assert_eq!(
            e,
            VramPlanError::BudgetTooSmall {
                budget: 30,
                need: 40,
                floor: 2
            }
        );
    }

    #[test]
    fn never_pins_more_than_a_layer_has() {
        let c = counts(&[&[3, 2, 1]]);
        let p = place(&VramPlanInput {
            counts: &c,
            expert_bytes: &[1],
            budget: 100,
            floor: 1,
        })
        .unwrap();
        assert_eq!(p.slots(), vec![3]);
        assert_eq!(p.bytes, 3);
    }

    #[test]
    fn knee_of_a_bent_curve() {
        // Steep until 32 slots, flat after.
        let curve = [(8, 0.8), (16, 0.5), (32, 0.12), (64, 0.08), (128, 0.05)];
        assert_eq!(knee(&curve), Some(32));
        assert_eq!(knee(&curve[..2]), None);
        assert_eq!(knee(&[(1, 0.5), (2, 0.5), (3, 0.5)]), None);
    }
}
