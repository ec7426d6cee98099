//! Memory fit: what a model needs in VRAM and host RAM for a context, a KV-cache type and a
//! placement, and the smallest `--n-cpu-moe` that fits a VRAM budget (or a refusal that says
//! why and what would help).
//!
//! Owns the memory arithmetic and the llama.cpp placement rules it mirrors: `-ngl` puts every
//! repeating layer and the output matrix on the GPU, the input embeddings stay in host memory
//! (unless the output matrix is tied to them, then a copy goes to the GPU), `--n-cpu-moe N` keeps
//! the routed experts of layers `0..N` in host memory. Pure arithmetic on GGUF metadata: never
//! does I/O beyond what it is handed, never measures anything.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::gguf::{GgmlType, GgufFile, MoeGeometry, TensorGroup};

use crate::units::mib;

/// What the planner needs to know about one model file, derived from its metadata.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFacts {
    pub path: String,
    pub name: Option<String>,
    pub architecture: String,
    pub fingerprint: String,
    pub n_layer: u32,
    pub n_embd: u64,
    pub n_vocab: u64,
    pub n_expert: u32,
    pub n_expert_used: u32,
    /// Bytes per tensor group.
    pub groups: BTreeMap<TensorGroup, u64>,
    /// The output matrix is the token embedding (no `output.weight`): llama.cpp puts a copy on
    /// the GPU.
    pub output_tied: bool,
    /// Routed-expert layers: (layer index, bytes of one expert across its tensors).
    pub expert_layers: Vec<(u32, u64)>,
    /// FFN width active per token (sum of active experts' FFN lengths, shared experts, or the
    /// dense FFN length): sizes the compute buffer.
    pub active_ffn_width: u64,
    /// Weight elements a decode token multiplies (active experts only; one embedding row).
    pub active_params: f64,
    /// The same weight elements by ggml type name (`q8_0`, `f16`, …): the CPU's compute per
    /// weight depends on the type.
    pub active_params_by_type: BTreeMap<String, f64>,
    /// Per-token KV bytes are computed from these.
    #[serde(skip)]
    pub geometry: MoeGeometry,
}

impl ModelFacts {
    pub fn of(file: &GgufFile, geometry: MoeGeometry) -> ModelFacts {
        let g = &geometry;
        let key = |k: &str| format!("{}.{k}", g.architecture);
        let groups = g.groups.bytes.clone();
        let output_tied = !groups.contains_key(&TensorGroup::Output);
        let expert_layers: Vec<(u32, u64)> = g
            .moe_layers
            .iter()
            .map(|l| (l.layer, l.expert_bytes))
            .collect();
        let dense_ff = file.get_u64(&key("feed_forward_length")).unwrap_or(0);
        let shared_ff = file
            .get_u64(&key("expert_shared_feed_forward_length"))
            .unwrap_or(0);
        let active_ffn_width = if g.is_moe() {
            u64::from(g.n_expert_used) * g.expert_ff_length.unwrap_or(0)
                + u64::from(g.n_expert_shared) * shared_ff.max(g.expert_ff_length.unwrap_or(0))
        } else {
            dense_ff
        };
        let mut active_params = 0.0;
        let mut active_params_by_type = BTreeMap::new();
        for t in &file.tensors {
            let elems = t.dims.iter().product::<u64>() as f64;
            let active = match g.group_of(&t.name) {
                TensorGroup::Nextn => 0.0, // not loaded
                TensorGroup::RoutedExperts if g.n_expert > 0 => {
                    elems * f64::from(g.n_expert_used) / f64::from(g.n_expert)
                }
                TensorGroup::Embeddings if !output_tied => elems / g.n_vocab.max(1) as f64,
                _ => elems,
            };
            active_params += active;
            *active_params_by_type.entry(t.type_name()).or_insert(0.0) += active;
        }
        ModelFacts {
            path: file.path.display().to_string(),
            name: g.name.clone(),
            architecture: g.architecture.clone(),
            fingerprint: g.fingerprint.to_string(),
            n_layer: g.n_layer,
            n_embd: g.n_embd,
            n_vocab: g.n_vocab,
            n_expert: g.n_expert,
            n_expert_used: g.n_expert_used,
            groups,
            output_tied,
            expert_layers,
            active_ffn_width,
            active_params,
            active_params_by_type,
            geometry,
        }
    }

    /// Weights llama-server loads: every tensor but the NextN/MTP layers'.
    pub fn loaded_bytes(&self) -> u64 {
        self.groups.values().sum::<u64>() - self.group(TensorGroup::Nextn)
    }

