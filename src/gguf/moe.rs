//! The MoE view of a GGUF file: geometry, per-expert byte slices, tensor groups, KV bytes, and
//! the fingerprint that ties a profile to one model file.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::reader::{GgufFile, TensorInfo};
use super::types::GgmlType;
use super::GgufError;

/// The `general.architecture` values whose expert layout, gating and always-resident parts
/// (shared experts, dense and NextN layers) spark knows and tests with its own fixtures
/// (`spark fixture --arch`). A MoE file of any other arch is refused with its name, never
/// counted by guesswork; dense models of any arch are read.
pub const SUPPORTED_MOE_ARCHS: &[&str] = &[
    "qwen3moe",
    "llama",
    "qwen35moe",
    "qwen3next",
    "gpt-oss",
    "glm4moe",
    "deepseek2",
    "gemma4",
    "llama4",
    "deepseek4",
    "qwen4exp",
];

/// Which part of the model a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum TensorGroup {
    Embeddings,
    Output,
    Norms,
    Attention,
    Router,
    RoutedExperts,
    SharedExperts,
    DenseFfn,
    /// NextN / multi-token-prediction blocks: in the file, not loaded by llama-server unless
    /// asked to (speculative decoding with MTP).
    Nextn,
    Other,
}

impl TensorGroup {
    pub const ALL: [TensorGroup; 10] = [
        TensorGroup::Embeddings,
        TensorGroup::Output,
        TensorGroup::Norms,
        TensorGroup::Attention,
        TensorGroup::Router,
        TensorGroup::RoutedExperts,
        TensorGroup::SharedExperts,
        TensorGroup::DenseFfn,
        TensorGroup::Nextn,
        TensorGroup::Other,
    ];

    /// The group's name as printed and as serialised.
    pub fn name(self) -> &'static str {
        match self {
            TensorGroup::Embeddings => "embeddings",
            TensorGroup::Output => "output",
            TensorGroup::Norms => "norms",
            TensorGroup::Attention => "attention",
            TensorGroup::Router => "router",
            TensorGroup::RoutedExperts => "routed_experts",
            TensorGroup::SharedExperts => "shared_experts",
            TensorGroup::DenseFfn => "dense_ffn",
            TensorGroup::Nextn => "nextn",
            TensorGroup::Other => "other",
        }
    }

    /// Classifies a tensor by its llama.cpp name (`blk.N.<part>.weight`, `token_embd.weight`…).
    pub fn of(name: &str) -> TensorGroup {
        let part = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.').map(|(_, p)| p))
            .unwrap_or(name);
        let stem = part
            .strip_suffix(".weight")
            .or_else(|| part.strip_suffix(".bias"))
            .unwrap_or(part);
        if stem.starts_with("nextn.") {
            TensorGroup::Nextn
        } else if stem.starts_with("token_embd") || stem.starts_with("per_layer_token_embd") {
            TensorGroup::Embeddings
        } else if stem == "output" {
            TensorGroup::Output
        } else if stem.ends_with("norm") || stem.contains("_norm") || stem.starts_with("norm") {
            TensorGroup::Norms
        } else if stem.contains("_exps") || stem.ends_with("_exps_s") {
            TensorGroup::RoutedExperts
        } else if stem.contains("_shexp") || stem.contains("_chexp") {
            TensorGroup::SharedExperts
        } else if stem.starts_with("ffn_gate_inp")
            || stem.starts_with("exp_probs")
            || stem == "ffn_gate_tid2eid"
        {
            TensorGroup::Router
        } else if stem.starts_with("attn") || stem.starts_with("ssm") || stem.starts_with("indexer")
        {
            TensorGroup::Attention
        } else if stem.starts_with("ffn_") {
            TensorGroup::DenseFfn
        } else {
            TensorGroup::Other
        }
    }
}

/// Bytes and tensor counts per group.
#[derive(Debug, Clone, Serialize, Default)]
pub struct GroupTotals {
    pub bytes: std::collections::BTreeMap<TensorGroup, u64>,
    pub tensors: std::collections::BTreeMap<TensorGroup, u64>,
    /// Tensors whose type is unknown: their bytes are not in the totals.
    pub unknown_type_tensors: Vec<String>,
}

