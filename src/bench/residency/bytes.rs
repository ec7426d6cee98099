//! `spark bench residency --bytes`: host→device bytes per decoded token of (c), metered at the
//! hook, and of (d) at several slot counts, next to the hit ratio spark's `lru` shadow cache
//! predicts from the routing the same run captured.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::gguf::MoeGeometry;
use crate::plan::llama_bench::run_llama_bench_with;
use crate::telemetry::{Provider, TapEnv};
use spark_proto::hook::SlotCounts;

use super::engines::{decode_spec, Runner};
use super::report::{residency_from_stderr, BytesReport, BytesRow};
use super::{BenchResidencyArgs, BenchResidencyError, Config};

/// The default `--bytes` slot counts: a quarter, a half and three quarters of the experts,
/// rounded up, at least 1, distinct.
pub fn default_bytes_slots(n_expert: u32) -> Vec<u32> {
    let mut v: Vec<u32> = [1u32, 2, 3]
        .iter()
        .map(|q| (n_expert * q).div_ceil(4).clamp(1, n_expert.max(1)))
        .collect();
    v.dedup();
    v
}

/// The hit ratio spark's `lru` shadow cache predicts for `records` (one run's routing, in ring
/// order) with `slots[l]` in layer `l`: each layer's records in order are that layer's steps,
/// ids ascending within a step as the provider serves them.
pub fn predict_hit_ratio(
    records: &[spark_proto::trace::RoutingRecord],
    n_layer: usize,
    n_expert: usize,
    slots: &[u32],
) -> Option<f64> {
    use crate::cache::Policy;
    let mut per: Vec<u32> = slots.iter().copied().take(n_layer).collect();
    per.resize(n_layer, 0);
    let mut lru = crate::cache::Lru::new(n_expert, &per);
    let (mut used, mut misses) = (0u64, 0u64);
    let mut ids: Vec<u16> = Vec::new();
    for r in records {
        let layer = usize::from(r.layer);
        if layer >= n_layer {
            continue;
        }
        ids.clear();
        ids.extend(
            r.used_ids()
                .iter()
                .copied()
                .filter(|&e| usize::from(e) < n_expert),
        );
        ids.sort_unstable();
        ids.dedup();
        used += ids.len() as u64;
        misses += u64::from(lru.access(layer, &ids));
    }
    (used > 0).then(|| (used - misses) as f64 / used as f64)
}

