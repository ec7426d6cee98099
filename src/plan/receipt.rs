//! Receipts: a llama-bench measurement paired with the plan's forecast for the same settings,
//! and the per-machine store they are folded from.
//!
//! Owns the reading of llama-bench `-o json` output (the pinned build's field names), the
//! receipt record and `cache_dir()/machine/receipts.json` (rewritten atomically). Never spawns
//! llama-bench itself: the supervisor runs it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::forecast::Regime;

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("read llama-bench output {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse llama-bench output {what}: {message}")]
    Parse { what: String, message: String },
    #[error("read receipts {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("write receipts {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One llama-bench result row (one test: `pp` when `n_prompt > 0`, `tg` when `n_gen > 0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    pub model_filename: String,
    pub model_size: u64,
    pub backends: String,
    pub cpu_info: String,
    pub gpu_info: String,
    pub build_commit: String,
    pub build_number: i64,
    pub n_threads: u32,
    pub n_gpu_layers: i64,
    pub n_cpu_moe: u32,
    pub type_k: String,
    pub type_v: String,
    pub n_ubatch: u64,
    pub n_prompt: u64,
    pub n_gen: u64,
    pub n_depth: u64,
    /// Mean tokens/s over the repetitions.
    pub avg_ts: f64,
    pub stddev_ts: f64,
    /// Tokens/s of each repetition.
    pub samples_ts: Vec<f64>,
}

impl BenchRow {
    pub fn is_decode(&self) -> bool {
        self.n_gen > 0 && self.n_prompt == 0
    }

    pub fn is_prefill(&self) -> bool {
        self.n_prompt > 0 && self.n_gen == 0
    }

    /// Whether the measurement ran on a GPU backend.
    pub fn has_gpu(&self) -> bool {
        !self.gpu_info.trim().is_empty()
            || self
                .backends
                .split(',')
                .any(|b| !b.trim().eq_ignore_ascii_case("CPU") && !b.trim().is_empty())
    }

    /// The settings that identify a configuration (model excluded).
    pub fn settings_key(&self) -> String {
        format!(
            "t{}-ngl{}-ncmoe{}-{}/{}-ub{}",
            self.n_threads,
            self.n_gpu_layers,
            self.n_cpu_moe,
            self.type_k,
            self.type_v,
            self.n_ubatch
        )
    }
}

/// Parses llama-bench `-o json` (an array of rows) or `-o jsonl` (one row per line).
pub fn parse_bench_json(text: &str, what: &str) -> Result<Vec<BenchRow>, ReceiptError> {
    let err = |message: String| ReceiptError::Parse {
        what: what.to_string(),
        message,
    };
    let trimmed = text.trim_start();
    let values: Vec<serde_json::Value> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| err(e.to_string()))?
    } else {
        trimmed
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(format!("line {}: {e}", i + 1))))
            .collect::<Result<_, _>>()?
    };
    if values.is_empty() {
        return Err(err(
            "no results (expected llama-bench -o json output)".into()
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| row(v).map_err(|m| err(format!("result {}: {m}", i + 1))))
        .collect()
}

fn row(v: &serde_json::Value) -> Result<BenchRow, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let s = |k: &str| -> String {
        obj.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let u = |k: &str| -> Result<u64, String> {
        obj.get(k)
            .and_then(|x| x.as_u64())
            .ok_or_else(|| format!("field {k} is missing or not a non-negative integer"))
    };
    let i = |k: &str| -> Result<i64, String> {
        obj.get(k)
            .and_then(|x| x.as_i64())
            .ok_or_else(|| format!("field {k} is missing or not an integer"))
    };
    let f = |k: &str| -> Result<f64, String> {
        obj.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("field {k} is missing or not a number"))
    };
    let avg_ts = f("avg_ts")?;
    if !(avg_ts.is_finite() && avg_ts > 0.0) {
        return Err(format!("avg_ts {avg_ts} is not a positive rate"));
    }
    Ok(BenchRow {
        model_filename: s("model_filename"),
        model_size: u("model_size")?,
        backends: s("backends"),
        cpu_info: s("cpu_info"),
        gpu_info: s("gpu_info"),
        build_commit: s("build_commit"),
        build_number: obj
            .get("build_number")
            .and_then(|x| x.as_i64())
            .unwrap_or(0),
        n_threads: u("n_threads")? as u32,
        n_gpu_layers: i("n_gpu_layers")?,
        n_cpu_moe: obj.get("n_cpu_moe").and_then(|x| x.as_u64()).unwrap_or(0) as u32,
        type_k: s("type_k"),
        type_v: s("type_v"),
        n_ubatch: obj.get("n_ubatch").and_then(|x| x.as_u64()).unwrap_or(512),
        n_prompt: u("n_prompt")?,
        n_gen: u("n_gen")?,
        n_depth: obj.get("n_depth").and_then(|x| x.as_u64()).unwrap_or(0),
        avg_ts,
        stddev_ts: obj.get("stddev_ts").and_then(|x| x.as_f64()).unwrap_or(0.0),
        samples_ts: obj
            .get("samples_ts")
            .and_then(|x| x.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
            .unwrap_or_default(),
    })
}

pub fn read_bench_json(path: &Path) -> Result<Vec<BenchRow>, ReceiptError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReceiptError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bench_json(&text, &path.display().to_string())
}