/// One expert tensor of one layer (e.g. `blk.3.ffn_up_exps.weight`), split into equal slices.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertTensor {
    pub name: String,
    /// The role: `gate`, `up`, `down` or `gate_up`.
    pub role: String,
    pub ggml_type: String,
    pub dims: Vec<u64>,
    /// Absolute offset of expert 0's slice in the file.
    pub file_offset: u64,
    /// Bytes of one expert's slice; expert `e` starts at `file_offset + e * slice_bytes`.
    pub slice_bytes: u64,
}

/// One expert's bytes in one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExpertSlice {
    pub offset: u64,
    pub bytes: u64,
}

/// The routed-expert tensors of one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerExperts {
    pub layer: u32,
    pub tensors: Vec<ExpertTensor>,
    /// Bytes of one expert across all its tensors (what one swap-in moves).
    pub expert_bytes: u64,
}

impl LayerExperts {
    /// Where expert `e`'s bytes are in each tensor of this layer, in tensor order.
    pub fn slices(&self, e: u32) -> impl Iterator<Item = ExpertSlice> + '_ {
        self.tensors.iter().map(move |t| ExpertSlice {
            offset: t.file_offset + u64::from(e) * t.slice_bytes,
            bytes: t.slice_bytes,
        })
    }
}

/// A model fingerprint: file size plus a hash of everything before the data section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Fingerprint {
    pub file_size: u64,
    pub header_sha256: [u8; 32],
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gguf-{}-", self.file_size)?;
        for b in &self.header_sha256[..16] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.to_string()
    }
}

/// What a MoE runtime needs to know about a model.
#[derive(Debug, Clone, Serialize)]
pub struct MoeGeometry {
    pub architecture: String,
    pub name: Option<String>,
    pub n_layer: u32,
    pub n_embd: u64,
    pub n_vocab: u64,
    pub n_head: u64,
    pub n_head_kv: Vec<u64>,
    pub head_dim_k: u64,
    pub head_dim_v: u64,
    pub context_length: Option<u64>,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub n_expert_shared: u32,
    pub expert_ff_length: Option<u64>,
    /// Layers that hold routed experts, in layer order (dense layers are absent).
    pub moe_layers: Vec<LayerExperts>,
    /// Trunk layers without routed experts (leading dense layers): always resident, no routing.
    pub dense_layers: Vec<u32>,
    /// NextN / multi-token-prediction layers at the end (`nextn_predict_layers`): in the file,
    /// not loaded by llama-server unless asked to; never routed, never placed.
    pub nextn_layers: Vec<u32>,
    /// Layers with linear attention (gated delta net / SSM tensors) in front of their FFN.
    pub linear_attention_layers: Vec<u32>,
    /// MoE layers whose experts come from a fixed token → experts table (`ffn_gate_tid2eid`,
    /// deepseek4) instead of the router: placed, hooked and counted like the others.
    pub hash_routed_layers: Vec<u32>,
    pub groups: GroupTotals,
    pub total_tensor_bytes: u64,
    pub fingerprint: Fingerprint,
}

