//! The routing-concentration verdict: from per-(layer, expert) routing counts, how many experts
//! per layer cover 90% of the routing, whether a VRAM expert cache would help, and the hit ratio
//! a pinned hot set would reach in the VRAM the fit leaves over.
//!
//! Owns the verdict arithmetic only. Counts come from the profile reader ([`crate::profile`]) or
//! the trace readers ([`crate::trace`]); this module never parses a profile or trace format
//! itself. The hit ratio is that of a pinned hot set on the recorded distribution.

use std::path::Path;

use serde::Serialize;

use super::fit::{ModelFacts, Placement};
use super::PlanError;

/// Coverage share the verdict is about.
pub const COVERAGE: f64 = 0.9;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Concentration {
    /// Per layer: experts (most used first) needed to cover 90% of that layer's routing.
    pub experts_for_90: Vec<u32>,
    pub n_expert: u32,
    /// Median over layers of `experts_for_90`.
    pub median_experts_for_90: f64,
    /// Per layer, counts sorted descending (for hit ratios).
    #[serde(skip)]
    pub sorted_counts: Vec<Vec<u64>>,
    pub total_lookups: u64,
    /// A cache helps when 90% of routing lands on at most half of the experts.
    pub cache_helps: bool,
    pub verdict: String,
}

impl Concentration {
    /// Builds the verdict from `counts[layer][expert]`.
    pub fn from_counts(counts: &[Vec<u64>]) -> Concentration {
        let n_expert = counts.iter().map(|l| l.len()).max().unwrap_or(0) as u32;
        let mut experts_for_90 = Vec::with_capacity(counts.len());
        let mut sorted_counts = Vec::with_capacity(counts.len());
        let mut total_lookups = 0;
        for layer in counts {
            let mut c = layer.clone();
            c.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = c.iter().sum();
            total_lookups += total;
            let mut acc = 0u64;
            let mut need = 0u32;
            if total > 0 {
                for &x in &c {
                    acc += x;
                    need += 1;
                    if acc as f64 >= COVERAGE * total as f64 {
                        break;
                    }
                }
            }
            experts_for_90.push(need);
            sorted_counts.push(c);
        }
        let med = super::median::median(
            &experts_for_90
                .iter()
                .map(|&x| f64::from(x))
                .collect::<Vec<_>>(),
        );
        let med = if med.is_nan() { 0.0 } else { med };
        let cache_helps = total_lookups > 0 && med <= f64::from(n_expert) / 2.0;
        let verdict = if total_lookups == 0 {
            "no routing recorded: no verdict".to_string()
        } else if cache_helps {
            format!(
                "concentrated: {med:.0} of {n_expert} experts per layer (median) cover 90% of routing; a VRAM expert cache for offloaded layers would help"
            )
        } else {
            format!(
                "spread: {med:.0} of {n_expert} experts per layer (median) cover 90% of routing; a cache helps little, keep more layers' experts on the GPU instead"
            )
        };
        Concentration {
            experts_for_90,
            n_expert,
            median_experts_for_90: med,
            sorted_counts,
            total_lookups,
            cache_helps,
            verdict,
        }
    }

    /// Share of routing the `slots` hottest experts of a layer receive.
    pub fn hot_share(&self, layer: usize, slots: usize) -> f64 {
        let Some(c) = self.sorted_counts.get(layer) else {
            return 0.0;
        };
        let total: u64 = c.iter().sum();
        if total == 0 {
            return 0.0;
        }
        c.iter().take(slots).sum::<u64>() as f64 / total as f64
    }

    /// Expected hit ratio when the VRAM headroom pins the hottest experts of the offloaded
    /// layers (slots spread evenly over them); `None` when nothing is offloaded.
    pub fn cache_hit_ratio(
        &self,
        m: &ModelFacts,
        placement: Placement,
        headroom_bytes: u64,
    ) -> Option<f64> {
        let Placement::CpuMoe { n } = placement else {
            return None;
        };
        let offloaded: Vec<(u32, u64)> = m
            .expert_layers
            .iter()
            .copied()
            .filter(|(l, _)| *l < n)
            .collect();
        if offloaded.is_empty() {
            return None;
        }
        let per_slot_row: u64 = offloaded.iter().map(|(_, b)| b).sum();
        let slots = (headroom_bytes / per_slot_row.max(1)) as usize;
        let mut weighted = 0.0;
        let mut w = 0.0;
        for (l, b) in &offloaded {
            let share = self.hot_share(*l as usize, slots);
            weighted += share * *b as f64;
            w += *b as f64;
        }
        Some(if w > 0.0 { weighted / w } else { 0.0 })
    }
}

/// Reads routing counts from a Spark profile CSV (through [`crate::profile`]) and checks that it
/// belongs to `model`: a profile for another model is an error, never used silently.
pub fn from_profile(path: &Path, model: &ModelFacts) -> Result<Concentration, PlanError> {
    let routing = |message: String| PlanError::Routing {
        path: path.to_path_buf(),
        message,
    };
    let p = crate::profile::Profile::read(path).map_err(|e| routing(e.to_string()))?;
    p.check_fresh(&model.fingerprint, path)
        .map_err(|e| routing(e.to_string()))?;
    check_shape(p.counts.n_layer, p.counts.n_expert, model).map_err(routing)?;
    Ok(from_counts_table(&p.counts))
}

/// Reads routing counts from a routing trace (binary, JSONL or CSV, through [`crate::trace`]).
pub fn from_trace(path: &Path, model: &ModelFacts) -> Result<Concentration, PlanError> {
    let routing = |message: String| PlanError::Routing {
        path: path.to_path_buf(),
        message,
    };
    let t = crate::trace::Trace::read(path, None).map_err(|e| routing(e.to_string()))?;
    if let Some(fp) = &t.fingerprint {
        if fp != &model.fingerprint {
            return Err(routing(format!(
                "the trace was recorded on model {fp}, not {}",
                model.fingerprint
            )));
        }
    }
    check_shape(t.n_layer as usize, t.n_expert as usize, model).map_err(routing)?;
    let counts = crate::cache::Counts::of(&t.decode, t.n_expert as usize);
    Ok(from_counts_table(&counts))
}

fn check_shape(n_layer: usize, n_expert: usize, m: &ModelFacts) -> Result<(), String> {
    if n_layer != m.n_layer as usize || n_expert != m.n_expert as usize {
        return Err(format!(
            "it has {n_layer} layers × {n_expert} experts, the model {} × {}",
            m.n_layer, m.n_expert
        ));
    }
    Ok(())
}

fn from_counts_table(c: &crate::cache::Counts) -> Concentration {
    let rows: Vec<Vec<u64>> = (0..c.n_layer).map(|l| c.layer(l).to_vec()).collect();
    Concentration::from_counts(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concentrated_and_spread_routing() {
        let hot = Concentration::from_counts(&[vec![90, 5, 3, 2], vec![0, 0, 100, 0]]);
        assert_eq!(hot.experts_for_90, vec![1, 1]);
        assert!(hot.cache_helps, "{}", hot.verdict);
        assert!((hot.hot_share(0, 2) - 0.95).abs() < 1e-12);
        let flat = Concentration::from_counts(&[vec![25, 25, 25, 25]]);
        assert_eq!(flat.experts_for_90, vec![4]);
        assert!(!flat.cache_helps);
        assert!(flat.verdict.starts_with("spread"), "{}", flat.verdict);
        let none = Concentration::from_counts(&[vec![0, 0]]);
        assert!(!none.cache_helps);
        assert_eq!(none.experts_for_90, vec![0]);
    }
}
