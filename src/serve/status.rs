//! What `spark serve` says about itself: the `/spark/status` JSON and the `/spark/metrics`
//! Prometheus text, rendered from the shared [`ServeState`].
//!
//! Reads state only; never changes it and never blocks on the child (every number is an
//! atomic or a short lock of the live snapshot).

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::ServeState;

impl ServeState {
    pub fn status_json(&self) -> Value {
        let k = &self.keeper;
        let last_exit = k
            .last_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        json!({
            "model": self.model.display().to_string(),
            "fingerprint": self.geometry.fingerprint.to_string(),
            "architecture": self.geometry.architecture,
            "geometry": {"n_layer": self.geometry.n_layer, "n_expert": self.geometry.n_expert, "n_expert_used": self.geometry.n_expert_used, "moe_layers": self.geometry.moe_layers.len()},
            "engine": {"llama_server": self.engine.llama_server.display().to_string(), "variant": self.engine.variant(), "hooked": self.engine.is_hooked(), "version": crate::engine::ENGINE_VERSION},
            "listen": self.listen.to_string(),
            "placement": self.placement,
            "host_memory": self.host_memory.as_ref().map(|h| json!({
                "mode": h.host_memory,
                "reason": h.reason,
                "host_bytes": h.host_bytes,
            })),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "child": {"pid": k.pid.load(Ordering::Acquire), "port": k.port(), "ready": k.port().is_some(), "state": k.phase().name(), "unresponsive_since_unix_s": k.unresponsive_since().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()), "failed_probes": k.probe_failures.load(Ordering::Acquire), "restarts": k.restarts.load(Ordering::Acquire), "last_exit": last_exit},
            "connections": {"open": self.connections.open(), "max": self.connections.max, "rejected": self.connections.rejected.load(Ordering::Relaxed), "accept_errors": self.connections.accept_errors.load(Ordering::Relaxed), "header_timeout_s": self.connections.header_timeout.as_secs_f64()},
            "requests": self.stats.to_json(),
            "completed_requests": self.completed.load(Ordering::Acquire),
            "log": {"dropped_lines": crate::log::dropped()},
            "routing": self.live.as_ref().map(|l| l.shared.lock().unwrap_or_else(|e| e.into_inner()).to_json(&l.cfg)),
            "profile": self.live.as_ref().and_then(|l| l.cfg.profile_path.as_ref().map(|p| {
                let s = l.shared.lock().unwrap_or_else(|e| e.into_inner());
                json!({"path": p.display().to_string(), "at_start": l.profile_start, "writes": s.profile_writes, "last_write_us": s.profile_last_write_us, "error": s.profile_error})
            })),
        })
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        self.stats.prometheus(&mut out);
        use std::fmt::Write as _;
        let k = &self.keeper;
        let _ = writeln!(out, "# HELP spark_child_restarts_total Times llama-server was restarted.\n# TYPE spark_child_restarts_total counter\nspark_child_restarts_total {}", k.restarts.load(Ordering::Acquire));
        let _ = writeln!(out, "# HELP spark_log_dropped_lines_total Log lines dropped because stderr failed (closed or full).\n# TYPE spark_log_dropped_lines_total counter\nspark_log_dropped_lines_total {}", crate::log::dropped());
        let _ = writeln!(out, "# HELP spark_child_up Whether llama-server is ready.\n# TYPE spark_child_up gauge\nspark_child_up {}", u8::from(k.port().is_some()));
        let hook_abi = match self.engine.is_hooked() {
            true => spark_proto::hook::ABI.to_string(),
            false => "none".to_string(),
        };
        let _ = writeln!(out, "# HELP spark_build_info spark's version, the engine build it serves with, and the residency hook ABI that build carries.\n# TYPE spark_build_info gauge\nspark_build_info{{version=\"{}\",engine_version=\"{}\",engine_variant=\"{}\",hook_abi=\"{hook_abi}\"}} 1", env!("CARGO_PKG_VERSION"), crate::engine::ENGINE_VERSION, self.engine.variant());
        let c = &self.connections;
        let _ = writeln!(out, "# HELP spark_connections_open Client connections being served.\n# TYPE spark_connections_open gauge\nspark_connections_open {}", c.open());
        let _ = writeln!(out, "# HELP spark_connections_rejected_total Client connections answered 503 because --max-connections were open.\n# TYPE spark_connections_rejected_total counter\nspark_connections_rejected_total {}", c.rejected.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP spark_accept_errors_total Failed accepts of client connections (EMFILE and the like).\n# TYPE spark_accept_errors_total counter\nspark_accept_errors_total {}", c.accept_errors.load(Ordering::Relaxed));
        if let Some(l) = &self.live {
            let s = l.shared.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "# HELP spark_ring_dropped_total Routing records the tap dropped because the ring was full.\n# TYPE spark_ring_dropped_total counter\nspark_ring_dropped_total {}", s.ring_dropped);
            let _ = writeln!(out, "# HELP spark_routing_records_total Routing records read from the ring.\n# TYPE spark_routing_records_total counter\nspark_routing_records_total{{phase=\"prompt\"}} {}\nspark_routing_records_total{{phase=\"decode\"}} {}", s.prompt_records, s.decode_records);
            let _ = writeln!(out, "# HELP spark_shadow_cache_accesses_total Expert lookups served by the shadow cache.\n# TYPE spark_shadow_cache_accesses_total counter\nspark_shadow_cache_accesses_total {}", s.shadow_accesses);
            let _ = writeln!(out, "# HELP spark_shadow_cache_misses_total Shadow cache misses.\n# TYPE spark_shadow_cache_misses_total counter\nspark_shadow_cache_misses_total {}", s.shadow_misses);
            let _ = writeln!(out, "# HELP spark_profile_writes_total Profile rewrites.\n# TYPE spark_profile_writes_total counter\nspark_profile_writes_total {}", s.profile_writes);
            if s.window_accesses > 0 {
                let hit = |misses: u64| {
                    s.window_accesses.saturating_sub(misses) as f64 / s.window_accesses as f64
                };
                let _ = writeln!(out, "# HELP spark_shadow_cache_window_hit_ratio Shadow cache hit ratio over the last decode steps (up to {} of them).\n# TYPE spark_shadow_cache_window_hit_ratio gauge\nspark_shadow_cache_window_hit_ratio {}", l.cfg.window, hit(s.window_misses));
                let _ = writeln!(out, "# HELP spark_shadow_cache_belady_hit_ratio Belady bound: the best hit ratio any policy could reach with the same slots over the same decode steps.\n# TYPE spark_shadow_cache_belady_hit_ratio gauge\nspark_shadow_cache_belady_hit_ratio {}", hit(s.window_belady_misses));
            }
            // Totals over every child: a counter never goes back when llama-server restarts.
            if let Some(r) = s.residency_totals() {
                let _ = writeln!(out, "# HELP spark_residency_expert_slices_total Expert slices the residency provider served, by source (slot hit, loaded into a slot, streamed from host).\n# TYPE spark_residency_expert_slices_total counter\nspark_residency_expert_slices_total{{source=\"hit\"}} {}\nspark_residency_expert_slices_total{{source=\"load\"}} {}\nspark_residency_expert_slices_total{{source=\"stream\"}} {}", r.hits, r.loads, r.streamed);
                let _ = writeln!(out, "# HELP spark_residency_bytes_total Bytes the provider copied, by source.\n# TYPE spark_residency_bytes_total counter\nspark_residency_bytes_total{{source=\"slots\"}} {}\nspark_residency_bytes_total{{source=\"host\"}} {}", r.bytes_hit, r.bytes_host);
                let _ = writeln!(out, "# HELP spark_residency_hook_calls_total Scheduler hook calls, and how many the provider declined.\n# TYPE spark_residency_hook_calls_total counter\nspark_residency_hook_calls_total {}\nspark_residency_declined_total {}", r.calls, r.declined);
            }
            // The same slices per layer (every child's too), under their own names so that a
            // sum over the totals above does not count them twice.
            if let Some((layers, other)) = s.residency_layer_totals() {
                let _ = writeln!(out, "# HELP spark_residency_layer_expert_slices_total Expert slices the residency provider served per model layer, by source (layer \"other\": layers past the tap's table).\n# TYPE spark_residency_layer_expert_slices_total counter");
                let rows = layers
                    .iter()
                    .map(|(l, c)| (l.to_string(), c))
                    .chain((!other.is_zero()).then(|| ("other".to_string(), &other)));
                let rows: Vec<_> = rows.collect();
                for (l, c) in &rows {
                    for (source, v) in [("hit", c.hits), ("load", c.loads), ("stream", c.streamed)]
                    {
                        let _ = writeln!(out, "spark_residency_layer_expert_slices_total{{layer=\"{l}\",source=\"{source}\"}} {v}");
                    }
                }
                let _ = writeln!(out, "# HELP spark_residency_layer_evictions_total Slots the residency provider gave to another expert, per model layer.\n# TYPE spark_residency_layer_evictions_total counter");
                for (l, c) in &rows {
                    let _ = writeln!(
                        out,
                        "spark_residency_layer_evictions_total{{layer=\"{l}\"}} {}",
                        c.evictions
                    );
                }
            }
            if l.cfg.residency {
                let _ = writeln!(out, "# HELP spark_residency_layer_read_errors_total Per-layer counter reads from the tap that failed (did not add up to the totals, timed out, ...).\n# TYPE spark_residency_layer_read_errors_total counter\nspark_residency_layer_read_errors_total {}", s.residency_layer_errors);
            }
        }
        out
    }
}