impl MoeGeometry {
    /// Reads the geometry of `file`. A dense model is valid: it has no MoE layers.
    pub fn of(file: &GgufFile) -> Result<MoeGeometry, GgufError> {
        let invalid = |message: String| GgufError::Invalid {
            path: file.path.clone(),
            message,
        };
        let arch = file
            .get_str("general.architecture")
            .ok_or_else(|| invalid("metadata has no general.architecture".into()))?
            .to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = file
            .get_u64(&key("block_count"))
            .ok_or_else(|| invalid(format!("metadata has no {}", key("block_count"))))?;
        let n_layer = u32::try_from(n_layer)
            .map_err(|_| invalid(format!("block_count {n_layer} is too large")))?;
        let n_embd = file.get_u64(&key("embedding_length")).unwrap_or(0);
        let n_head = per_layer(file, &key("attention.head_count"))
            .first()
            .copied()
            .unwrap_or(0);
        let mut n_head_kv = per_layer(file, &key("attention.head_count_kv"));
        if n_head_kv.is_empty() {
            n_head_kv = vec![n_head];
        }
        let default_head = n_embd.checked_div(n_head).unwrap_or(0);
        let head_dim_k = file
            .get_u64(&key("attention.key_length"))
            .unwrap_or(default_head);
        let head_dim_v = file
            .get_u64(&key("attention.value_length"))
            .unwrap_or(default_head);
        let n_expert = file.get_u64(&key("expert_count")).unwrap_or(0) as u32;
        let n_expert_used = file.get_u64(&key("expert_used_count")).unwrap_or(0) as u32;
        // qwen35moe/qwen3next carry one gated shared expert without a count key.
        let n_expert_shared = file
            .get_u64(&key("expert_shared_count"))
            .map(|n| n as u32)
            .unwrap_or_else(|| {
                u32::from(
                    file.tensors
                        .iter()
                        .any(|t| TensorGroup::of(&t.name) == TensorGroup::SharedExperts),
                )
            });
        let n_nextn = file
            .get_u64(&key("nextn_predict_layers"))
            .unwrap_or(0)
            .min(u64::from(n_layer)) as u32;
        let trunk = n_layer - n_nextn;
        let expert_ff_length = per_layer(file, &key("expert_feed_forward_length"))
            .first()
            .copied();
        let n_vocab = file
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .or_else(|| {
                file.get("tokenizer.ggml.tokens")
                    .and_then(|v| v.as_array())
                    .map(|a| a.len() as u64)
            })
            .unwrap_or(0);

        let mut groups = GroupTotals::default();
        let mut total = 0u64;
        for t in &file.tensors {
            let g = group_in(&t.name, trunk);
            *groups.tensors.entry(g).or_default() += 1;
            match t.bytes {
                Some(b) => {
                    *groups.bytes.entry(g).or_default() += b;
                    total += b;
                }
                None => groups
                    .unknown_type_tensors
                    .push(format!("{} ({})", t.name, t.type_name())),
            }
        }

        let has_experts = file
            .tensors
            .iter()
            .any(|t| TensorGroup::of(&t.name) == TensorGroup::RoutedExperts);
        // A vocab-only file (the pinned source's `ggml-vocab-*.gguf`) keeps its model's
        // expert_count but has no layers: there is nothing to misread in it.
        let has_layers = file.tensors.iter().any(|t| t.name.starts_with("blk."));
        if has_layers
            && (n_expert > 0 || has_experts)
            && !SUPPORTED_MOE_ARCHS.contains(&arch.as_str())
        {
            return Err(invalid(format!(
                "arch {arch} is a mixture of experts spark does not support yet: its expert \
                 layout, gating and shared/dense layers are unknown to spark (supported: {})",
                SUPPORTED_MOE_ARCHS.join(", ")
            )));
        }
        let mut moe_layers = Vec::new();
        let mut dense_layers = Vec::new();
        let mut linear_attention_layers = Vec::new();
        let mut hash_routed_layers = Vec::new();
        for layer in 0..trunk {
            let prefix = format!("blk.{layer}.");
            if file.tensors.iter().any(|t| {
                t.name
                    .strip_prefix(&prefix)
                    .is_some_and(|p| p.starts_with("ssm_"))
            }) {
                linear_attention_layers.push(layer);
            }
            if file
                .tensor(&format!("{prefix}ffn_gate_tid2eid.weight"))
                .is_some()
            {
                hash_routed_layers.push(layer);
            }
        }
        if n_expert > 0 {
            for layer in 0..trunk {
                let prefix = format!("blk.{layer}.");
                let mut tensors = Vec::new();
                for t in file.tensors.iter().filter(|t| t.name.starts_with(&prefix)) {
                    let Some(role) = expert_role(&t.name[prefix.len()..]) else {
                        continue;
                    };
                    tensors.push(expert_tensor(file, t, role, n_expert).map_err(invalid)?);
                }
                if tensors.is_empty() {
                    if let Some(t) = file.tensors.iter().find(|t| {
                        t.name.starts_with(&prefix)
                            && TensorGroup::of(&t.name) == TensorGroup::RoutedExperts
                            && t.name.ends_with(".weight")
                    }) {
                        return Err(invalid(format!(
                            "arch {arch}: expert tensor {} has a layout spark does not know \
                             (it knows ffn_gate_exps, ffn_up_exps, ffn_down_exps, ffn_gate_up_exps)",
                            t.name
                        )));
                    }
                    dense_layers.push(layer);
                    continue;
                }
                tensors.sort_by_key(|t| role_rank(&t.role));
                let expert_bytes = tensors.iter().map(|t| t.slice_bytes).sum();
                moe_layers.push(LayerExperts {
                    layer,
                    tensors,
                    expert_bytes,
                });
            }
        }

        if has_layers && n_expert > 0 && moe_layers.is_empty() {
            return Err(invalid(format!(
                "arch {arch}: expert_count {n_expert} but no routed expert tensors \
                 (ffn_gate_exps, ffn_up_exps, ffn_down_exps or ffn_gate_up_exps) in any layer"
            )));
        }
        Ok(MoeGeometry {
            name: file.get_str("general.name").map(str::to_string),
            architecture: arch.clone(),
            n_layer,
            n_embd,
            n_vocab,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            context_length: file.get_u64(&key("context_length")),
            n_expert,
            n_expert_used,
            n_expert_shared,
            expert_ff_length,
            moe_layers,
            dense_layers,
            nextn_layers: (trunk..n_layer).collect(),
            linear_attention_layers,
            hash_routed_layers,
            groups,
            total_tensor_bytes: total,
            fingerprint: fingerprint(file),
        })
    }