/// A measurement paired with the plan for the same settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    pub machine: String,
    pub unix_time: u64,
    pub model: String,
    pub fingerprint: String,
    pub regime: Regime,
    /// Settings key of the configuration (threads, layers, KV types, micro-batch).
    pub settings: String,
    pub threads: u32,
    pub n_gpu_layers: i64,
    pub n_cpu_moe: u32,
    /// `llama-bench` (run by spark), `file` (read from JSON) or `bench plan`.
    pub source: String,
    /// Host read bandwidth the ceiling assumed, GB/s.
    #[serde(default)]
    pub host_gbps: f64,
    pub decode_ceiling_tps: f64,
    /// Seconds per token of the ceiling that are the host's per-type terms (0 in receipts
    /// written before they existed). Without a probe record these are compute on top of the
    /// reads, and the bandwidth-only ceiling is `1 / (1 / ceiling − this)`; with one, a probed
    /// type's term includes its reads (see `Roofline::host_compute`).
    #[serde(default)]
    pub decode_compute_secs: f64,
    pub decode_measured_tps: Option<f64>,
    pub decode_forecast_tps: f64,
    pub decode_band: (f64, f64),
    pub prefill_ceiling_tps: f64,
    pub prefill_measured_tps: Option<f64>,
    pub prefill_forecast_tps: f64,
}

impl Receipt {
    pub fn decode_efficiency(&self) -> Option<f64> {
        self.decode_measured_tps
            .map(|m| m / self.decode_ceiling_tps)
            .filter(|e| e.is_finite())
    }

    pub fn prefill_efficiency(&self) -> Option<f64> {
        self.prefill_measured_tps
            .map(|m| m / self.prefill_ceiling_tps)
            .filter(|e| e.is_finite())
    }

    /// Forecast error against the measurement, as a signed fraction of the measurement.
    pub fn decode_error(&self) -> Option<f64> {
        self.decode_measured_tps
            .map(|m| (self.decode_forecast_tps - m) / m)
    }

    pub fn decode_inside_band(&self) -> Option<bool> {
        self.decode_measured_tps
            .map(|m| m >= self.decode_band.0 && m <= self.decode_band.1)
    }

    /// Same model file and same settings.
    pub fn same_configuration(&self, other: &Receipt) -> bool {
        self.fingerprint == other.fingerprint && self.settings == other.settings
    }
}

/// The receipts of this machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReceiptStore {
    pub version: u32,
    pub receipts: Vec<Receipt>,
}

pub fn store_path() -> PathBuf {
    super::hardware::machine_dir().join("receipts.json")
}