    fn group(&self, g: TensorGroup) -> u64 {
        self.groups.get(&g).copied().unwrap_or(0)
    }

    pub fn is_moe(&self) -> bool {
        !self.expert_layers.is_empty()
    }

    /// Weights that sit on the GPU whenever layers are offloaded: everything except the input
    /// embeddings and the routed experts (plus the embeddings' copy when the output is tied).
    /// Shared experts and dense layers are in it; NextN/MTP layers are not loaded at all.
    pub fn gpu_always_bytes(&self) -> u64 {
        let all: u64 = self.groups.values().sum();
        let mut b = all
            - self.group(TensorGroup::Embeddings)
            - self.group(TensorGroup::RoutedExperts)
            - self.group(TensorGroup::Nextn);
        if self.output_tied {
            b += self.group(TensorGroup::Embeddings);
        }
        b
    }

    /// Weights that stay in host memory whatever the placement: the input embeddings.
    pub fn host_always_bytes(&self) -> u64 {
        self.group(TensorGroup::Embeddings)
    }

    /// All routed-expert bytes of one layer (every expert).
    pub fn layer_expert_bytes(&self, layer: u32) -> u64 {
        self.expert_layers
            .iter()
            .find(|(l, _)| *l == layer)
            .map(|(_, b)| b * u64::from(self.n_expert))
            .unwrap_or(0)
    }

    /// Routed-expert bytes kept in host memory by `--n-cpu-moe n` (layers `0..n`).
    pub fn experts_on_host(&self, n_cpu_moe: u32) -> u64 {
        self.expert_layers
            .iter()
            .filter(|(l, _)| *l < n_cpu_moe)
            .map(|(_, b)| b * u64::from(self.n_expert))
            .sum()
    }

    pub fn experts_total(&self) -> u64 {
        self.experts_on_host(u32::MAX)
    }

    /// Routed-expert bytes one decode token reads from the layers `lo..hi`.
    pub fn active_expert_bytes(&self, lo: u32, hi: u32) -> u64 {
        self.expert_layers
            .iter()
            .filter(|(l, _)| *l >= lo && *l < hi)
            .map(|(_, b)| b * u64::from(self.n_expert_used))
            .sum()
    }

    /// Non-expert weight bytes one decode token reads (one embedding row when not tied).
    pub fn dense_read_bytes(&self) -> u64 {
        let emb = self.group(TensorGroup::Embeddings);
        let emb_read = if self.output_tied {
            emb
        } else {
            emb / self.n_vocab.max(1)
        };
        self.gpu_always_bytes() - if self.output_tied { emb } else { 0 } + emb_read
    }

    /// Index past the last layer that holds experts (`--n-cpu-moe` at or above this keeps every
    /// expert on the host).
    pub fn expert_layer_end(&self) -> u32 {
        self.expert_layers.last().map(|(l, _)| l + 1).unwrap_or(0)
    }
}

/// The run settings that change memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemorySettings {
    pub ctx: u64,
    #[serde(serialize_with = "ser_type")]
    pub k_type: GgmlType,
    #[serde(serialize_with = "ser_type")]
    pub v_type: GgmlType,
    pub ubatch: u64,
    /// Fixed VRAM reserve for the runtime (CUDA context, allocator slack).
    pub reserve_bytes: u64,
}

impl MemorySettings {
    /// What `spark serve` places with, and forecasts `--residency` with: one definition, so
    /// that the decision and the placement it runs count the same bytes (f16 KV at `ctx`, a
    /// 512-token ubatch, 256 MiB for the runtime).
    pub fn serve(ctx: u64) -> MemorySettings {
        MemorySettings {
            ctx,
            k_type: GgmlType::F16,
            v_type: GgmlType::F16,
            ubatch: 512,
            reserve_bytes: 256 * crate::units::MIB,
        }
    }
}

fn ser_type<S: serde::Serializer>(t: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.name)
}

/// Memory that does not depend on the expert placement.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Overheads {
    pub kv_bytes: u64,
    pub compute_bytes: u64,
    pub reserve_bytes: u64,
}

/// KV-cache bytes for the whole context.
pub fn kv_bytes(m: &ModelFacts, s: &MemorySettings) -> u64 {
    m.geometry.kv_bytes_per_token(s.k_type, s.v_type) * s.ctx
}

