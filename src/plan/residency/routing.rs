//! Where the forecast's hit ratios come from: a routing trace replayed in order, a profile's
//! counts sampled into tokens, or a stated prior (uniform, or Zipf with `--zipf S`); each
//! [`HitSource`] says which, in words the forecast prints. Reads only the `--trace` or
//! `--profile` file it is given ([`routing_for`]); the rest is seeded arithmetic.

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::plan::cli::PlanArgs;
use crate::plan::fit::ModelFacts;
use crate::plan::PlanError;
use crate::trace::Routing;

/// Tokens synthesised from a profile or the uniform prior, and the warm-up before scoring.
pub const SYNTH_STEPS: usize = 512;

/// Where the hit ratios come from.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HitSource {
    /// A routing trace, replayed in order.
    Trace { path: String, steps: usize },
    /// Counts (a profile's, or serve's live ones): tokens sampled from them (independent
    /// draws, seeded), replayed. `path` names them in words ("the profile FILE").
    Profile { path: String, steps: usize },
    /// No routing given: every expert equally likely (the worst case for a cache), sampled.
    UniformPrior { steps: usize },
    /// A stated prior: the expert of rank r (ranks shuffled over ids per layer) drawn with
    /// weight r^-s, sampled.
    ZipfPrior { s: f64, steps: usize },
}

impl HitSource {
    pub fn describe(&self) -> String {
        match self {
            HitSource::Trace { path, steps } => {
                format!("the trace {path} ({steps} decode tokens, replayed in order)")
            }
            HitSource::Profile { path, steps } => format!(
                "{path} ({steps} tokens drawn from its counts, independent draws: no order, so recency cannot help beyond frequency)"
            ),
            HitSource::ZipfPrior { s, steps } => format!(
                "a stated prior: the expert of rank r drawn with weight r^-{s} (independent draws), {steps} tokens"
            ),
            HitSource::UniformPrior { steps } => format!(
                "a stated prior: uniform routing, {steps} tokens drawn (the worst case for a cache; pass --trace or --profile for your own routing)"
            ),
        }
    }
}

/// Draws `steps` tokens of `k` distinct experts per expert layer from per-layer weights
/// (`weights[l]`, empty for a layer without experts; all-zero rows draw uniformly), seeded.
pub fn synthesize(
    weights: &[Vec<f64>],
    n_expert: usize,
    k: usize,
    steps: usize,
    seed: u64,
) -> Routing {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n_layer = weights.len();
    let mut routing = Routing::new(n_layer);
    let k = k.min(n_expert);
    let mut layer_ids: Vec<Vec<u16>> = vec![Vec::new(); n_layer];
    let zeros: Vec<f32> = Vec::new();
    for s in 0..steps {
        for (l, w) in weights.iter().enumerate() {
            let ids = &mut layer_ids[l];
            ids.clear();
            if w.is_empty() || n_expert == 0 {
                continue;
            }
            let total: f64 = w.iter().sum();
            let mut taken = vec![false; n_expert];
            let mut left = total;
            while ids.len() < k {
                let e = if left > 0.0 {
                    let mut x = rng.gen::<f64>() * left;
                    let mut pick = None;
                    for (e, &we) in w.iter().enumerate() {
                        if taken[e] || we <= 0.0 {
                            continue;
                        }
                        pick = Some(e);
                        if x < we {
                            break;
                        }
                        x -= we;
                    }
                    match pick {
                        Some(e) => e,
                        None => break,
                    }
                } else {
                    let free: Vec<usize> = (0..n_expert).filter(|&e| !taken[e]).collect();
                    if free.is_empty() {
                        break;
                    }
                    free[rng.gen_range(0..free.len())]
                };
                taken[e] = true;
                if left > 0.0 {
                    left -= w[e].max(0.0);
                    if left <= 1e-12 * total {
                        left = 0.0;
                    }
                }
                ids.push(e as u16);
            }
        }
        routing.push_step(
            0,
            s as u32,
            layer_ids.iter().map(|v| (v.as_slice(), zeros.as_slice())),
        );
    }
    routing
}

/// Weights r^-s over `n` experts, ranks assigned to ids by a seeded shuffle (hot experts are
/// not neighbours by id, which would flatter the run copies).
pub fn zipf_weights(n: usize, s: f64, seed: u64) -> Vec<f64> {
    use rand::seq::SliceRandom;
    let mut ids: Vec<usize> = (0..n).collect();
    ids.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut w = vec![0.0; n];
    for (rank, &e) in ids.iter().enumerate() {
        w[e] = ((rank + 1) as f64).powf(-s);
    }
    w
}