impl ReceiptStore {
    /// Reads the store; a missing file is an empty store, a corrupt one an error.
    pub fn load(path: &Path) -> Result<ReceiptStore, ReceiptError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ReceiptError::Store {
                path: path.to_path_buf(),
                message: format!("{e} (move the file away to start over)"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ReceiptStore {
                version: 1,
                receipts: Vec::new(),
            }),
            Err(e) => Err(ReceiptError::Store {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ReceiptError> {
        let write = |source| ReceiptError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let json = serde_json::to_vec_pretty(self).expect("receipts serialize");
        crate::atomic_file::write_atomic(path, &json).map_err(write)
    }

    /// Realized decode and prefill efficiencies of `regime` on `machine`, skipping receipts for
    /// which `exclude` holds. Receipts at the same thread count are preferred: when any exists,
    /// only those count (oversubscribed threads change efficiency more than anything else on a
    /// CPU).
    pub fn efficiencies(
        &self,
        machine: &str,
        regime: Regime,
        threads: u32,
        exclude: impl Fn(&Receipt) -> bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let mine: Vec<&Receipt> = self
            .receipts
            .iter()
            .filter(|r| r.machine == machine && r.regime == regime && !exclude(r))
            .collect();
        let picked: Vec<&Receipt> = match same_threads(&mine, threads) {
            Some(v) => v,
            None => mine,
        };
        let mut d = Vec::new();
        let mut p = Vec::new();
        for r in picked {
            d.extend(r.decode_efficiency());
            p.extend(r.prefill_efficiency());
        }
        (d, p)
    }
}

/// The receipts at `threads`, or `None` when there are none.
pub fn same_threads<'a>(rs: &[&'a Receipt], threads: u32) -> Option<Vec<&'a Receipt>> {
    let v: Vec<&Receipt> = rs
        .iter()
        .copied()
        .filter(|r| r.threads == threads)
        .collect();
    (!v.is_empty()).then_some(v)
}

/// llama-bench arguments for one configuration, with JSON output.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub model: PathBuf,
    pub threads: u32,
    pub n_gpu_layers: u32,
    pub n_cpu_moe: u32,
    pub type_k: String,
    pub type_v: String,
    pub flash_attn: bool,
    pub ubatch: u64,
    pub n_prompt: u64,
    pub n_gen: u64,
    pub repetitions: u32,
}

impl BenchSpec {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["-m".into(), self.model.display().to_string()];
        let mut kv = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        kv("-p", self.n_prompt.to_string());
        kv("-n", self.n_gen.to_string());
        kv("-r", self.repetitions.to_string());
        kv("-t", self.threads.to_string());
        kv("-ngl", self.n_gpu_layers.to_string());
        kv("-ncmoe", self.n_cpu_moe.to_string());
        kv("-ctk", self.type_k.clone());
        kv("-ctv", self.type_v.clone());
        kv("-ub", self.ubatch.to_string());
        if self.flash_attn {
            kv("-fa", "on".into());
        }
        kv("-o", "json".into());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str = include_str!("../../tests/data/plan/llama-bench-tiny-11434.json");

    #[test]
    fn parses_real_llama_bench_json() {
        let rows = parse_bench_json(REAL, "real").unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].is_prefill() && rows[1].is_decode());
        assert_eq!(rows[1].n_gen, 16);
        assert_eq!(rows[1].n_threads, 2);
        assert_eq!(rows[1].n_cpu_moe, 2);
        assert_eq!(rows[1].n_gpu_layers, -1);
        assert_eq!(rows[1].type_k, "f16");
        assert_eq!(rows[1].model_size, 18164480);
        assert!((rows[1].avg_ts - 2117.229197).abs() < 1e-9);
        assert_eq!(rows[1].samples_ts, vec![3000.76, 1233.69]);
        assert!(!rows[1].has_gpu());
    }

    #[test]
    fn jsonl_and_bad_input() {
        let v: serde_json::Value = serde_json::from_str(REAL).unwrap();
        let lines: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            parse_bench_json(&lines.join("\n"), "jsonl").unwrap().len(),
            2
        );
        let e = parse_bench_json("[]", "empty.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty.json") && e.contains("no results"), "{e}");
        let e = parse_bench_json("[{\"avg_ts\": 1}]", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_size"), "{e}");
        let e = parse_bench_json("{not json", "x").unwrap_err().to_string();
        assert!(e.starts_with("parse llama-bench output x: line 1"), "{e}");
    }
}
