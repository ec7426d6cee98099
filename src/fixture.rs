//! Small `qwen3moe` GGUF models with seeded weights, for tests, benchmarks and the demo.
//!
//! Owns the fixture recipes (tiny, medium) and the router variants. The tokenizer is copied from
//! a vocab-only GGUF of the pinned llama.cpp source, so stock llama-server loads and runs the
//! result. Never downloads anything.
//!
//! Router variants:
//! - `uniform`: random router rows, every expert about equally likely.
//! - `skewed`: token embeddings share a common direction and a few experts per layer have router
//!   rows aligned with it, so those experts are hot (as in real models).
//! - `analytic`: attention output and expert down-projections are zero, so the residual stream
//!   never changes: every layer's router input is `rmsnorm(embedding[token]) * ffn_norm[layer]`
//!   and the routed experts can be computed from the file alone ([`analytic_routing`]).

use std::path::{Path, PathBuf};

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value};

pub const ARCH: &str = "qwen3moe";
pub const RMS_EPS: f32 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Router {
    Uniform,
    Skewed,
    Analytic,
}

impl Router {
    pub fn name(self) -> &'static str {
        match self {
            Router::Uniform => "uniform",
            Router::Skewed => "skewed",
            Router::Analytic => "analytic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    Tiny,
    Medium,
}

/// Everything that determines a fixture file.
#[derive(Debug, Clone, Serialize)]
pub struct FixtureSpec {
    pub layers: u32,
    pub experts: u32,
    pub top_k: u32,
    pub embd: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub head_dim: u64,
    pub expert_ff: u64,
    pub context_length: u64,
    pub router: Router,
    /// Type of the large matrices (embeddings, attention, experts, output); norms and the router
    /// stay f32, as in real model files.
    #[serde(serialize_with = "ser_type")]
    pub weight_type: GgmlType,
    pub seed: u64,
    /// Hot experts per layer for the skewed router.
    pub hot_experts: u32,
}

fn ser_type<S: serde::Serializer>(t: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.name)
}

impl FixtureSpec {
    pub fn preset(size: Size) -> FixtureSpec {
        match size {
            Size::Tiny => FixtureSpec {
                layers: 4,
                experts: 8,
                top_k: 2,
                embd: 64,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 16,
                expert_ff: 64,
                context_length: 4096,
                router: Router::Skewed,
                weight_type: GgmlType::F32,
                seed: 42,
                hot_experts: 2,
            },
            Size::Medium => FixtureSpec {
                layers: 12,
                experts: 32,
                top_k: 4,
                embd: 512,
                n_head: 8,
                n_head_kv: 4,
                head_dim: 64,
                expert_ff: 512,
                context_length: 4096,
                router: Router::Skewed,
                weight_type: GgmlType::Q8_0,
                seed: 42,
                hot_experts: 4,
            },
        }
    }

