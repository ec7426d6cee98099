//! `spark inspect`: what is in a GGUF file, as text for people and JSON for programs.
//!
//! Owns the rendering only; the facts come from [`crate::gguf`].

use std::fmt::Write as _;

use serde::Serialize;

use crate::gguf::{GgmlType, GgufFile, MoeGeometry, TensorGroup};
use crate::units::human;

/// Everything `spark inspect` reports.
#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub gguf_version: u32,
    pub file_size: u64,
    pub n_tensors: usize,
    pub n_metadata: usize,
    pub alignment: u64,
    pub data_offset: u64,
    pub fingerprint: String,
    pub geometry: MoeGeometry,
    /// Per MoE layer: bytes of one expert (all its tensors).
    pub expert_bytes_per_layer: Vec<u64>,
    pub kv_context: u64,
    pub kv_bytes_per_token_f16: u64,
    pub kv_bytes_at_context_f16: u64,
    pub tensor_types: std::collections::BTreeMap<String, u64>,
}

impl InspectReport {
    pub fn new(file: &GgufFile, geometry: MoeGeometry, ctx: Option<u64>) -> InspectReport {
        let kv_context = ctx.or(geometry.context_length).unwrap_or(4096);
        let per_tok = geometry.kv_bytes_per_token(GgmlType::F16, GgmlType::F16);
        let mut tensor_types = std::collections::BTreeMap::new();
        for t in &file.tensors {
            *tensor_types.entry(t.type_name()).or_insert(0) += 1;
        }
        InspectReport {
            path: file.path.display().to_string(),
            gguf_version: file.version,
            file_size: file.file_size,
            n_tensors: file.tensors.len(),
            n_metadata: file.metadata.len(),
            alignment: file.alignment,
            data_offset: file.data_offset,
            fingerprint: geometry.fingerprint.to_string(),
            expert_bytes_per_layer: geometry.moe_layers.iter().map(|l| l.expert_bytes).collect(),
            kv_context,
            kv_bytes_per_token_f16: per_tok,
            kv_bytes_at_context_f16: per_tok * kv_context,
            tensor_types,
            geometry,
        }
    }

    /// The readable summary.
    pub fn render(&self) -> String {
        let g = &self.geometry;
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.path);
        let _ = writeln!(
            s,
            "  architecture     {}{}",
            g.architecture,
            g.name
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "  file             {} (GGUF v{}, {} tensors, {} metadata keys, data at {})",
            human(self.file_size),
            self.gguf_version,
            self.n_tensors,
            self.n_metadata,
            self.data_offset
        );
        let _ = writeln!(s, "  fingerprint      {}", self.fingerprint);
        let _ = writeln!(
            s,
            "  layers           {} (embedding {}, vocab {}, heads {}/{} kv, head dim {})",
            g.n_layer,
            g.n_embd,
            g.n_vocab,
            g.n_head,
            g.n_head_kv.first().copied().unwrap_or(0),
            g.head_dim_k
        );
        if g.is_moe() {
            let _ = writeln!(
                s,
                "  experts          {} per layer, {} used per token, {} shared, expert FFN {}",
                g.n_expert,
                g.n_expert_used,
                g.n_expert_shared,
                g.expert_ff_length
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "?".into())
            );
            let _ = writeln!(
                s,
                "  MoE layers       {} of {}",
                g.moe_layers.len(),
                g.n_layer
            );
            if !g.dense_layers.is_empty() {
                let _ = writeln!(
                    s,
                    "  dense layers     {} (no experts, no routing; always resident)",
                    layer_list(&g.dense_layers)
                );
            }
            if !g.nextn_layers.is_empty() {
                let _ = writeln!(
                    s,
                    "  NextN layers     {} (multi-token prediction: not loaded by llama-server by default, never routed)",
                    layer_list(&g.nextn_layers)
                );
            }
            if !g.hash_routed_layers.is_empty() {
                let _ = writeln!(
                    s,
                    "  hash-routed      {} (experts from a fixed token table, not the router; placed and counted like routed layers)",
                    layer_list(&g.hash_routed_layers)
                );
            }
            if !g.linear_attention_layers.is_empty() {
                let _ = writeln!(
                    s,
                    "  linear attention {} (still routed)",
                    layer_list(&g.linear_attention_layers)
                );
            }
            if g.n_expert_shared > 0 {
                let shared = g.groups.bytes.get(&TensorGroup::SharedExperts).copied();
                let _ = writeln!(
                    s,
                    "  shared experts   {} per MoE layer, {} in all (always resident, not routed)",
                    g.n_expert_shared,
                    human(shared.unwrap_or(0))
                );
            }
            let sizes: std::collections::BTreeSet<u64> =
                self.expert_bytes_per_layer.iter().copied().collect();
            let sizes: Vec<String> = sizes.iter().map(|&b| human(b)).collect();
            let _ = writeln!(
                s,
                "  expert size      {} (all tensors of one expert)",
                sizes.join(", ")
            );
            if let Some(l) = g.moe_layers.first() {
                for t in &l.tensors {
                    let _ = writeln!(
                        s,
                        "    {:<28} {:>6} {:?}  slice {} at +{}",
                        t.name,
                        t.ggml_type,
                        t.dims,
                        human(t.slice_bytes),
                        t.file_offset
                    );
                }
            }
        } else {
            let _ = writeln!(s, "  experts          none: dense model (no MoE layers)");
        }
        let _ = writeln!(s, "  tensor bytes     {}", human(g.total_tensor_bytes));
        for grp in TensorGroup::ALL {
            if let Some(b) = g.groups.bytes.get(&grp) {
                let _ = writeln!(
                    s,
                    "    {:<16} {:>12}  ({} tensors)",
                    grp.name(),
                    human(*b),
                    g.groups.tensors.get(&grp).unwrap_or(&0)
                );
            }
        }
        for u in &g.groups.unknown_type_tensors {
            let _ = writeln!(s, "    unknown type: {u}");
        }
        let _ = writeln!(
            s,
            "  KV cache (f16)   {} per token, {} at context {}",
            human(self.kv_bytes_per_token_f16),
            human(self.kv_bytes_at_context_f16),
            self.kv_context
        );
        let types: Vec<String> = self
            .tensor_types
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect();
        let _ = writeln!(s, "  tensor types     {}", types.join(", "));
        s
    }
}

/// Layer indices, consecutive runs shown as ranges (`0-2, 5`), an evenly strided list by its
/// ends (`0, 2, …, 46 (24 layers, one in 2)`).
fn layer_list(layers: &[u32]) -> String {
    // Interleaved layers (llama4's every other layer dense): first, second, …, last.
    if layers.len() >= 4 {
        let step = layers[1] - layers[0];
        if step > 1 && layers.windows(2).all(|w| w[1] == w[0] + step) {
            return format!(
                "{}, {}, …, {} ({} layers, one in {step})",
                layers[0],
                layers[1],
                layers[layers.len() - 1],
                layers.len()
            );
        }
    }
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if j == i {
            layers[i].to_string()
        } else {
            format!("{}-{}", layers[i], layers[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::layer_list;

    #[test]
    fn layer_lists_show_runs_and_strides() {
        assert_eq!(layer_list(&[0, 1, 2, 5]), "0-2, 5");
        assert_eq!(layer_list(&[0, 2]), "0, 2");
        let every_other: Vec<u32> = (0..48).step_by(2).collect();
        assert_eq!(
            layer_list(&every_other),
            "0, 2, …, 46 (24 layers, one in 2)"
        );
    }
}