/// Compute-buffer estimate for one micro-batch (llama.cpp's graph allocator): f32 activations of
/// the residual stream and the active FFN, the f16 attention mask over the context, and the
/// logits of a few outputs. Matches the pinned build's CPU compute buffer within 0.1 MiB on the
/// medium fixture at contexts 1024 and 4096.
pub fn compute_bytes(m: &ModelFacts, s: &MemorySettings) -> u64 {
    let ub = s.ubatch.min(s.ctx).max(1);
    4 * ub * (4 * m.n_embd + 3 * m.active_ffn_width) + 2 * ub * s.ctx + 32 * m.n_vocab
}

pub fn overheads(m: &ModelFacts, s: &MemorySettings) -> Overheads {
    Overheads {
        kv_bytes: kv_bytes(m, s),
        compute_bytes: compute_bytes(m, s),
        reserve_bytes: s.reserve_bytes,
    }
}

/// Where the weights go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Placement {
    /// Every layer and every expert on the GPU.
    AllGpu,
    /// Every layer on the GPU except the routed experts of layers `0..n`.
    CpuMoe { n: u32 },
    /// No GPU: everything in host memory.
    CpuOnly,
}

/// Bytes per memory for one placement.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub vram_bytes: u64,
    pub host_bytes: u64,
}

pub fn usage(m: &ModelFacts, s: &MemorySettings, p: Placement) -> Usage {
    let o = overheads(m, s);
    match p {
        Placement::CpuOnly => Usage {
            vram_bytes: 0,
            host_bytes: m.loaded_bytes() + o.kv_bytes + o.compute_bytes,
        },
        Placement::AllGpu | Placement::CpuMoe { .. } => {
            let n = match p {
                Placement::CpuMoe { n } => n,
                _ => 0,
            };
            let host_experts = m.experts_on_host(n);
            Usage {
                vram_bytes: m.gpu_always_bytes()
                    + (m.experts_total() - host_experts)
                    + o.kv_bytes
                    + o.compute_bytes
                    + o.reserve_bytes,
                host_bytes: m.host_always_bytes() + host_experts,
            }
        }
    }
}

/// The outcome of fitting a model into a budget.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum FitOutcome {
    Fits {
        placement: Placement,
        usage: Usage,
        /// VRAM left in the budget (0 without a GPU).
        headroom_bytes: u64,
    },
    Refused(Refusal),
}

/// Why a model does not fit, and what would make it fit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Refusal {
    pub reason: String,
    /// Smallest VRAM the model needs with every routed expert in host memory.
    pub min_vram_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub suggestions: Vec<String>,
}

/// Finds the placement: CPU only without a budget, else all-GPU, else the smallest
/// `--n-cpu-moe` that fits, else a refusal. Host RAM must hold the host part.
pub fn fit(
    m: &ModelFacts,
    s: &MemorySettings,
    budget_bytes: Option<u64>,
    ram_total_bytes: u64,
) -> FitOutcome {
    let candidate = match budget_bytes {
        None => Some(Placement::CpuOnly),
        Some(b) => {
            let all = usage(m, s, Placement::AllGpu);
            if all.vram_bytes <= b {
                Some(Placement::AllGpu)
            } else {
                (1..=m.expert_layer_end())
                    .map(|n| Placement::CpuMoe { n })
                    .find(|&p| usage(m, s, p).vram_bytes <= b)
            }
        }
    };
    let Some(placement) = candidate else {
        return FitOutcome::Refused(refuse_vram(m, s, budget_bytes.unwrap_or(0)));
    };
    let u = usage(m, s, placement);
    if u.host_bytes > ram_total_bytes {
        return FitOutcome::Refused(Refusal {
            reason: format!(
                "the host part needs {} but the machine has {} of RAM",
                mib(u.host_bytes),
                mib(ram_total_bytes)
            ),
            min_vram_bytes: usage(
                m,
                s,
                Placement::CpuMoe {
                    n: m.expert_layer_end(),
                },
            )
            .vram_bytes,
            budget_bytes,
            suggestions: vec![
                "more host RAM".into(),
                "a smaller quant of the model".into(),
                if budget_bytes.is_some() {
                    "more VRAM, so fewer experts stay in host memory".into()
                } else {
                    "a GPU: pass --vram-budget MiB to offload layers".into()
                },
            ],
        });
    }
    FitOutcome::Fits {
        placement,
        usage: u,
        headroom_bytes: budget_bytes.map(|b| b - u.vram_bytes).unwrap_or(0),
    }
}