/// The routing to replay for `a`'s `--trace` or `--profile` (checked against the model as
/// `spark plan` checks them), else the uniform prior.
pub fn routing_for(a: &PlanArgs, m: &ModelFacts) -> Result<(Routing, HitSource), PlanError> {
    let err = |path: &std::path::Path, message: String| PlanError::Routing {
        path: path.to_path_buf(),
        message,
    };
    let shape = |path: &std::path::Path, l: usize, e: usize| {
        if l != m.n_layer as usize || e != m.n_expert as usize {
            return Err(err(
                path,
                format!(
                    "it has {l} layers × {e} experts, the model {} × {}",
                    m.n_layer, m.n_expert
                ),
            ));
        }
        Ok(())
    };
    if let Some(path) = &a.trace {
        let t = crate::trace::Trace::read(path, None).map_err(|e| err(path, e.to_string()))?;
        if let Some(fp) = &t.fingerprint {
            if fp != &m.fingerprint {
                return Err(err(
                    path,
                    format!(
                        "the trace was recorded on model {fp}, not {}",
                        m.fingerprint
                    ),
                ));
            }
        }
        shape(path, t.n_layer as usize, t.n_expert as usize)?;
        if t.decode.steps() < 4 {
            return Err(err(
                path,
                format!(
                    "it holds {} decode tokens; a hit ratio needs at least 4",
                    t.decode.steps()
                ),
            ));
        }
        let steps = t.decode.steps();
        return Ok((
            t.decode,
            HitSource::Trace {
                path: path.display().to_string(),
                steps,
            },
        ));
    }
    let layers_with_experts = |w: &dyn Fn(usize) -> Vec<f64>| -> Vec<Vec<f64>> {
        let mut v = vec![Vec::new(); m.n_layer as usize];
        for (l, _) in &m.expert_layers {
            if let Some(slot) = v.get_mut(*l as usize) {
                *slot = w(*l as usize);
            }
        }
        v
    };
    let (n, k) = (m.n_expert as usize, m.n_expert_used as usize);
    if let Some(path) = &a.profile {
        let p = crate::profile::Profile::read(path).map_err(|e| err(path, e.to_string()))?;
        p.check_fresh(&m.fingerprint, path)
            .map_err(|e| err(path, e.to_string()))?;
        shape(path, p.counts.n_layer, p.counts.n_expert)?;
        let w = layers_with_experts(&|l| p.counts.layer(l).iter().map(|&c| c as f64).collect());
        return Ok((
            synthesize(&w, n, k, SYNTH_STEPS, 0x5eed),
            HitSource::Profile {
                path: format!("the profile {}", path.display()),
                steps: SYNTH_STEPS,
            },
        ));
    }
    if let Some(z) = a.zipf.filter(|z| *z > 0.0) {
        if !z.is_finite() || z > 8.0 {
            return Err(PlanError::Usage(format!(
                "parse --zipf {z}: give an exponent between 0 and 8"
            )));
        }
        let w = layers_with_experts(&|l| zipf_weights(n, z, 0x21f + l as u64));
        return Ok((
            synthesize(&w, n, k, SYNTH_STEPS, 0x5eed),
            HitSource::ZipfPrior {
                s: z,
                steps: SYNTH_STEPS,
            },
        ));
    }
    let w = layers_with_experts(&|_| vec![1.0; n]);
    Ok((
        synthesize(&w, n, k, SYNTH_STEPS, 0x5eed),
        HitSource::UniformPrior { steps: SYNTH_STEPS },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthesized_routing_follows_the_weights() {
        let w = vec![vec![1000.0, 1.0, 1.0, 1.0, 0.0, 0.0], Vec::new()];
        let r = synthesize(&w, 6, 2, 200, 7);
        assert_eq!(r.steps(), 200);
        let mut zero = 0;
        for s in 0..r.steps() {
            let ids = r.ids(s, 0);
            assert_eq!(ids.len(), 2);
            assert!(ids[0] != ids[1]);
            assert!(
                ids.iter().all(|&e| e < 4),
                "zero-weight experts never drawn"
            );
            zero += ids.contains(&0) as usize;
            assert!(r.ids(s, 1).is_empty());
        }
        assert!(
            zero > 190,
            "the heavy expert is nearly always drawn: {zero}"
        );
        // The same seed draws the same tokens.
        assert_eq!(r, synthesize(&w, 6, 2, 200, 7));
    }
}
