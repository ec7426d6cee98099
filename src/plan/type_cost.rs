//! The host's cost per weight of each weight type, as ggml's own CPU kernels pay it, and its
//! fixed cost per layer: the record a probe measured (`cache_dir()/machine/type-costs.json`),
//! the arithmetic that turns a probe's two runs into seconds per weight (or per layer), and the
//! per-type terms the roofline puts in place of bytes at the host bandwidth.
//!
//! Why per type: what a decode token costs the host per weight depends on the weight type (f16
//! converts every weight to f32, q8_0 multiplies integers, Q4_K unpacks nibbles and scales),
//! not only on its bytes. Bytes at the memcmp bandwidth plus one FLOP rate for every type
//! forecast f16 too fast against q8_0 on the machine this was built on.
//!
//! Why the whole slope and not the slope less a read share: ggml streams weights faster than
//! the single memcmp pass of [`super::hardware`] measures (the probe's slopes imply more GB/s
//! than that bandwidth), so "slope − bytes ÷ bandwidth" came out negative and was clamped to 0,
//! and as the difference of two noisy numbers it moved with every re-measurement of the
//! bandwidth. The slope itself is what was measured.
//!
//! Owns the record and the arithmetic only. Never spawns a process and never measures: the
//! probe that runs llama-bench lives in [`super::type_probe`]. Reading and writing the record
//! is the only I/O here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::machine::{machine_dir, rate_at, HardwareError, MachineId, RatePoint};

/// Record format version; a record of another version is probed again.
pub const TYPE_COST_VERSION: u32 = 1;

/// The types people run and the probe measures by default.
pub const DEFAULT_TYPES: &[&str] = &["q8_0", "f16", "q4_K", "iq4_xs", "mxfp4"];

/// The type whose measured cost stands in for a type that was not probed (the stated prior).
pub const PRIOR_FROM: &str = "q8_0";

/// One probe of one type at one thread count: two fixtures that differ only in their routed
/// experts' FFN width, a few experts per token routed uniformly, both far larger than the
/// last-level cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbePoint {
    /// ggml type name of the varied tensors (`q8_0`, `f16`, `q4_K`, …).
    pub ggml_type: String,
    pub threads: u32,
    /// Weight elements a decode token multiplies in the varied tensors, small and large fixture.
    pub small_weights: f64,
    pub large_weights: f64,
    /// Bytes of those weights.
    pub small_bytes: u64,
    pub large_bytes: u64,
    /// Measured seconds per decode token (1 ÷ llama-bench's tokens/s).
    pub small_secs: f64,
    pub large_secs: f64,
    /// Host read bandwidth the bandwidth share is taken at, GB/s.
    pub host_gbps: f64,
}

/// What a probe point says about its type.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TypeCost {
    /// Measured seconds per weight: the slope between the two fixtures.
    pub secs_per_weight: f64,
    /// Bytes per weight of the type.
    pub bytes_per_weight: f64,
    /// The share of the slope the host bandwidth explains: bytes per weight ÷ bandwidth.
    pub read_secs_per_weight: f64,
    /// What is left: the CPU's compute per weight beyond the read (never below 0).
    pub compute_secs_per_weight: f64,
}

impl ProbePoint {
    /// The slope and its split; `None` when the two runs do not give a positive slope (the
    /// larger fixture ran as fast as the smaller: a disturbed measurement).
    pub fn cost(&self) -> Option<TypeCost> {
        let dw = self.large_weights - self.small_weights;
        let dt = self.large_secs - self.small_secs;
        if dw <= 0.0 || dt <= 0.0 || self.host_gbps <= 0.0 {
            return None;
        }
        let secs_per_weight = dt / dw;
        let bytes_per_weight = (self.large_bytes - self.small_bytes) as f64 / dw;
        let read = bytes_per_weight / (self.host_gbps * 1e9);
        Some(TypeCost {
            secs_per_weight,
            bytes_per_weight,
            read_secs_per_weight: read,
            compute_secs_per_weight: (secs_per_weight - read).max(0.0),
        })
    }
}

