//! What `spark serve` puts where in memory: the layer placement for llama-server (from the
//! model's geometry, the KV cache at the context length and a VRAM budget, the `-ngl` /
//! `--n-cpu-moe` / `-c` flags) and, with `--residency`, the sizing of the provider's expert
//! slots, whose VRAM comes out of the same budget.
//!
//! Owns the merge of the planner's answer ([`crate::plan::fit`]) with what the user typed
//! after `--` (a flag the user gave wins, and is reported), the slot count of the shadow and
//! VRAM caches, and the VRAM kept for the slots. Never decides memory arithmetic of the model
//! itself (the planner does) and never starts anything.

use std::path::Path;

use serde::Serialize;
use spark_proto::hook::{SlotCounts, ENV_OFFLOAD_MIN_BATCH};

use crate::cache::PolicyKind;
use crate::gguf::{GgufFile, MoeGeometry};
use crate::plan::fit::{self, FitOutcome, MemorySettings, ModelFacts, Placement, Usage};
use crate::telemetry::{Provider, TapEnv};
use crate::units::MIB;

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
    /// `--residency`: whether it pays here and why (`spark plan --residency`'s decision).
    pub residency_decision: Option<crate::plan::residency::ServeDecision>,
    /// What llama-server runs when the user's own placement flags after `--` replace spark's
    /// (`None` when they do not): the host RAM check counts this placement's host bytes.
    pub effective: Option<Effective>,
}

/// The placement llama-server runs with the user's own `-ngl` / `--n-cpu-moe` / `--cpu-moe` /
/// `-ot` in place of spark's.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Effective {
    pub placement: Placement,
    /// Bytes of weights (and, with every layer on the CPU, KV and compute buffers) in host
    /// memory under it.
    pub host_bytes: u64,
    /// How it was read from the flags.
    pub note: String,
}

/// The value of the last occurrence of any of `names` (`NAME V` or `NAME=V`) in `args`.
fn last_value<'a>(args: &'a [String], names: &[&str]) -> Option<&'a str> {
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if names.contains(&a.as_str()) {
            found = it.next().map(String::as_str);
        } else if let Some((k, v)) = a.split_once('=') {
            if names.contains(&k) {
                found = Some(v);
            }
        }
    }
    found
}