    /// Checks the spec before any work is done; the message names the offending value.
    pub fn validate(&self) -> Result<(), FixtureError> {
        let bad = |m: String| Err(FixtureError::Spec(m));
        if ![GgmlType::F32, GgmlType::F16, GgmlType::Q8_0].contains(&self.weight_type) {
            return bad(format!(
                "weight type {} is not supported (f32, f16, q8_0 are)",
                self.weight_type.name
            ));
        }
        if self.layers == 0 || self.layers > 512 {
            return bad(format!(
                "--layers {} must be between 1 and 512",
                self.layers
            ));
        }
        if self.experts < 2 || self.experts > 1024 {
            return bad(format!(
                "--experts {} must be between 2 and 1024",
                self.experts
            ));
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return bad(format!(
                "--top-k {} must be between 1 and --experts {}",
                self.top_k, self.experts
            ));
        }
        let blk = self.weight_type.block_elems;
        for (flag, v) in [("--embd", self.embd), ("--expert-ff", self.expert_ff)] {
            if v == 0 || v % blk != 0 || v > 65536 {
                return bad(format!(
                    "{flag} {v} must be a positive multiple of {blk} (type {}) up to 65536",
                    self.weight_type.name
                ));
            }
        }
        if self.n_head == 0 || self.n_head_kv == 0 || self.n_head % self.n_head_kv != 0 {
            return bad(format!(
                "head counts {}/{} must be positive with kv heads dividing heads",
                self.n_head, self.n_head_kv
            ));
        }
        if self.head_dim % 2 != 0 || (self.n_head * self.head_dim) % blk != 0 {
            return bad(format!(
                "head dim {} must be even and heads x head dim a multiple of {blk}",
                self.head_dim
            ));
        }
        if self.hot_experts >= self.experts {
            return bad(format!(
                "hot experts {} must be fewer than --experts {}",
                self.hot_experts, self.experts
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("build fixture: {0}")]
    Spec(String),
    #[error("read vocabulary {path}: {message}")]
    Vocab { path: PathBuf, message: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct FixtureReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub n_vocab: u64,
    pub spec: FixtureSpec,
}

/// Writes the fixture described by `spec` to `out`, with the tokenizer of the vocab GGUF `vocab`.
pub fn write_fixture(
    spec: &FixtureSpec,
    vocab: &Path,
    out: &Path,
) -> Result<FixtureReport, FixtureError> {
    spec.validate()?;
    let vocab_file = GgufFile::open(vocab).map_err(|e| FixtureError::Vocab {
        path: vocab.into(),
        message: e.to_string(),
    })?;
    let n_vocab = vocab_file
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(|a| a.len() as u64)
        .filter(|&n| n > 0)
        .ok_or_else(|| FixtureError::Vocab {
            path: vocab.into(),
            message: "no tokenizer.ggml.tokens array".into(),
        })?;

    let mut w = GgufWriter::new();
    let name = format!(
        "spark-fixture-{}L{}E{}k-{}",
        spec.layers,
        spec.experts,
        spec.top_k,
        spec.router.name()
    );
    w.set("general.architecture", Value::String(ARCH.into()));
    w.set("general.name", Value::String(name));
    w.set("general.alignment", Value::U32(32));
    let k = |s: &str| format!("{ARCH}.{s}");
    w.set(&k("block_count"), Value::U32(spec.layers));
    w.set(&k("context_length"), Value::U32(spec.context_length as u32));
    w.set(&k("embedding_length"), Value::U32(spec.embd as u32));
    w.set(
        &k("feed_forward_length"),
        Value::U32((spec.expert_ff * u64::from(spec.top_k)) as u32),
    );
    w.set(&k("attention.head_count"), Value::U32(spec.n_head as u32));
    w.set(
        &k("attention.head_count_kv"),
        Value::U32(spec.n_head_kv as u32),
    );
    w.set(&k("attention.key_length"), Value::U32(spec.head_dim as u32));
    w.set(
        &k("attention.value_length"),
        Value::U32(spec.head_dim as u32),
    );
    w.set(&k("attention.layer_norm_rms_epsilon"), Value::F32(RMS_EPS));
    w.set(&k("rope.freq_base"), Value::F32(1_000_000.0));
    w.set(&k("expert_count"), Value::U32(spec.experts));
    w.set(&k("expert_used_count"), Value::U32(spec.top_k));
    w.set(
        &k("expert_feed_forward_length"),
        Value::U32(spec.expert_ff as u32),
    );
    w.set(
        "spark.fixture.router",
        Value::String(spec.router.name().into()),
    );
    w.set("spark.fixture.seed", Value::U64(spec.seed));
    w.set(
        "spark.fixture.hot_experts",
        Value::U32(if spec.router == Router::Skewed {
            spec.hot_experts
        } else {
            0
        }),
    );
    for (key, value) in &vocab_file.metadata {
        if key.starts_with("tokenizer.") {
            w.set(key, value.clone());
        }
    }

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let wt = spec.weight_type;
    let e = spec.embd as usize;
    let q_dim = (spec.n_head * spec.head_dim) as usize;
    let kv_dim = (spec.n_head_kv * spec.head_dim) as usize;
    let ff = spec.expert_ff as usize;
    let n_exp = spec.experts as usize;
    let skewed = spec.router == Router::Skewed;
    let analytic = spec.router == Router::Analytic;

    // A common direction shared by all token embeddings (skewed routing keys on it).
    let common: Vec<f32> = random_vec(&mut rng, e, 1.0);
    let mut embd = random_vec(&mut rng, e * n_vocab as usize, 1.0);
    if skewed {
        for row in embd.chunks_mut(e) {
            for (x, c) in row.iter_mut().zip(&common) {
                *x = 0.6 * *x + 0.8 * c;
            }
        }
    }
    w.add_tensor(
        "token_embd.weight",
        &[spec.embd, n_vocab],
        wt,
        encode(&embd, wt),
    );
    drop(embd);
    w.add_tensor(
        "output_norm.weight",
        &[spec.embd],
        GgmlType::F32,
        encode(&vec![1.0; e], GgmlType::F32),
    );
    let out_scale = 1.0 / (e as f32).sqrt();
    w.add_tensor(
        "output.weight",
        &[spec.embd, n_vocab],
        wt,
        encode(&random_vec(&mut rng, e * n_vocab as usize, out_scale), wt),
    );

    let in_scale = 1.0 / (e as f32).sqrt();
    // A bar on a terminal for fixtures that take a while (medium and larger); no plain lines.
    let large = spec.layers as u64 * spec.experts as u64 * spec.expert_ff * spec.embd >= 1 << 26;
    let steps =
        crate::progress::Steps::new("writing fixture", u64::from(spec.layers), "layers", !large);
    for layer in 0..spec.layers {
        if steps.is_bar() {
            steps.at(u64::from(layer), || out.display().to_string(), String::new);
        }
        let b = |s: &str| format!("blk.{layer}.{s}.weight");
        let norm = |rng: &mut ChaCha8Rng| -> Vec<f32> {
            (0..e).map(|_| 0.8 + 0.4 * rng.gen::<f32>()).collect()
        };
        let attn_norm = norm(&mut rng);
        w.add_tensor(
            &b("attn_norm"),
            &[spec.embd],
            GgmlType::F32,
            encode(&attn_norm, GgmlType::F32),
        );
        w.add_tensor(
            &b("attn_q"),
            &[spec.embd, q_dim as u64],
            wt,
            encode(&random_vec(&mut rng, e * q_dim, in_scale), wt),
        );
        w.add_tensor(
            &b("attn_k"),
            &[spec.embd, kv_dim as u64],
            wt,
            encode(&random_vec(&mut rng, e * kv_dim, in_scale), wt),
        );
        w.add_tensor(
            &b("attn_v"),
            &[spec.embd, kv_dim as u64],
            wt,
            encode(&random_vec(&mut rng, e * kv_dim, in_scale), wt),
        );
        let wo = if analytic {
            vec![0.0; q_dim * e]
        } else {
            random_vec(&mut rng, q_dim * e, 1.0 / (q_dim as f32).sqrt())
        };
        w.add_tensor(
            &b("attn_output"),
            &[q_dim as u64, spec.embd],
            wt,
            encode(&wo, wt),
        );
        let hd = spec.head_dim as usize;
        w.add_tensor(
            &b("attn_q_norm"),
            &[spec.head_dim],
            GgmlType::F32,
            encode(&vec![1.0; hd], GgmlType::F32),
        );
        w.add_tensor(
            &b("attn_k_norm"),
            &[spec.head_dim],
            GgmlType::F32,
            encode(&vec![1.0; hd], GgmlType::F32),
        );
        let ffn_norm = norm(&mut rng);
        w.add_tensor(
            &b("ffn_norm"),
            &[spec.embd],
            GgmlType::F32,
            encode(&ffn_norm, GgmlType::F32),
        );

        // Router rows: expert j's logit is row j · input. Scaled so logits spread by a few units.
        let mut router = random_vec(&mut rng, e * n_exp, 3.0 * in_scale);
        if skewed {
            let hot = hot_experts(layer, spec.experts, spec.hot_experts);
            for &h in &hot {
                for (x, c) in router[h as usize * e..(h as usize + 1) * e]
                    .iter_mut()
                    .zip(&common)
                {
                    *x += 1.5 * in_scale * c;
                }
            }
        }
        w.add_tensor(
            &b("ffn_gate_inp"),
            &[spec.embd, spec.experts as u64],
            GgmlType::F32,
            encode(&router, GgmlType::F32),
        );
        let n_up = e * ff * n_exp;
        w.add_tensor(
            &b("ffn_gate_exps"),
            &[spec.embd, ff as u64, n_exp as u64],
            wt,
            encode(&random_vec(&mut rng, n_up, in_scale), wt),
        );
        w.add_tensor(
            &b("ffn_up_exps"),
            &[spec.embd, ff as u64, n_exp as u64],
            wt,
            encode(&random_vec(&mut rng, n_up, in_scale), wt),
        );
        let down = if analytic {
            vec![0.0; n_up]
        } else {
            random_vec(&mut rng, n_up, 1.0 / (ff as f32).sqrt())
        };
        w.add_tensor(
            &b("ffn_down_exps"),
            &[ff as u64, spec.embd, n_exp as u64],
            wt,
            encode(&down, wt),
        );
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| GgufError::Io {
            path: dir.into(),
            source,
        })?;
    }
    if steps.is_bar() {
        steps.at(
            u64::from(spec.layers),
            || format!("{}: writing", out.display()),
            String::new,
        );
    }
    w.write(out)?;
    steps.finish();
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(FixtureReport {
        path: out.to_path_buf(),
        bytes,
        n_vocab,
        spec: spec.clone(),
    })
}

/// The hot experts of a layer in a skewed fixture: a layer-dependent rotation so different
/// layers have different hot sets.
pub fn hot_experts(layer: u32, n_expert: u32, n_hot: u32) -> Vec<u32> {
    (0..n_hot)
        .map(|i| (layer * 3 + i * (n_expert / n_hot.max(1)).max(1)) % n_expert)
        .collect()
}

fn random_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    // Uniform on [-scale·√3, scale·√3]: unit variance times scale.
    let a = scale * 3f32.sqrt();
    (0..n).map(|_| rng.gen_range(-a..a)).collect()
}

/// Encodes f32 values as `t` (f32, f16 or q8_0).
pub fn encode(values: &[f32], t: GgmlType) -> Vec<u8> {
    match t.id {
        0 => bytemuck::cast_slice(values).to_vec(),
        1 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        8 => quantize_q8_0(values),
        _ => unreachable!("validated weight type"),
    }
}

/// ggml's Q8_0: blocks of 32 values, an f16 scale `d = max|x| / 127` and 32 rounded int8s.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % 32, 0, "q8_0 needs whole blocks");
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// Decodes a row-major buffer of `t` back to f32 (f32, f16, q8_0).
pub fn decode(bytes: &[u8], t: GgmlType) -> Option<Vec<f32>> {
    Some(match t.id {
        0 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        1 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        8 => bytes
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                b[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
        _ => return None,
    })
}

/// One layer's selection for one token: the top-k expert ids, highest logit first, and the
/// margin between the k-th and the (k+1)-th logit.
pub type Selection = (Vec<u32>, f32);

/// For an analytic fixture: the experts each token selects at each MoE layer, computed from the
/// file's weights alone. Returns, per token, per layer, the top-k expert ids (highest logit
/// first) and the margin between the k-th and the (k+1)-th logit, so callers can tell a
/// numerically safe selection from a near tie.
pub fn analytic_routing(file: &GgufFile, tokens: &[u32]) -> Result<Vec<Vec<Selection>>, String> {
    if file.get_str("spark.fixture.router") != Some("analytic") {
        return Err(format!(
            "{} is not an analytic fixture",
            file.path.display()
        ));
    }
    let arch = file
        .get_str("general.architecture")
        .unwrap_or_default()
        .to_string();
    let u = |k: &str| {
        file.get_u64(&format!("{arch}.{k}"))
            .ok_or(format!("missing {arch}.{k}"))
    };
    let (n_layer, e, n_exp, k) = (
        u("block_count")?,
        u("embedding_length")? as usize,
        u("expert_count")? as usize,
        u("expert_used_count")? as usize,
    );
    let eps = match file.get(&format!("{arch}.attention.layer_norm_rms_epsilon")) {
        Some(v) => v.as_f64().unwrap_or(1e-6) as f32,
        None => 1e-6,
    };
    let tensor = |name: &str| -> Result<Vec<f32>, String> {
        let t = file.tensor(name).ok_or(format!("missing tensor {name}"))?;
        let ty = t
            .ggml_type
            .ok_or(format!("tensor {name} has unknown type"))?;
        decode(
            file.tensor_data(t)
                .ok_or(format!("tensor {name} data out of range"))?,
            ty,
        )
        .ok_or(format!("tensor {name} type {} cannot be decoded", ty.name))
    };
    let embd_t = file
        .tensor("token_embd.weight")
        .ok_or("missing token_embd.weight")?;
    let embd_ty = embd_t
        .ggml_type
        .ok_or("token_embd.weight has unknown type")?;
    let row_bytes = embd_ty
        .tensor_bytes(&[e as u64])
        .ok_or("bad embedding row")? as usize;
    let embd_data = file
        .tensor_data(embd_t)
        .ok_or("token_embd.weight out of range")?;
    let layers: Vec<(Vec<f32>, Vec<f32>)> = (0..n_layer)
        .map(|l| {
            Ok((
                tensor(&format!("blk.{l}.ffn_norm.weight"))?,
                tensor(&format!("blk.{l}.ffn_gate_inp.weight"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let mut out = Vec::with_capacity(tokens.len());
    for &tok in tokens {
        let start = tok as usize * row_bytes;
        let row = embd_data
            .get(start..start + row_bytes)
            .ok_or(format!("token {tok} out of vocabulary"))?;
        let x = decode(row, embd_ty).ok_or("embedding type cannot be decoded")?;
        let ss: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
        let scale = 1.0 / ((ss / e as f64) as f32 + eps).sqrt();
        let mut per_layer = Vec::with_capacity(layers.len());
        for (norm, router) in &layers {
            let h: Vec<f32> = x.iter().zip(norm).map(|(&v, &w)| v * scale * w).collect();
            let mut logits: Vec<(f32, u32)> = (0..n_exp)
                .map(|j| {
                    (
                        router[j * e..(j + 1) * e]
                            .iter()
                            .zip(&h)
                            .map(|(a, b)| a * b)
                            .sum::<f32>(),
                        j as u32,
                    )
                })
                .collect();
            logits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let margin = if k < n_exp {
                logits[k - 1].0 - logits[k].0
            } else {
                f32::INFINITY
            };
            per_layer.push((logits[..k].iter().map(|&(_, id)| id).collect(), margin));
        }
        out.push(per_layer);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 7.0).collect();
        let q = quantize_q8_0(&v);
        assert_eq!(q.len(), 2 * 34);
        let back = decode(&q, GgmlType::Q8_0).unwrap();
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= 4.5 / 127.0 * 0.5 + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn spec_validation_names_the_flag() {
        let mut s = FixtureSpec::preset(Size::Tiny);
        s.top_k = 9;
        assert!(s.validate().unwrap_err().to_string().contains("--top-k 9"));
        let mut s = FixtureSpec::preset(Size::Tiny);
        s.weight_type = GgmlType::Q8_0;
        s.embd = 48;
        assert!(s.validate().unwrap_err().to_string().contains("--embd 48"));
    }

    #[test]
    fn hot_experts_are_distinct_and_in_range() {
        let hot = hot_experts(5, 32, 4);
        assert_eq!(hot.len(), 4);
        let mut d = hot.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 4);
        assert!(hot.iter().all(|&h| h < 32));
    }
}