/// The per-layer probe at one thread count: two fixtures of tiny width (whose weights cost next
/// to nothing) that differ only in their layer count. The slope is what one more layer costs
/// beyond its weights: the graph's fixed work per layer (op dispatch, the threads meeting at
/// each op).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPoint {
    pub threads: u32,
    pub small_layers: u32,
    pub large_layers: u32,
    pub small_secs: f64,
    pub large_secs: f64,
}

impl LayerPoint {
    /// Seconds per layer per token; `None` without a positive slope.
    pub fn secs_per_layer(&self) -> Option<f64> {
        let dl = f64::from(self.large_layers) - f64::from(self.small_layers);
        let dt = self.large_secs - self.small_secs;
        (dl > 0.0 && dt > 0.0).then(|| dt / dl)
    }
}

/// The measured record of one machine and engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeCosts {
    pub version: u32,
    pub machine: MachineId,
    /// The engine that ran the probe: llama-bench's build commit and number.
    pub engine: String,
    pub points: Vec<ProbePoint>,
    /// Types the probe could not measure, with the reason (e.g. llama-quantize refused).
    #[serde(default)]
    pub skipped: Vec<(String, String)>,
    /// The fixed cost per layer, per thread count.
    #[serde(default)]
    pub layers: Vec<LayerPoint>,
    pub measured_unix: u64,
    pub measure_secs: f64,
}

/// Where one type's compute cost came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CostSource {
    /// Probed on this machine with ggml's kernels: read and compute together.
    Measured,
    /// Not probed: the measured compute share of [`PRIOR_FROM`] (the same compute per weight),
    /// on top of the type's own reads at the host bandwidth.
    PriorFromMeasured { from: String },
    /// No probe at all: 2 FLOP per weight at the portable FMA rate (or `--host-gflops`).
    Flops { gflops: f64 },
}

/// One type's share of the host's decode time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeTerm {
    pub ggml_type: String,
    /// Weight elements of this type the CPU multiplies per decode token.
    pub weights: f64,
    /// Their bytes (weights × the type's bytes per weight).
    pub bytes: f64,
    pub secs_per_weight: f64,
    /// Whether `secs_per_weight` includes reading the weight (a probed type: measured as ggml
    /// streams it) or is the compute on top of the read at the host bandwidth.
    pub includes_read: bool,
    /// weights × seconds per weight.
    pub secs: f64,
    pub source: CostSource,
}

