//! Placement for stock llama-server: from the model's geometry, the KV cache at the context
//! length and a VRAM budget, the `-ngl` / `--n-cpu-moe` / `-c` flags `spark serve` passes.
//!
//! Owns only the merge of the planner's answer ([`crate::plan::fit`]) with what the user typed
//! after `--`: a flag the user gave wins, and is reported. Never decides memory arithmetic
//! itself.

use serde::Serialize;

use crate::gguf::{GgmlType, GgufFile, MoeGeometry};
use crate::plan::fit::{self, FitOutcome, MemorySettings, ModelFacts, Placement, Usage, MIB};

/// Aliases of each flag spark may set; the first is what spark writes.
const FLAG_GROUPS: &[&[&str]] = &[
    &["-ngl", "--gpu-layers", "--n-gpu-layers"],
    &[
        "--n-cpu-moe",
        "-ncmoe",
        "--cpu-moe",
        "-cmoe",
        "-ot",
        "--override-tensor",
    ],
    &["-c", "--ctx-size"],
];

/// What `spark serve` decided.
#[derive(Debug, Clone, Serialize)]
pub struct ServePlacement {
    pub placement: Placement,
    pub ctx: u64,
    pub budget_mib: Option<u64>,
    pub usage: Usage,
    /// Flags spark passes (before the user's own).
    pub flags: Vec<String>,
    /// Flags spark would have set that the user's arguments replace.
    pub user_overrides: Vec<String>,
    /// VRAM kept out of the budget for the residency provider's slots (`--residency`), MiB.
    pub residency_mib: Option<u64>,
}

/// The model layers whose routed experts `placement` leaves in host memory: the only layers
/// where the scheduler's MoE-offload copy, and so the residency hook, runs.
pub fn host_expert_layers(placement: Placement, moe_layers: &[u32]) -> Vec<u32> {
    let layers = moe_layers.iter().copied();
    match placement {
        Placement::AllGpu => Vec::new(),
        Placement::CpuOnly => layers.collect(),
        Placement::CpuMoe { n } => layers.filter(|&l| l < n).collect(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("place {model} in a VRAM budget of {budget}: {reason}; what would help: {help}")]
pub struct Refused {
    pub model: String,
    pub budget: String,
    pub reason: String,
    pub help: String,
}

/// The context length the user asked llama-server for, if any.
fn user_ctx(args: &[String]) -> Option<u64> {
    args.windows(2)
        .find(|w| w[0] == "-c" || w[0] == "--ctx-size")
        .and_then(|w| w[1].parse().ok())
}

/// Chooses the placement and the flags. `ram_total` bounds what host memory can hold.
pub fn choose(
    file: &GgufFile,
    geometry: &MoeGeometry,
    budget_mib: Option<u64>,
    default_ctx: u64,
    user_args: &[String],
    ram_total: u64,
) -> Result<ServePlacement, Refused> {
    let ctx = user_ctx(user_args).unwrap_or(default_ctx);
    let facts = ModelFacts::of(file, geometry.clone());
    let settings = MemorySettings {
        ctx,
        k_type: GgmlType::F16,
        v_type: GgmlType::F16,
        ubatch: 512,
        reserve_bytes: 256 * MIB,
    };
    let budget = budget_mib.map(|b| b.saturating_mul(MIB));
    let (placement, usage) = match fit::fit(&facts, &settings, budget, ram_total) {
        FitOutcome::Fits {
            placement, usage, ..
        } => (placement, usage),
        FitOutcome::Refused(r) => {
            return Err(Refused {
                model: file.path.display().to_string(),
                budget: budget_mib
                    .map(|b| format!("{b} MiB"))
                    .unwrap_or_else(|| "none".into()),
                reason: r.reason,
                help: r.suggestions.join("; "),
            })
        }
    };
    let (ngl, n_cpu_moe) = fit::gpu_layers(&facts, placement);
    let mut wanted: Vec<Vec<String>> = vec![vec!["-ngl".into(), ngl.to_string()]];
    if matches!(placement, Placement::CpuMoe { .. }) {
        wanted.push(vec!["--n-cpu-moe".into(), n_cpu_moe.to_string()]);
    }
    wanted.push(vec!["-c".into(), ctx.to_string()]);
    let mut flags = Vec::new();
    let mut user_overrides = Vec::new();
    for w in wanted {
        let group = FLAG_GROUPS
            .iter()
            .find(|g| g.contains(&w[0].as_str()))
            .expect("every flag has a group");
        if user_args.iter().any(|a| group.contains(&a.as_str())) {
            user_overrides.push(w.join(" "));
        } else {
            flags.extend(w);
        }
    }
    Ok(ServePlacement {
        placement,
        ctx,
        budget_mib,
        usage,
        flags,
        user_overrides,
        residency_mib: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, Value};

    fn model(dir: &std::path::Path) -> GgufFile {
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("qwen3moe".into()));
        for (k, v) in [
            ("block_count", 2u32),
            ("embedding_length", 64),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
            ("expert_count", 4),
            ("expert_used_count", 2),
            ("expert_feed_forward_length", 64),
        ] {
            w.set(&format!("qwen3moe.{k}"), Value::U32(v));
        }
        w.add_tensor(
            "token_embd.weight",
            &[64, 100],
            GgmlType::F32,
            vec![0; 64 * 100 * 4],
        );
        for l in 0..2 {
            for t in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
                w.add_tensor(
                    &format!("blk.{l}.{t}.weight"),
                    &[64, 64, 4],
                    GgmlType::F32,
                    vec![0; 64 * 64 * 4 * 4],
                );
            }
        }
        let p = dir.join("m.gguf");
        w.write(&p).unwrap();
        GgufFile::open(&p).unwrap()
    }

    #[test]
    fn without_a_budget_everything_stays_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let f = model(dir.path());
        let g = MoeGeometry::of(&f).unwrap();
        let p = choose(&f, &g, None, 2048, &[], 1 << 34).unwrap();
        assert_eq!(p.placement, Placement::CpuOnly);
        assert_eq!(p.flags, ["-ngl", "0", "-c", "2048"]);
        assert!(p.user_overrides.is_empty());
    }

    #[test]
    fn user_flags_win_and_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = model(dir.path());
        let g = MoeGeometry::of(&f).unwrap();
        let args: Vec<String> = ["--ctx-size", "512", "--gpu-layers", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = choose(&f, &g, Some(4096), 2048, &args, 1 << 34).unwrap();
        assert_eq!(p.placement, Placement::AllGpu);
        assert_eq!(p.ctx, 512, "the user's context sizes the KV cache");
        assert!(p.flags.is_empty(), "{:?}", p.flags);
        assert_eq!(p.user_overrides, ["-ngl 99", "-c 512"]);
    }

    #[test]
    fn a_budget_below_the_always_resident_part_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = model(dir.path());
        let g = MoeGeometry::of(&f).unwrap();
        let e = choose(&f, &g, Some(1), 2048, &[], 1 << 34).unwrap_err();
        assert!(e.to_string().contains("VRAM budget of 1 MiB"), "{e}");
    }
}