    pub fn is_moe(&self) -> bool {
        !self.moe_layers.is_empty()
    }

    /// The group of a tensor of this model: [`TensorGroup::of`], except that every tensor of a
    /// NextN/MTP layer is [`TensorGroup::Nextn`] (not loaded, so not resident anywhere).
    pub fn group_of(&self, name: &str) -> TensorGroup {
        group_in(name, self.n_layer - self.nextn_layers.len() as u32)
    }

    /// KV-cache bytes per token of context for the given K and V cache types, summed over the
    /// layers (a per-layer `head_count_kv` array is honoured).
    pub fn kv_bytes_per_token(&self, k_type: GgmlType, v_type: GgmlType) -> u64 {
        (0..self.n_layer as usize)
            .map(|l| {
                let kv = *self
                    .n_head_kv
                    .get(l)
                    .or(self.n_head_kv.last())
                    .unwrap_or(&0);
                let k = (kv * self.head_dim_k) as f64 * k_type.bytes_per_elem();
                let v = (kv * self.head_dim_v) as f64 * v_type.bytes_per_elem();
                (k + v).ceil() as u64
            })
            .sum()
    }

    /// Bytes of all routed experts.
    pub fn routed_expert_bytes(&self) -> u64 {
        self.moe_layers
            .iter()
            .map(|l| l.expert_bytes * u64::from(self.n_expert))
            .sum()
    }
}

/// The group of a tensor in a model whose trunk has `trunk` layers (later ones are NextN).
fn group_in(name: &str, trunk: u32) -> TensorGroup {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<u32>().ok());
    match layer {
        Some(l) if l >= trunk => TensorGroup::Nextn,
        _ => TensorGroup::of(name),
    }
}

/// A scalar or per-layer array value as a list.
fn per_layer(file: &GgufFile, key: &str) -> Vec<u64> {
    match file.get(key) {
        Some(v) => match v.as_array() {
            Some(items) => items.iter().filter_map(|i| i.as_u64()).collect(),
            None => v.as_u64().into_iter().collect(),
        },
        None => Vec::new(),
    }
}

fn expert_role(part: &str) -> Option<&'static str> {
    let stem = part.strip_suffix(".weight")?;
    Some(match stem {
        "ffn_gate_exps" => "gate",
        "ffn_up_exps" => "up",
        "ffn_down_exps" => "down",
        "ffn_gate_up_exps" => "gate_up",
        _ => return None,
    })
}

fn role_rank(role: &str) -> u8 {
    match role {
        "gate" => 0,
        "up" => 1,
        "gate_up" => 2,
        _ => 3,
    }
}

fn expert_tensor(
    file: &GgufFile,
    t: &TensorInfo,
    role: &str,
    n_expert: u32,
) -> Result<ExpertTensor, String> {
    let bytes = t.bytes.ok_or_else(|| {
        format!(
            "expert tensor {} has unknown type {}",
            t.name,
            t.type_name()
        )
    })?;
    if t.dims.len() != 3 || t.dims[2] != u64::from(n_expert) {
        return Err(format!(
            "expert tensor {} has dimensions {:?}, expected [.., .., {n_expert}]",
            t.name, t.dims
        ));
    }
    Ok(ExpertTensor {
        name: t.name.clone(),
        role: role.to_string(),
        ggml_type: t.type_name(),
        dims: t.dims.clone(),
        file_offset: file.data_offset + t.offset,
        slice_bytes: bytes / u64::from(n_expert),
    })
}

/// File size plus SHA-256 of the bytes before the data section (header, metadata, tensor table).
pub fn fingerprint(file: &GgufFile) -> Fingerprint {
    let head = &file.bytes()[..(file.data_offset as usize).min(file.bytes().len())];
    let digest = Sha256::digest(head);
    Fingerprint {
        file_size: file.file_size,
        header_sha256: digest.into(),
    }
}