impl TypeCosts {
    /// The types probed, in name order.
    pub fn types(&self) -> Vec<String> {
        let mut v: Vec<String> = self.points.iter().map(|p| p.ggml_type.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The CPU's fixed cost per layer per token at `threads` (linear between probed thread
    /// counts, flat outside); `None` when not probed.
    pub fn layer_secs(&self, threads: u32) -> Option<f64> {
        let pts: Vec<RatePoint> = self
            .layers
            .iter()
            .filter_map(|p| {
                p.secs_per_layer().map(|r| RatePoint {
                    threads: p.threads,
                    rate: r,
                })
            })
            .collect();
        (!pts.is_empty()).then(|| rate_at(&pts, threads))
    }

    /// One figure of `ggml_type`'s cost at `threads`: linear between the probed thread counts,
    /// flat outside them; `None` when that type has no usable point.
    fn at(&self, ggml_type: &str, threads: u32, figure: fn(&TypeCost) -> f64) -> Option<f64> {
        let pts: Vec<RatePoint> = self
            .points
            .iter()
            .filter(|p| p.ggml_type == ggml_type)
            .filter_map(|p| {
                p.cost().map(|c| RatePoint {
                    threads: p.threads,
                    rate: figure(&c),
                })
            })
            .collect();
        (!pts.is_empty()).then(|| rate_at(&pts, threads))
    }

    /// The cost per weight of `ggml_type` at `threads` and whether it includes reading the
    /// weight. A probed type: its measured seconds per weight, read and compute together, as
    /// ggml streams that type. A type not probed: [`PRIOR_FROM`]'s measured compute share, to
    /// be added to its own bytes at the host bandwidth. `None` without either.
    pub fn cost_of(&self, ggml_type: &str, threads: u32) -> Option<(f64, bool, CostSource)> {
        if let Some(c) = self.at(ggml_type, threads, |c| c.secs_per_weight) {
            return Some((c, true, CostSource::Measured));
        }
        self.at(PRIOR_FROM, threads, |c| c.compute_secs_per_weight)
            .map(|c| {
                (
                    c,
                    false,
                    CostSource::PriorFromMeasured {
                        from: PRIOR_FROM.into(),
                    },
                )
            })
    }
}

/// The host's per-type decode terms. With a probe record, each probed type's weights at its
/// measured seconds per weight (their reads included: those bytes are not charged again at the
/// bandwidth), and a type not probed at [`PRIOR_FROM`]'s compute share on top of its reads;
/// without a record, 2 FLOP per weight at `gflops` for every type on top of the reads (no
/// term when `gflops` is unknown). Bytes per weight come from the type's block size.
pub fn compute_terms(
    weights_by_type: &BTreeMap<String, f64>,
    costs: Option<&TypeCosts>,
    threads: u32,
    gflops: f64,
) -> Vec<TypeTerm> {
    weights_by_type
        .iter()
        .filter(|(_, w)| **w > 0.0)
        .map(|(t, &w)| {
            let (per, includes_read, source) =
                costs.and_then(|c| c.cost_of(t, threads)).unwrap_or((
                    if gflops > 0.0 {
                        2.0 / (gflops * 1e9)
                    } else {
                        0.0
                    },
                    false,
                    CostSource::Flops { gflops },
                ));
            let bpw = crate::gguf::GgmlType::from_name(t)
                .map(|g| g.bytes_per_elem())
                .unwrap_or(0.0);
            TypeTerm {
                ggml_type: t.clone(),
                weights: w,
                bytes: w * bpw,
                secs_per_weight: per,
                includes_read,
                secs: w * per,
                source,
            }
        })
        .collect()
}

/// A fresh probe of some types on top of the record: the fresh points replace the old ones of
/// the same types, the other types' points stay when the same engine measured them.
pub fn merge(old: TypeCosts, fresh: TypeCosts) -> TypeCosts {
    if old.engine != fresh.engine || old.machine != fresh.machine {
        return fresh;
    }
    let redone: Vec<&str> = fresh
        .points
        .iter()
        .map(|p| p.ggml_type.as_str())
        .chain(fresh.skipped.iter().map(|(t, _)| t.as_str()))
        .collect();
    let mut points: Vec<ProbePoint> = old
        .points
        .iter()
        .filter(|p| !redone.contains(&p.ggml_type.as_str()))
        .cloned()
        .collect();
    points.extend(fresh.points.iter().cloned());
    let mut skipped: Vec<(String, String)> = old
        .skipped
        .iter()
        .filter(|(t, _)| !redone.contains(&t.as_str()))
        .cloned()
        .collect();
    skipped.extend(fresh.skipped.iter().cloned());
    let layers = if fresh.layers.is_empty() {
        old.layers.clone()
    } else {
        fresh.layers.clone()
    };
    TypeCosts {
        points,
        skipped,
        layers,
        measure_secs: old.measure_secs + fresh.measure_secs,
        ..fresh
    }
}

pub fn type_costs_path() -> PathBuf {
    machine_dir().join("type-costs.json")
}

/// Reads the record; `None` when absent, unreadable, of another version or another machine.
pub fn load(path: &Path, machine: &MachineId) -> Option<TypeCosts> {
    let text = std::fs::read_to_string(path).ok()?;
    let c: TypeCosts = serde_json::from_str(&text).ok()?;
    (c.version == TYPE_COST_VERSION
        && &c.machine == machine
        && !(c.points.is_empty() && c.layers.is_empty()))
    .then_some(c)
}

pub fn save(path: &Path, c: &TypeCosts) -> Result<(), HardwareError> {
    let write = |source| HardwareError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let json = serde_json::to_vec_pretty(c).expect("type costs serialize");
    crate::atomic_file::write_atomic(path, &json).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: &str, threads: u32, small_secs: f64, large_secs: f64) -> ProbePoint {
        // 100 M and 300 M weights of a 1.0625 B/weight type (q8_0), at 10 GB/s.
        ProbePoint {
            ggml_type: t.into(),
            threads,
            small_weights: 100e6,
            large_weights: 300e6,
            small_bytes: 106_250_000,
            large_bytes: 318_750_000,
            small_secs,
            large_secs,
            host_gbps: 10.0,
        }
    }

    fn costs(points: Vec<ProbePoint>) -> TypeCosts {
        TypeCosts {
            version: TYPE_COST_VERSION,
            machine: MachineId {
                hostname: "h".into(),
                cpu_model: "c".into(),
                logical_cpus: 2,
                mem_total_bytes: 1,
            },
            engine: "e".into(),
            points,
            skipped: vec![],
            layers: vec![],
            measured_unix: 0,
            measure_secs: 0.0,
        }
    }

    #[test]
    fn the_slope_less_the_read_is_the_compute_per_weight() {
        // 0.010 s → 0.036 s over 200 M weights: 0.13 ns per weight. Reading 1.0625 B at
        // 10 GB/s is 0.10625 ns; the CPU's own share is 0.02375 ns.
        let c = point("q8_0", 1, 0.010, 0.036).cost().unwrap();
        assert!((c.secs_per_weight - 0.13e-9).abs() < 1e-15);
        assert!((c.bytes_per_weight - 1.0625).abs() < 1e-12);
        assert!((c.read_secs_per_weight - 0.10625e-9).abs() < 1e-15);
        assert!((c.compute_secs_per_weight - 0.02375e-9).abs() < 1e-15);
        // Faster than the bandwidth allows: no negative compute.
        let fast = point("q8_0", 1, 0.010, 0.020).cost().unwrap();
        assert_eq!(fast.compute_secs_per_weight, 0.0);
        // The larger fixture no slower: no slope at all.
        assert!(point("q8_0", 1, 0.02, 0.02).cost().is_none());
    }

    #[test]
    fn each_type_pays_its_own_cost_and_an_unprobed_one_takes_q8_0s_compute() {
        // q8_0 at 1 thread: 0.13 ns per weight, 0.02375 of it compute (above). At 2 threads
        // 0.010 → 0.031 s: 0.105 ns, less than the 0.10625 ns read, so no compute share.
        // f16 at 1 thread: 0.030 → 0.100 s over 200 M weights: 0.35 ns per weight.
        let c = costs(vec![
            point("q8_0", 1, 0.010, 0.036),
            point("q8_0", 2, 0.010, 0.031),
            point("f16", 1, 0.030, 0.100),
        ]);
        assert_eq!(c.types(), vec!["f16".to_string(), "q8_0".into()]);
        let (q1, read, s) = c.cost_of("q8_0", 1).unwrap();
        assert!((q1 - 0.13e-9).abs() < 1e-15);
        assert!(read);
        assert_eq!(s, CostSource::Measured);
        // Halfway between 1 and 2 threads does not exist; past 2 threads: flat at 2's.
        let (q3, _, _) = c.cost_of("q8_0", 3).unwrap();
        assert!((q3 - 0.105e-9).abs() < 1e-15);
        let (f, _, _) = c.cost_of("f16", 4).unwrap();
        assert!((f - 0.35e-9).abs() < 1e-15);
        // q4_K was not probed: q8_0's compute share, on top of its own read.
        let (k, read, s) = c.cost_of("q4_K", 1).unwrap();
        assert!((k - 0.02375e-9).abs() < 1e-15);
        assert!(!read);
        assert_eq!(
            s,
            CostSource::PriorFromMeasured {
                from: "q8_0".into()
            }
        );
        assert_eq!(c.cost_of("q4_K", 2).unwrap().0, 0.0);

        let mut w = BTreeMap::new();
        w.insert("f16".to_string(), 2e6);
        w.insert("q4_K".to_string(), 4e6);
        w.insert("f32".to_string(), 0.0);
        let terms = compute_terms(&w, Some(&c), 1, 50.0);
        assert_eq!(terms.len(), 2, "a type with no weights has no term");
        // f16: 2 M × 0.35 ns = 0.7 ms, its 4 MB read included.
        assert!((terms[0].secs - 0.7e-3).abs() < 1e-12);
        assert_eq!(terms[0].bytes, 4e6);
        assert!(terms[0].includes_read);
        // q4_K: 4 M × 0.02375 ns = 0.095 ms on top of its 2.25 MB (144 B per 256 weights).
        assert!((terms[1].secs - 0.095e-3).abs() < 1e-12);
        assert_eq!(terms[1].bytes, 2.25e6);
        assert!(!terms[1].includes_read);
        // No record: 2 FLOP per weight at 50 GFLOP/s for every type, on top of the reads.
        let flat = compute_terms(&w, None, 1, 50.0);
        assert!((flat[0].secs - 2.0 * 2e6 / 50e9).abs() < 1e-15);
        assert_eq!(flat[1].source, CostSource::Flops { gflops: 50.0 });
        assert!(!flat[1].includes_read);
        assert_eq!(compute_terms(&w, None, 1, 0.0)[0].secs, 0.0);
    }

    #[test]
    fn the_layer_slope_is_the_fixed_cost_per_layer() {
        // 4 → 36 layers: 1.0 → 2.6 ms per token: 1.6 ms over 32 layers, 50 µs per layer.
        let p = |threads, large_secs| LayerPoint {
            threads,
            small_layers: 4,
            large_layers: 36,
            small_secs: 1.0e-3,
            large_secs,
        };
        assert!((p(1, 2.6e-3).secs_per_layer().unwrap() - 50e-6).abs() < 1e-15);
        assert_eq!(p(1, 0.9e-3).secs_per_layer(), None);
        let mut c = costs(vec![]);
        assert_eq!(c.layer_secs(1), None);
        // 2 threads: 1.0 → 4.2 ms: 100 µs per layer; 1.5 threads would be 75 µs.
        c.layers = vec![p(1, 2.6e-3), p(2, 4.2e-3)];
        assert!((c.layer_secs(1).unwrap() - 50e-6).abs() < 1e-15);
        assert!((c.layer_secs(8).unwrap() - 100e-6).abs() < 1e-15);
    }

    #[test]
    fn a_fresh_probe_replaces_its_own_types_and_keeps_the_others() {
        let old = costs(vec![
            point("q8_0", 1, 0.010, 0.036),
            point("f16", 1, 0.03, 0.1),
        ]);
        let fresh = costs(vec![point("f16", 1, 0.03, 0.2)]);
        let m = merge(old.clone(), fresh.clone());
        assert_eq!(m.types(), vec!["f16".to_string(), "q8_0".into()]);
        assert_eq!(m.points.len(), 2);
        let f16 = m.points.iter().find(|p| p.ggml_type == "f16").unwrap();
        assert_eq!(f16.large_secs, 0.2);
        // Another engine: the fresh record alone.
        let other = TypeCosts {
            engine: "another build".into(),
            ..fresh
        };
        assert_eq!(merge(old, other.clone()), other);
    }

    #[test]
    fn a_record_from_another_machine_or_version_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tc.json");
        let c = costs(vec![point("q8_0", 1, 0.010, 0.036)]);
        save(&path, &c).unwrap();
        assert_eq!(load(&path, &c.machine), Some(c.clone()));
        let other = MachineId {
            hostname: "elsewhere".into(),
            ..c.machine.clone()
        };
        assert!(load(&path, &other).is_none());
        let old = TypeCosts {
            version: 0,
            ..c.clone()
        };
        save(&path, &old).unwrap();
        assert!(load(&path, &c.machine).is_none());
    }
}