/// The placement of `spark`'s choice with the user's own flags in `user_args` in its place, when
/// any replaces it. Where the flags cannot be read exactly — a partial `-ngl` (dense layers on
/// the CPU too) or `-ot` patterns — the host part is counted at its upper bound (every weight,
/// or every routed expert, in host memory), so the RAM check never pins more than fits.
pub fn effective_placement(
    m: &ModelFacts,
    spark: Placement,
    user_args: &[String],
) -> Option<(Placement, String)> {
    let ngl = last_value(user_args, FLAG_GROUPS[0]);
    let ncmoe = last_value(user_args, &["--n-cpu-moe", "-ncmoe"]);
    let all_moe = user_args.iter().any(|a| a == "--cpu-moe" || a == "-cmoe");
    let ot = last_value(user_args, &["-ot", "--override-tensor"]);
    if ngl.is_none() && ncmoe.is_none() && !all_moe && ot.is_none() {
        return None;
    }
    let all_layers = m.n_layer + 1;
    match ngl.map(|v| v.parse::<i64>()) {
        Some(Ok(0)) => return Some((Placement::CpuOnly, "your -ngl 0: every layer on the CPU".into())),
        Some(Ok(n)) if n > 0 && n < i64::from(all_layers) => {
            return Some((
                Placement::CpuOnly,
                format!("your -ngl {n} leaves layers on the CPU: every weight counted as host memory (an upper bound)"),
            ))
        }
        _ => {}
    }
    let spark_n = match spark {
        Placement::CpuMoe { n } => n,
        Placement::AllGpu | Placement::CpuOnly => 0,
    };
    let (n, how) = if all_moe {
        (
            u32::MAX,
            "your --cpu-moe: every routed expert in host memory".to_string(),
        )
    } else if let Some(p) = ot {
        (
            u32::MAX,
            format!("your -ot {p}: every routed expert counted as host memory (an upper bound)"),
        )
    } else if let Some(v) = ncmoe {
        match v.parse::<u32>() {
            Ok(n) => (n, format!("your --n-cpu-moe {n}")),
            Err(_) => (u32::MAX, format!("your --n-cpu-moe {v} (not a number: every routed expert counted as host memory)")),
        }
    } else {
        (
            spark_n,
            format!(
                "your -ngl {} with spark's --n-cpu-moe {spark_n}",
                ngl.unwrap_or("")
            ),
        )
    };
    let p = match n {
        0 => Placement::AllGpu,
        n => Placement::CpuMoe { n },
    };
    Some((p, how))
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
pub(crate) fn user_ctx(args: &[String]) -> Option<u64> {
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
    choose_as(
        file,
        geometry,
        budget_mib,
        default_ctx,
        user_args,
        ram_total,
        None,
    )
}

/// [`choose`], or with `decided` the placement `--residency`'s decision chose, checked against
/// the budget and RAM with the same accounting (refused when it does not fit).
fn choose_as(
    file: &GgufFile,
    geometry: &MoeGeometry,
    budget_mib: Option<u64>,
    default_ctx: u64,
    user_args: &[String],
    ram_total: u64,
    decided: Option<Placement>,
) -> Result<ServePlacement, Refused> {
    let ctx = user_ctx(user_args).unwrap_or(default_ctx);
    let facts = ModelFacts::of(file, geometry.clone());
    let settings = MemorySettings::serve(ctx);
    let budget = budget_mib.map(|b| b.saturating_mul(MIB));
    let refused = |reason: String, help: String| Refused {
        model: file.path.display().to_string(),
        budget: budget_mib
            .map(|b| format!("{b} MiB"))
            .unwrap_or_else(|| "none".into()),
        reason,
        help,
    };
    let (placement, usage) = match decided {
        Some(p) => {
            let usage = fit::usage(&facts, &settings, p);
            if budget.is_some_and(|b| usage.vram_bytes > b) || usage.host_bytes > ram_total {
                return Err(refused(
                    format!(
                        "{p:?} needs {} MiB of VRAM and {} MiB of RAM",
                        usage.vram_bytes.div_ceil(MIB),
                        usage.host_bytes.div_ceil(MIB)
                    ),
                    "place by fit".into(),
                ));
            }
            (p, usage)
        }
        None => match fit::fit(&facts, &settings, budget, ram_total) {
            FitOutcome::Fits {
                placement, usage, ..
            } => (placement, usage),
            FitOutcome::Refused(r) => return Err(refused(r.reason, r.suggestions.join("; "))),
        },
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
    let effective = effective_placement(&facts, placement, user_args).map(|(p, note)| Effective {
        placement: p,
        host_bytes: fit::usage(&facts, &settings, p).host_bytes,
        note,
    });
    Ok(ServePlacement {
        placement,
        ctx,
        budget_mib,
        usage,
        flags,
        user_overrides,
        residency_mib: None,
        residency_decision: None,
        effective,
    })
}

/// `--residency` cannot be sized as asked (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SlotsRefused(pub String);

/// The placement `spark serve` runs with: [`choose`] under the VRAM budget, with the slots'
/// VRAM kept out of it when `residency` is given. `decided_n_cpu_moe`: the `--n-cpu-moe` of the
/// split `--residency`'s decision chose; serve runs exactly that split when it fits its own
/// accounting (it does by construction: the forecast counts the same bytes and more), else
/// places by fit and says why.
pub fn place(
    file: &GgufFile,
    geometry: &MoeGeometry,
    budget_mib: Option<u64>,
    default_ctx: u64,
    user_args: &[String],
    residency: Option<&ResidencySetup>,
    decided_n_cpu_moe: Option<u32>,
) -> Result<ServePlacement, Refused> {
    let ram_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| crate::plan::hardware::parse_meminfo(&t))
        .map(|(total, _)| total)
        .unwrap_or(u64::MAX);
    let choose_as = |reserve_mib: u64, decided: Option<Placement>| {
        choose_as(
            file,
            geometry,
            budget_mib.map(|b| b.saturating_sub(reserve_mib)),
            default_ctx,
            user_args,
            ram_total,
            decided,
        )
    };
    let choose = |reserve_mib: u64| choose_as(reserve_mib, None);
    Ok(match residency {
        None => choose(0)?,
        Some(r) => {
            let moe_layers: Vec<u32> = geometry.moe_layers.iter().map(|l| l.layer).collect();
            if let Some(n) = decided_n_cpu_moe {
                let decided = match n {
                    0 => Placement::AllGpu,
                    n => Placement::CpuMoe { n },
                };
                let host = host_expert_layers(decided, &moe_layers);
                let mib = r.mib(&host);
                match choose_as(mib, Some(decided)) {
                    Ok(mut p) => {
                        tracing::info!(
                            "residency: the decision's split: --n-cpu-moe {n}, {} in {} host-resident expert layers, {mib} MiB of VRAM kept for them",
                            r.describe(),
                            host.len()
                        );
                        p.residency_mib = Some(mib);
                        p.budget_mib = budget_mib;
                        return Ok(p);
                    }
                    Err(e) => tracing::warn!(
                        "residency: the decision's split (--n-cpu-moe {n}) does not fit serve's placement ({}); placing by fit instead",
                        e.reason
                    ),
                }
            }
            let mut p = place_with_slots(r, &moe_layers, choose)?;
            p.budget_mib = budget_mib;
            p
        }
    })
}

/// Slots per MoE layer of the shadow cache, and of the VRAM cache with `--residency`: the
/// user's `--cache-slots` as given (more than the model's experts per layer is refused), else
/// 2 × experts per token, at most the experts there are.
pub fn shadow_slots(cache_slots: Option<u32>, geometry: &MoeGeometry) -> Result<u32, SlotsRefused> {
    match cache_slots {
        Some(s) if s == 0 || (geometry.is_moe() && s > geometry.n_expert) => {
            Err(SlotsRefused(format!(
                "parse --cache-slots {s}: must be between 1 and the model's {} experts per layer",
                geometry.n_expert
            )))
        }
        Some(s) => Ok(s),
        None => Ok((2 * geometry.n_expert_used).min(geometry.n_expert).max(1)),
    }
}

/// What `--residency` adds to a serve run.
pub struct ResidencySetup {
    /// Slots of each expert layer: one count (`--cache-slots`, the default, or the decision's
    /// uniform split) or the decision's per-layer split.
    pub slots: SlotCounts,
    /// Bytes of one slot in each MoE layer (every expert tensor's slice plus the padding
    /// stock copies after it).
    pub slot_bytes: Vec<(u32, u64)>,
    /// For llama-server: the provider's slot count and the scheduler setting that sends
    /// decode's expert matrix products to the GPU (so the hook sees them).
    pub env: Vec<(String, String)>,
}

impl ResidencySetup {
    /// VRAM the slots of `layers` take, MiB.
    fn mib(&self, layers: &[u32]) -> u64 {
        let bytes: u64 = self
            .slot_bytes
            .iter()
            .filter(|(l, _)| layers.contains(l))
            .map(|(l, b)| b * u64::from(self.slots.of_layer(*l)))
            .sum();
        bytes.div_ceil(1 << 20)
    }

    /// The slots in words, for the start lines.
    fn describe(&self) -> String {
        match &self.slots {
            SlotCounts::Uniform(n) => format!("{n} slots per expert layer"),
            SlotCounts::PerLayer(v) => format!(
                "slots per expert layer {} (per-layer)",
                SlotCounts::PerLayer(v.clone()).to_env()
            ),
        }
    }
}

/// Places the model with VRAM kept for the slots. First with slots for every MoE layer (the
/// most the provider could allocate), then, since the provider only allocates for layers
/// whose experts stay in host memory, with slots for those layers only; more budget never
/// moves more layers to the host, so the second placement needs at most what it reserves
/// (checked, else the first stands).
fn place_with_slots(
    r: &ResidencySetup,
    moe_layers: &[u32],
    choose: impl Fn(u64) -> Result<ServePlacement, Refused>,
) -> Result<ServePlacement, Refused> {
    let host_of = |p: &ServePlacement| host_expert_layers(p.placement, moe_layers);
    let first_mib = r.mib(moe_layers);
    let first = choose(first_mib)?;
    let needed = r.mib(&host_of(&first));
    let (mut p, reserved) = if needed < first_mib {
        match choose(needed) {
            Ok(second) if r.mib(&host_of(&second)) <= needed => (second, needed),
            _ => (first, first_mib),
        }
    } else {
        (first, first_mib)
    };
    let host = host_of(&p);
    if host.is_empty() {
        tracing::info!("residency: every expert fits in VRAM at this budget; the provider has nothing to serve");
    } else {
        tracing::info!(
            "residency: {} in {} host-resident expert layers, {} MiB of VRAM kept for them",
            r.describe(),
            host.len(),
            r.mib(&host)
        );
    }
    p.residency_mib = Some(reserved);
    Ok(p)
}

/// Sizes `--residency`'s slots: `slots` in each MoE layer of `model`, their VRAM out of
/// `vram_budget_mib`, and the child's environment for the provider.
pub fn residency_setup(
    model: &Path,
    geometry: &MoeGeometry,
    vram_budget_mib: Option<u64>,
    slots: SlotCounts,
    policy: PolicyKind,
) -> Result<ResidencySetup, SlotsRefused> {
    if !geometry.is_moe() {
        return Err(SlotsRefused(format!(
            "--residency: {} has no MoE layers",
            model.display()
        )));
    }
    let Some(budget) = vram_budget_mib else {
        return Err(SlotsRefused(
            "--residency needs --vram-budget: the slots and the placement share it".into(),
        ));
    };
    let slot_bytes = geometry
        .moe_layers
        .iter()
        .map(|l| {
            let b = l
                .tensors
                .iter()
                .map(|t| t.slice_bytes + t.slice_bytes.min(512))
                .sum::<u64>();
            (l.layer, b)
        })
        .collect();
    // The scheduler setting is the user's when they set it.
    let env = TapEnv {
        offload_min_batch: std::env::var_os(ENV_OFFLOAD_MIN_BATCH).is_none(),
        provider: Some(Provider::Slots(slots.clone())),
        ..TapEnv::default()
    }
    .vars();
    let r = ResidencySetup {
        slots,
        slot_bytes,
        env,
    };
    let all: Vec<u32> = geometry.moe_layers.iter().map(|l| l.layer).collect();
    let slot_mib = r.mib(&all);
    if slot_mib >= budget {
        return Err(SlotsRefused(format!(
            "--residency: {} take {slot_mib} MiB, the whole --vram-budget of {budget} MiB; lower --cache-slots or raise the budget",
            r.describe()
        )));
    }
    tracing::info!(
        "residency: {} (at most {slot_mib} MiB of VRAM), policy {}",
        r.describe(),
        policy.name()
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgmlType, GgufWriter, Value};

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

    /// The host RAM check counts the placement llama-server runs: the user's own flags after
    /// `--` win over spark's, and flags that cannot be read exactly count the upper bound.
    #[test]
    fn the_users_own_placement_flags_set_the_host_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = model(dir.path());
        let g = MoeGeometry::of(&f).unwrap();
        let layer = 3 * 64 * 64 * 4 * 4u64; // one layer's routed experts, f32
        let run = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            choose(&f, &g, Some(4096), 2048, &args, 1 << 34).unwrap()
        };
        let spark = run(&[]);
        assert_eq!(spark.placement, Placement::AllGpu);
        assert!(
            spark.effective.is_none(),
            "no flags of the user's: spark's placement"
        );
        let host0 = spark.usage.host_bytes;
        let cases: [(&[&str], Placement, u64); 6] = [
            (
                &["--n-cpu-moe", "1"],
                Placement::CpuMoe { n: 1 },
                host0 + layer,
            ),
            (
                &["--n-cpu-moe=2"],
                Placement::CpuMoe { n: 2 },
                host0 + 2 * layer,
            ),
            (&["-ncmoe", "2", "-ncmoe", "0"], Placement::AllGpu, host0),
            (
                &["--cpu-moe"],
                Placement::CpuMoe { n: u32::MAX },
                host0 + 2 * layer,
            ),
            (
                &["-ot", "exps=CPU"],
                Placement::CpuMoe { n: u32::MAX },
                host0 + 2 * layer,
            ),
            (&["-ngl", "99"], Placement::AllGpu, host0),
        ];
        for (args, want, host) in cases {
            let p = run(args);
            let e = p
                .effective
                .unwrap_or_else(|| panic!("{args:?}: no effective placement"));
            assert_eq!(
                (e.placement, e.host_bytes),
                (want, host),
                "{args:?}: {}",
                e.note
            );
            assert_eq!(p.usage.host_bytes, host0, "spark's own usage is unchanged");
        }
        // Every layer on the CPU, or only some (an upper bound: every weight in host memory).
        for args in [&["-ngl", "0"][..], &["--n-gpu-layers", "1"][..]] {
            let e = run(args).effective.unwrap();
            assert_eq!(e.placement, Placement::CpuOnly, "{args:?}");
            assert!(
                e.host_bytes > host0 + 2 * layer,
                "{args:?}: {}",
                e.host_bytes
            );
        }
        assert!(run(&["-ot", "exps=CPU"])
            .effective
            .unwrap()
            .note
            .contains("upper bound"));
    }

    #[test]
    fn a_budget_below_the_always_resident_part_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = model(dir.path());
        let g = MoeGeometry::of(&f).unwrap();
        let e = choose(&f, &g, Some(1), 2048, &[], 1 << 34).unwrap_err();
        assert!(e.to_string().contains("VRAM budget of 1 MiB"), "{e}");
    }

    fn placed(placement: Placement) -> ServePlacement {
        ServePlacement {
            placement,
            ctx: 4096,
            budget_mib: None,
            usage: Usage {
                vram_bytes: 0,
                host_bytes: 0,
            },
            flags: vec![],
            user_overrides: vec![],
            residency_mib: None,
            residency_decision: None,
            effective: None,
        }
    }

    fn setup() -> ResidencySetup {
        ResidencySetup {
            slots: SlotCounts::Uniform(4),
            // 8 MoE layers of 1 MiB per slot: 4 MiB per layer for 4 slots
            slot_bytes: (0..8).map(|l| (l, 1 << 20)).collect(),
            env: vec![],
        }
    }

    #[test]
    fn serve_runs_the_split_the_residency_decision_chose_when_it_fits() {
        let dir = tempfile::tempdir().unwrap();
        let f = model(dir.path());
        let g = MoeGeometry::of(&f).unwrap();
        let r = ResidencySetup {
            slots: SlotCounts::Uniform(2),
            slot_bytes: vec![(0, 3 << 20), (1, 3 << 20)],
            env: vec![],
        };
        // A budget where everything fits on the GPU: fit alone would put no expert on the host,
        // but the decision chose layer 0's experts on the host with its slots; serve runs that.
        let p = place(&f, &g, Some(4096), 2048, &[], Some(&r), Some(1)).unwrap();
        assert_eq!(p.placement, Placement::CpuMoe { n: 1 });
        assert_eq!(p.residency_mib, Some(6), "2 slots of 3 MiB in layer 0 only");
        assert!(
            p.flags.windows(2).any(|w| w == ["--n-cpu-moe", "1"]),
            "{:?}",
            p.flags
        );
        assert_eq!(p.budget_mib, Some(4096));

        // A decided split that does not fit serve's accounting is refused, and serve then
        // places by fit, exactly as without a decision: never run over budget.
        let facts = ModelFacts::of(&f, g.clone());
        let all_gpu = fit::usage(&facts, &MemorySettings::serve(2048), Placement::AllGpu);
        let tight = all_gpu.vram_bytes / MIB - 1;
        let e = choose_as(
            &f,
            &g,
            Some(tight),
            2048,
            &[],
            1 << 34,
            Some(Placement::AllGpu),
        )
        .unwrap_err();
        assert!(e.reason.contains("MiB of VRAM"), "{e}");
        for budget in [tight, 4096] {
            let with = place(&f, &g, Some(budget), 2048, &[], Some(&r), Some(0));
            let without = place(&f, &g, Some(budget), 2048, &[], Some(&r), None);
            match (with, without) {
                (Ok(a), Ok(b)) if budget == tight => {
                    assert_eq!(
                        (a.placement, a.residency_mib),
                        (b.placement, b.residency_mib)
                    )
                }
                (Ok(a), Ok(_)) => assert_eq!(a.placement, Placement::AllGpu, "{budget} MiB"),
                (Err(a), Err(b)) => assert_eq!(a.reason, b.reason),
                (a, b) => panic!(
                    "{budget} MiB: {:?} vs {:?}",
                    a.map(|p| p.placement),
                    b.map(|p| p.placement)
                ),
            }
        }
    }

    #[test]
    fn per_layer_slots_keep_each_layers_own_count_of_vram() {
        let mut r = setup();
        // Layers 0..3 with 2, 6, 0 slots; unnamed layers have none.
        r.slots = SlotCounts::per_layer([(0, 2), (1, 6), (2, 0)]);
        assert_eq!(r.mib(&[0, 1, 2, 3]), 8);
        assert_eq!(r.mib(&[1]), 6);
        assert_eq!(r.mib(&[2, 3, 7]), 0);
        assert!(r.describe().contains("0:2,1:6,2:0"), "{}", r.describe());
    }

    #[test]
    fn slots_are_kept_only_for_the_layers_whose_experts_stay_on_the_host() {
        let layers: Vec<u32> = (0..8).collect();
        // A planner that moves one more layer's experts to the host per 10 MiB reserved.
        let choose = |reserve: u64| {
            Ok(placed(Placement::CpuMoe {
                n: 2 + (reserve / 10) as u32,
            }))
        };
        let p = place_with_slots(&setup(), &layers, choose).unwrap();
        // All 8 layers: 32 MiB → 5 host layers → 20 MiB → 4 host layers (16 MiB ≤ 20).
        assert_eq!(p.placement, Placement::CpuMoe { n: 4 });
        assert_eq!(p.residency_mib, Some(20));

        // Everything fits on the GPU once less is reserved: the slots of the one host layer
        // the first placement had stay reserved (conservative), and no layer needs them.
        let choose = |reserve: u64| {
            Ok(placed(if reserve >= 30 {
                Placement::CpuMoe { n: 1 }
            } else {
                Placement::AllGpu
            }))
        };
        let p = place_with_slots(&setup(), &layers, choose).unwrap();
        assert_eq!((p.placement, p.residency_mib), (Placement::AllGpu, Some(4)));
    }

    #[test]
    fn a_planner_that_moves_more_layers_with_more_budget_keeps_the_first_placement() {
        let layers: Vec<u32> = (0..8).collect();
        // Perverse planner: less reserved → more host layers; the second placement would need
        // more than it reserves, so the conservative first one stands.
        let choose = |reserve: u64| {
            Ok(placed(Placement::CpuMoe {
                n: 8 - (reserve / 8) as u32,
            }))
        };
        let p = place_with_slots(&setup(), &layers, choose).unwrap();
        assert_eq!(p.placement, Placement::CpuMoe { n: 4 });
        assert_eq!(p.residency_mib, Some(32));
    }
}