fn refuse_vram(m: &ModelFacts, s: &MemorySettings, budget: u64) -> Refusal {
    let floor = if m.is_moe() {
        Placement::CpuMoe {
            n: m.expert_layer_end(),
        }
    } else {
        Placement::AllGpu
    };
    let need = usage(m, s, floor).vram_bytes;
    let o = overheads(m, s);
    let mut suggestions = Vec::new();
    suggestions.push(format!(
        "more VRAM: at least {} (budget {})",
        mib(need),
        mib(budget)
    ));
    // Shorter context: VRAM is linear in ctx (KV cache + attention mask) once the micro-batch
    // is fixed.
    let fixed = need - o.kv_bytes - 2 * s.ubatch.min(s.ctx) * s.ctx;
    let per_ctx = m.geometry.kv_bytes_per_token(s.k_type, s.v_type) + 2 * s.ubatch.min(s.ctx);
    if budget > fixed && per_ctx > 0 {
        let c = ((budget - fixed) / per_ctx) / 256 * 256;
        if c >= 256 && c < s.ctx {
            let shorter = MemorySettings { ctx: c, ..*s };
            if usage(m, &shorter, floor).vram_bytes <= budget {
                suggestions.push(format!("a shorter context: --ctx {c} fits"));
            }
        }
    }
    for t in [GgmlType::Q8_0, GgmlType::Q4_0] {
        if s.k_type.bytes_per_elem() <= t.bytes_per_elem()
            && s.v_type.bytes_per_elem() <= t.bytes_per_elem()
        {
            continue;
        }
        let q = MemorySettings {
            k_type: t,
            v_type: t,
            ..*s
        };
        if usage(m, &q, floor).vram_bytes <= budget {
            suggestions.push(format!(
                "a quantised KV cache: --cache-type-k {0} --cache-type-v {0} fits (KV {1} instead of {2})",
                t.name,
                mib(kv_bytes(m, &q)),
                mib(o.kv_bytes)
            ));
            break;
        }
    }
    suggestions.push(format!(
        "a smaller quant: the always-resident weights take {}; {} less would fit",
        mib(m.gpu_always_bytes()),
        mib(need - budget)
    ));
    if !m.is_moe() {
        suggestions.push(
            "fewer GPU layers (-ngl below the layer count): spark does not plan partial layer offload"
                .into(),
        );
    }
    let reason = if m.is_moe() {
        format!(
            "even with every routed expert in host memory the model needs {} of VRAM, more than the budget of {}",
            mib(need),
            mib(budget)
        )
    } else {
        format!(
            "the dense model needs {} of VRAM with every layer on the GPU, more than the budget of {}",
            mib(need),
            mib(budget)
        )
    };
    Refusal {
        reason,
        min_vram_bytes: need,
        budget_bytes: Some(budget),
        suggestions,
    }
}

/// The llama-server flags for a placement.
pub fn server_flags(m: &ModelFacts, s: &MemorySettings, p: Placement, threads: u32) -> Vec<String> {
    let mut f = Vec::new();
    let ngl = (m.n_layer + 1).max(99);
    match p {
        Placement::CpuOnly => f.extend(["-ngl".to_string(), "0".into()]),
        Placement::AllGpu => f.extend(["-ngl".to_string(), ngl.to_string()]),
        Placement::CpuMoe { n } => f.extend([
            "-ngl".to_string(),
            ngl.to_string(),
            "--n-cpu-moe".into(),
            n.to_string(),
        ]),
    }
    f.extend([
        "-c".to_string(),
        s.ctx.to_string(),
        "--cache-type-k".into(),
        s.k_type.name.to_string(),
        "--cache-type-v".into(),
        s.v_type.name.to_string(),
    ]);
    if needs_flash_attn(s) {
        f.extend(["-fa".to_string(), "on".into()]);
    }
    if s.ubatch != 512 {
        f.extend(["-ub".to_string(), s.ubatch.to_string()]);
    }
    f.extend(["-t".to_string(), threads.to_string()]);
    f
}

/// A quantised V cache needs flash attention in llama.cpp.
pub fn needs_flash_attn(s: &MemorySettings) -> bool {
    ![GgmlType::F16, GgmlType::F32, GgmlType::BF16].contains(&s.v_type)
}

/// The `-ngl` / `--n-cpu-moe` pair of a placement.
pub fn gpu_layers(m: &ModelFacts, p: Placement) -> (u32, u32) {
    let ngl = (m.n_layer + 1).max(99);
    match p {
        Placement::CpuOnly => (0, 0),
        Placement::AllGpu => (ngl, 0),
        Placement::CpuMoe { n } => (ngl, n),
    }
}