/// The `--bytes` runs: the hooked llama-bench decoding `--tokens` tokens once per row, every
/// layer's experts on the host and decode offloaded, the tap preloaded with a routing ring;
/// (c) with the provider as a meter (the stock copy runs and is counted), (d) with the
/// provider at each slot count. The routing each run captured is replayed through spark's
/// `lru` shadow cache with the same slots, for the predicted hit ratio.
pub(super) fn measure_bytes(
    a: &BenchResidencyArgs,
    g: &MoeGeometry,
    hooked: &Runner,
    tap: &Path,
    threads: u32,
) -> Result<BytesReport, BenchResidencyError> {
    let slot_counts = if a.bytes_slots.is_empty() {
        default_bytes_slots(g.n_expert)
    } else {
        a.bytes_slots.clone()
    };
    let decoded = a.tokens + 1; // one repetition plus llama-bench's one-token warmup
    let per_layer = a
        .bytes_layer_slots
        .iter()
        .filter_map(|spec| SlotCounts::parse(spec).ok());
    let runs: Vec<(Config, Option<SlotCounts>)> = std::iter::once((Config::HostCopy, None))
        .chain(
            slot_counts
                .iter()
                .map(|&s| (Config::Spark, Some(SlotCounts::Uniform(s)))),
        )
        .chain(per_layer.map(|c| (Config::Spark, Some(c))))
        .collect();
    let mut rows = Vec::new();
    let mut device = String::new();
    let steps =
        crate::progress::Steps::new("bench residency --bytes", runs.len() as u64, "runs", false);
    for (i, (c, counts)) in runs.iter().enumerate() {
        let c = *c;
        // Each layer's count, and the one count of a uniform row.
        let layer_slots: Option<Vec<u32>> = counts
            .as_ref()
            .map(|k| (0..g.n_layer).map(|l| k.of_layer(l)).collect());
        let slots = counts.as_ref().map(SlotCounts::max);
        let list = match counts {
            Some(SlotCounts::PerLayer(_)) => counts.as_ref().map(SlotCounts::to_env),
            _ => None,
        };
        let what = format!(
            "({}) {}{}",
            c.letter(),
            c.name(),
            match (&list, slots) {
                (Some(sp), _) => format!(", slots {sp}"),
                (None, Some(s)) => format!(", {s} slots"),
                (None, None) => String::new(),
            }
        );
        steps.at(
            i as u64,
            || format!("measuring {what}"),
            || format!("measuring bytes: {what} [{}/{}]", i + 1, runs.len()),
        );
        // One token's records per expert layer, plus room: the ring never overruns here.
        let capacity = (decoded * g.moe_layers.len() as u64 + 1024).next_power_of_two();
        let mut ring = crate::ring::ShmRing::create(capacity, crate::telemetry::ring_geometry(g))?;
        let spec = decode_spec(a, threads, g.n_layer, 1);
        let tap_env = TapEnv {
            offload_min_batch: true,
            tap: Some(tap.to_path_buf()),
            ring_fd: Some(ring.fd()),
            provider: Some(match counts {
                Some(k) => Provider::Slots(k.clone()),
                None => Provider::Meter,
            }),
            ..TapEnv::default()
        };
        let configure = |cmd: &mut Command| tap_env.apply(cmd);
        let result = run_llama_bench_with(
            &hooked.bench,
            &spec,
            Duration::from_secs(a.timeout),
            configure,
        );
        let (bench_rows, out) = result.map_err(|source| BenchResidencyError::Measure {
            letter: c.letter(),
            config: c.name(),
            source,
        })?;
        if device.is_empty() {
            if let Some(r) = bench_rows.iter().find(|r| r.is_decode()) {
                device = if r.gpu_info.trim().is_empty() {
                    r.backends.clone()
                } else {
                    format!("{} ({})", r.gpu_info, r.backends)
                };
            }
        }
        let mut records = Vec::new();
        while ring.drain_into(&mut records, 1 << 16) > 0 {}
        let residency = residency_from_stderr(&out.stderr, decoded);
        let mut note = residency.note.clone();
        let predicted = match slots {
            Some(_) if ring.dropped() > 0 => {
                note = Some(format!("the ring dropped {} records", ring.dropped()));
                None
            }
            Some(_) if records.is_empty() => {
                note = Some("the tap captured no routing".into());
                None
            }
            Some(_) => layer_slots.as_ref().and_then(|per| {
                predict_hit_ratio(&records, g.n_layer as usize, g.n_expert as usize, per)
            }),
            None => None,
        };
        let forecast_bytes_host = (ring.dropped() == 0 && !records.is_empty()).then(|| {
            use crate::plan::residency::{tensor_bytes_of, Replayer};
            let tb = tensor_bytes_of(g);
            let mut rp = Replayer::per_layer(
                g.n_expert as usize,
                g.n_expert_used as usize,
                &tb,
                layer_slots.as_deref().unwrap_or(&[]),
            );
            for r in &records {
                rp.access(usize::from(r.layer), r.used_ids(), true);
            }
            rp.total().link_bytes
        });
        let link_ms_per_token = residency
            .host_bytes_per_token
            .map(|b| b / (a.link_gbps * 1e9) * 1e3);
        rows.push(BytesRow {
            config: c,
            slots,
            slots_per_layer: list,
            decoded,
            residency,
            predicted_hit_ratio: predicted,
            ring_records: records.len() as u64,
            note,
            link_ms_per_token,
            forecast_bytes_host,
        });
    }
    let lower = device.to_ascii_lowercase();
    Ok(BytesReport {
        link_gbps: a.link_gbps,
        cpu_device: lower.contains("llvmpipe") || lower.contains("lavapipe"),
        device,
        rows,
    })
}
